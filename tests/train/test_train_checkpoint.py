"""Checkpoints: resume == uninterrupted (bit for bit, data state included), SIGTERM saves the
current step, restore onto other mesh shapes, a corrupted latest step falls back."""
import os
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from mllm_jax import sharding as shd
from mllm_jax.train.checkpoint import Checkpointer
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
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    ck = Checkpointer(tmp_path / "r" / "checkpoints")
    with pytest.warns(RuntimeWarning, match=f"checkpoint {step3} could not be restored"):
        state, data, step = ck.restore(_abstract(cfg, one_device_mesh()))
    assert step == 2 and int(state.step) == 2 and data["index"] == 2
    assert (tmp_path / "r" / "checkpoints" / "3.corrupt").is_dir() and not step3.exists()
    # training goes on from step 2 and writes a new step 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = fit_toy(cfg)
    assert [h["step"] for h in again.history] == [3]
    assert 3 in Checkpointer(tmp_path / "r" / "checkpoints").all_steps()
