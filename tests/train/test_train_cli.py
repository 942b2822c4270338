"""``python -m mllm_jax``: every subcommand explains itself; ``eval`` restores a run."""
import json

import numpy as np
import pytest
import yaml

from mllm_jax.cli import main
from mllm_jax.config import to_dict
from tests.toy import fit_toy, tiny_experiment


@pytest.mark.parametrize("command", ["train", "eval", "generate", "convert", "demo", "plan"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        rc = main([command, "--help"])
        raise SystemExit(rc)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m mllm_jax {command}")


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for c in ("train", "eval", "generate", "convert", "demo", "plan", "--coordinator"):
        assert c in out


@pytest.mark.parametrize("command", ["train", "eval", "plan"])
def test_a_bad_override_is_a_message_not_a_traceback(command, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(tiny_experiment(**{"train.run_dir": str(tmp_path / "run")}))))
    assert main([command, "--config", str(cfg), "train.stpes=3"]) == 2
    err = capsys.readouterr().err
    assert f"{command}: " in err and "unknown key 'stpes'" in err and "did you mean 'steps'" in err
    assert "Traceback" not in err


def test_eval_steps_0_is_refused_not_the_default(tmp_path):
    """``eval --steps 0`` evaluated train.eval_steps batches (``steps or default``)."""
    with pytest.raises(SystemExit, match="eval --steps 0: must be >= 1"):
        main(["eval", "--config", "unused.yaml", "--steps", "0"])
    from mllm_jax.train.experiment import evaluate_checkpoint
    with pytest.raises(ValueError, match="eval steps: 0; must be >= 1"):
        evaluate_checkpoint(tiny_experiment(), str(tmp_path), steps=0)


def test_eval_restores_the_newest_checkpoint_onto_this_machines_mesh(tmp_path, capsys):
    cfg = tiny_experiment(**{"train.run_dir": str(tmp_path / "r"), "train.steps": 2})
    fit_toy(cfg)  # trained on one device
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["eval", "--config", str(path), "--steps", "2", "mesh.fsdp=-1"]) == 0  # 8 devices
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 2 and np.isfinite(out["eval/loss"]) and out["eval/loss"] == out["eval/loss/ntp"]


def test_eval_and_restore_run_find_checkpoints_in_train_checkpoint_dir(tmp_path, capsys):
    """A run whose checkpoints live in ``train.checkpoint.dir`` (not ``<run_dir>/checkpoints``):
    ``eval`` of its config and ``restore_run`` of its run dir (``convert --from-run``, the demo)
    restore its newest step. They looked in the run dir itself: "no checkpoint in <run_dir>"."""
    from mllm_jax.train.experiment import restore_run
    from tests.toy import one_device_mesh
    cfg = tiny_experiment(**{"train.run_dir": str(tmp_path / "r"), "train.steps": 2,
                             "train.checkpoint.dir": str(tmp_path / "elsewhere")})
    fit_toy(cfg)
    assert not (tmp_path / "r" / "checkpoints").exists()
    state, step = restore_run(str(tmp_path / "r"), mesh=one_device_mesh())  # its config.yaml names the dir
    assert step == 2 and int(state.step) == 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["eval", "--config", str(path), "--steps", "1", "mesh.fsdp=-1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2


def test_overrides_may_stand_between_options(tmp_path, capsys):
    """argparse takes only the first run of positionals: ``plan --config c.yaml train.steps=3
    --devices 1 data.batch_size=4`` failed with "unrecognized arguments: data.batch_size=4"."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(tiny_experiment(**{"train.run_dir": str(tmp_path / "run")}))))
    seq = tiny_experiment().data.seq_buckets[-1]
    assert main(["plan", "--config", str(cfg), "data.batch_size=2", "--devices", "1", "data.batch_size=3"]) == 0
    assert f"tokens per step {3 * seq:,}" in capsys.readouterr().out
    with pytest.raises(SystemExit):      # an unknown option is still refused
        main(["plan", "--config", str(cfg), "--devics", "1"])
