"""Checkpoints: resume == uninterrupted (bit for bit, data state included), SIGTERM saves the
current step, restore onto other mesh shapes, a corrupted latest step falls back (and is kept);
a step that does not fit the target, or an error that is not about the files, moves nothing."""
import json
import logging
import os
import shutil
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from mllm_jax import sharding as shd
from mllm_jax.train.checkpoint import CheckpointMismatchError, Checkpointer, DataStateMismatchError
from mllm_jax.train.optim import build_optimizer
from mllm_jax.train.state import abstract_train_state
from tests.toy import TOY_LM, fit_toy, one_device_mesh, params_np, tiny_experiment


def _abstract(cfg, mesh):
    tx, _ = build_optimizer(cfg.train.optim, cfg.train.steps)
    return abstract_train_state(lambda: TOY_LM.build(cfg, nnx.Rngs(0)), tx, cfg.train.optim, mesh)[0]


def _np_tree(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_sigterm_then_resume_is_bit_identical(tmp_path):
    """SIGTERM while step 3's batch is fetched: step 3 finishes, a checkpoint at step 3 is
    written (params, optimiser, data position), fit returns 'preempted'. Running again resumes
    there; the final params equal an uninterrupted run's bit for bit."""
    upd = {"train.steps": 6, "train.checkpoint.every_steps": 0}
    run = str(tmp_path / "run")
    first = fit_toy(tiny_experiment(**upd, **{"train.run_dir": run, "data_options": {"sigterm_at": 2}}))
    assert first.status == "preempted" and int(first.state.step) == 3
    ck = Checkpointer(tmp_path / "run" / "checkpoints")
    assert ck.all_steps() == [3]
    assert (tmp_path / "run" / "checkpoints" / "3" / "data" / "process_0-of-1.json").exists()
    resumed = fit_toy(tiny_experiment(**upd, **{"train.run_dir": run, "data_options": {"sigterm_at": 2}}))
    assert resumed.status == "completed" and [h["step"] for h in resumed.history] == [4, 5, 6]
    straight = fit_toy(tiny_experiment(**upd, **{"train.run_dir": str(tmp_path / "straight")}))
    a, b = params_np(resumed.state), params_np(straight.state)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(x, y) for x, y in zip(_np_tree(resumed.state.opt_state), _np_tree(straight.state.opt_state)))
    assert [h["loss"] for h in first.history + resumed.history] == [h["loss"] for h in straight.history]


def test_restore_onto_other_mesh_shapes(tmp_path):
    """Saved from (2, 2, 2); restored into (1, 8, 1), (4, 1, 2) and a single device: identical."""
    cfg = tiny_experiment(**{"train.run_dir": str(tmp_path / "r"), "train.steps": 2})
    res = fit_toy(cfg, mesh=shd.make_mesh(2, 2, 2))
    want_p, want_o = params_np(res.state), _np_tree(res.state.opt_state)
    ck = Checkpointer(tmp_path / "r" / "checkpoints")
    for mesh in (shd.make_mesh(1, 8, 1), shd.make_mesh(4, 1, 2), one_device_mesh()):
        state, data, step = ck.restore(_abstract(cfg, mesh))
        assert step == 2 and data["index"] == 2
        got = params_np(state)
        assert all(np.array_equal(got[k], want_p[k]) for k in want_p)
        assert all(np.array_equal(x, y) for x, y in zip(_np_tree(state.opt_state), want_o))
        leaf = state.params["layers"][0]["mlp"]["down_proj"]["kernel"]
        assert leaf.sharding.mesh.shape == mesh.shape
        assert leaf.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_corrupted_latest_checkpoint_falls_back(tmp_path):
    cfg = tiny_experiment(**{"train.run_dir": str(tmp_path / "r"), "train.steps": 3,
                             "train.checkpoint.every_steps": 1})
    fit_toy(cfg)
    step3 = tmp_path / "r" / "checkpoints" / "3"
    files = [os.path.join(d, f) for d, _, fs in os.walk(step3) for f in fs]
    victim = max(files, key=os.path.getsize)
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    ck = Checkpointer(tmp_path / "r" / "checkpoints")
    with pytest.warns(RuntimeWarning, match=f"checkpoint {step3} could not be restored"):
        state, data, step = ck.restore(_abstract(cfg, one_device_mesh()))
    assert step == 2 and int(state.step) == 2 and data["index"] == 2
    assert (tmp_path / "r" / "checkpoints" / "3.corrupt").is_dir() and not step3.exists()
    # training goes on from step 2 and writes new steps 3..5; keeping only the last one deletes
    # the others but not the set-aside step (Orbax does not see it as a step)
    more = tiny_experiment(**{"train.run_dir": str(tmp_path / "r"), "train.steps": 5,
                              "train.checkpoint.every_steps": 1, "train.checkpoint.keep_last": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = fit_toy(more)
    assert [h["step"] for h in again.history] == [3, 4, 5]
    assert Checkpointer(tmp_path / "r" / "checkpoints").all_steps() == [5]
    kept = tmp_path / "r" / "checkpoints" / "3.corrupt" / os.path.relpath(victim, step3)
    assert kept.is_file() and os.path.getsize(kept) == size // 2


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """Checkpoints of a toy run at steps 1 and 2, its config and its abstract state."""
    run = tmp_path_factory.mktemp("two_steps") / "r"
    cfg = tiny_experiment(**{"train.run_dir": str(run), "train.steps": 2, "train.checkpoint.every_steps": 1})
    fit_toy(cfg)
    return run / "checkpoints", cfg, _abstract(cfg, one_device_mesh())


def test_step_that_does_not_fit_names_the_leaves_and_moves_nothing(two_steps, tmp_path):
    """The MLP made narrower (intermediate size 64 -> 48) since the run saved: an error naming
    the step, the leaves and both shapes; no fallback to step 1, nothing renamed; the run's own
    config still restores step 2."""
    src, cfg, abstract = two_steps
    d = shutil.copytree(src, tmp_path / "ck")
    narrow = _abstract(tiny_experiment(**{"model.decoder.intermediate_size": 48}), one_device_mesh())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(CheckpointMismatchError) as err:
            Checkpointer(d).restore(narrow)
    msg = str(err.value)
    assert f"checkpoint {d / '2'} does not fit" in msg
    assert "params: layers.0.mlp.down_proj.kernel: saved (64, 32) float32, target (48, 32) float32" in msg
    assert "params: layers.0.mlp.up_proj.kernel: saved (32, 64) float32, target (32, 48) float32" in msg
    assert ".mu.layers.0.mlp.gate_proj.kernel: saved (32, 64) float32, target (32, 48) float32" in msg
    assert "embed_tokens" not in msg  # same shape in both
    assert sorted(os.listdir(d)) == ["1", "2"]
    state, data, step = Checkpointer(d).restore(abstract)
    assert step == 2 and int(state.step) == 2 and data["index"] == 2


def _orbax_read_error(cause):
    e = Exception("Encountered error while reading array index")  # how Orbax wraps a read error
    e.__cause__ = cause
    return e


@pytest.mark.parametrize("error", [
    MemoryError("host out of memory"), KeyboardInterrupt(), TypeError("a bug in the restore code"),
    TimeoutError("read timed out"), _orbax_read_error(ValueError("UNAVAILABLE: GCS said 503"))],
    ids=["memory", "interrupt", "bug", "timeout", "unavailable"])
def test_errors_not_about_the_files_propagate_and_move_nothing(two_steps, tmp_path, monkeypatch, error):
    """Reading step 2 fails for a reason that says nothing about its files: the error itself is
    raised, step 1 is not restored instead and step 2 is not set aside."""
    src, _, abstract = two_steps
    d = shutil.copytree(src, tmp_path / "ck")
    ck = Checkpointer(d)
    read = ck._mgr.restore

    def failing(step, *a, **kw):
        if step == 2:
            raise error
        return read(step, *a, **kw)
    monkeypatch.setattr(ck._mgr, "restore", failing)
    with pytest.raises(BaseException) as got:
        ck.restore(abstract)
    assert got.value is error
    assert sorted(os.listdir(d)) == ["1", "2"]


def _as_if_written_by_two_processes(step_dir):
    data = step_dir / "data"
    state = (data / "process_0-of-1.json").read_text()
    (data / "process_0-of-1.json").unlink()
    for i in range(2):
        (data / f"process_{i}-of-2.json").write_text(state)


def test_data_state_of_another_process_count(two_steps, tmp_path):
    """Steps written by 2 processes, restored by 1: not taken for broken files (no fallback to an
    older step, nothing renamed) but an error saying so and naming the way out; restoring without
    the data state gives the step; fit with train.checkpoint.restore_data=false resumes the state
    and starts the data afresh."""
    src, cfg, abstract = two_steps
    run = tmp_path / "r"
    d = shutil.copytree(src, run / "checkpoints")
    for step in (1, 2):
        _as_if_written_by_two_processes(d / str(step))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(DataStateMismatchError, match=r"written by 2 processes and this run has 1.*"
                           r"train\.checkpoint\.restore_data=false") as err:
            Checkpointer(d).restore(abstract)
    assert str(d / "2") in str(err.value) and isinstance(err.value, CheckpointMismatchError)
    assert sorted(os.listdir(d)) == ["1", "2"]
    state, data, step = Checkpointer(d).restore(abstract, with_data=False)
    assert step == 2 and int(state.step) == 2 and data is None
    more = tiny_experiment(**{"train.run_dir": str(run), "train.steps": 3, "train.checkpoint.every_steps": 1,
                              "train.checkpoint.restore_data": False})
    res = fit_toy(more)
    assert [h["step"] for h in res.history] == [3]
    # one batch drawn since the data restarted (the uninterrupted run's position would be 3)
    assert json.loads((d / "3" / "data" / "process_0-of-1.json").read_text())["index"] == 1


def test_read_only_restore_does_not_warn_that_it_is_read_only(two_steps, caplog):
    """Orbax warned "Given directory is read only" and "CheckpointManagerOptions.read_only=True,
    setting save_interval_steps=0" on each read-only manager (eval, init_from)."""
    src, _, abstract = two_steps
    caplog.set_level(logging.INFO, logger="absl")
    state, _, step = Checkpointer(src, read_only=True).restore(abstract, with_data=False)
    assert step == 2
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                and ("read only" in r.getMessage() or "read_only" in r.getMessage())]


def test_step_whose_data_state_is_missing_falls_back(two_steps, tmp_path):
    """Step 2's data/ directory is gone (a partial copy): the step is reported by name and step 1
    is restored, as for a missing data file. Orbax raised a bare KeyError ('Item "data" was not
    found') that named no step, and fit could not resume."""
    src, _, abstract = two_steps
    d = shutil.copytree(src, tmp_path / "ck")
    shutil.rmtree(d / "2" / "data")
    with pytest.warns(RuntimeWarning, match=f"checkpoint {d / '2'} could not be restored.*data"):
        state, data, step = Checkpointer(d).restore(abstract)
    assert step == 1 and int(state.step) == 1 and data["index"] == 1
    assert (d / "2.corrupt").is_dir() and not (d / "2").exists()


def test_best_checkpoint_ignores_a_non_finite_metric(two_steps, tmp_path):
    """keep_best=1 by eval/loss (min), keep_last=1: steps with eval/loss 0.5, nan, 1.0, then one
    without an eval. The best (0.5) is kept. A NaN metric was ranked by Python's sort, whose
    comparisons with NaN are all false: step 10 (loss 1.0) was kept as 'best', 0.5 deleted."""
    import jax.numpy as jnp

    from mllm_jax.config import CheckpointConfig
    src, _, abstract = two_steps
    state, _, _ = Checkpointer(src, read_only=True).restore(abstract, with_data=False)
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig(keep_last=1, keep_best=1, async_save=False))
    for step, loss in ((5, 0.5), (7, float("nan")), (10, 1.0), (11, None)):
        ck.save(state.replace(step=jnp.int32(step)), metrics=None if loss is None else {"eval/loss": loss})
    ck.close()
    assert Checkpointer(tmp_path / "ck", read_only=True).all_steps() == [5, 11]


def test_a_best_metric_no_eval_reports_is_named(two_steps, tmp_path, caplog):
    """keep_best with a best_metric the evals do not report (a typo) ranks nothing: warned, by name."""
    import jax.numpy as jnp

    from mllm_jax.config import CheckpointConfig
    src, _, abstract = two_steps
    state, _, _ = Checkpointer(src, read_only=True).restore(abstract, with_data=False)
    ck = Checkpointer(tmp_path / "ck", CheckpointConfig(keep_best=1, best_metric="eval/los", async_save=False))
    with caplog.at_level("WARNING", logger="mllm_jax.train.checkpoint"):
        ck.save(state.replace(step=jnp.int32(3)), metrics={"eval/loss": 0.5})
    ck.close()
    assert "best_metric='eval/los' is not among this step's eval metrics ['eval/loss']" in caplog.text
