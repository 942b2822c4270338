"""Whole-process behaviour through the CLI (``python -m mllm_jax train``) on the toy model:
``kill -9`` + resume is bit-identical to an uninterrupted run, SIGTERM leaves a restorable
checkpoint at the current step, and a 2-process ``jax.distributed`` run on CPU matches the
1-process run (and stops on both processes when one process's data ends)."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from mllm_jax.config import to_dict
from mllm_jax.train.checkpoint import Checkpointer
from mllm_jax.train.optim import build_optimizer
from mllm_jax.train.state import abstract_train_state
from tests.toy import TOY_LM, fit_toy, one_device_mesh, params_np, tiny_experiment

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path, **updates) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_experiment(**updates)), sort_keys=False))
    return path


def _launch(cfg: Path, run: Path, *args, devices: int = 1, env_extra=None) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = [sys.executable, "-m", "mllm_jax", "train", "--config", str(cfg), f"train.run_dir={run}", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        raise AssertionError(f"timed out:\n{out[-4000:]}")
    return p.returncode, out


def _ok(p: subprocess.Popen) -> str:
    rc, out = _finish(p)
    assert rc == 0, out[-4000:]
    return out


def _final_params(run: Path) -> dict[str, np.ndarray]:
    ck = Checkpointer(run / "checkpoints", read_only=True)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, _, _ = ck.restore_params(lambda meta: {k: jax.ShapeDtypeStruct(s, d, sharding=one)
                                                   for k, (s, d) in meta.items()})
    return {k: np.asarray(v) for k, v in params.items()}


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _steps(run: Path) -> list[int]:
    d = run / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_kill_9_then_resume_is_bit_identical(tmp_path, cache_env):
    steps = 10
    cfg = _config(tmp_path, **{"train.steps": steps, "train.checkpoint.every_steps": 1,
                               "train.checkpoint.async_save": True, "train.checkpoint.keep_last": 2})
    reference = _launch(cfg, tmp_path / "ref", env_extra=cache_env)
    victim_run = tmp_path / "victim"
    kill_at = random.randint(2, steps - 4)  # the newest checkpoint when killed; it may be one or two on
    victim = _launch(cfg, victim_run, env_extra=cache_env)
    deadline = time.time() + 240
    while not any(s >= kill_at for s in _steps(victim_run)):
        assert victim.poll() is None, f"finished before step {kill_at}:\n{victim.communicate()[0][-3000:]}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(_steps(victim_run))
    assert killed_at < steps, f"the run finished (step {killed_at}) before it was killed"
    out = _ok(_launch(cfg, victim_run, env_extra=cache_env))
    assert json.loads(out.strip().splitlines()[-1])["step"] == steps
    _ok(reference)
    a, b = _final_params(victim_run), _final_params(tmp_path / "ref")
    bad = [k for k in b if not np.array_equal(a[k], b[k])]
    assert not bad, f"killed at step >= {kill_at} (last checkpoint {killed_at}); params differ: {bad}"
    ref_losses, resumed_losses = _losses(tmp_path / "ref"), _losses(victim_run)
    assert all(resumed_losses[s] == ref_losses[s] for s in range(killed_at + 1, steps + 1))
    # each step logged once: the killed run's steps after its last checkpoint were dropped on resume
    logged = [json.loads(x)["step"] for x in (victim_run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1)), logged


def test_sigterm_leaves_a_restorable_checkpoint_at_the_current_step(tmp_path, cache_env):
    cfg = _config(tmp_path, **{"train.steps": 10_000, "train.checkpoint.every_steps": 0})
    run = tmp_path / "run"
    p = _launch(cfg, run, env_extra=cache_env)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert p.poll() is None, p.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    rc, out = _finish(p)
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    last_logged = max(_losses(run))
    assert _steps(run) == [last_logged], out[-3000:]
    cfg_obj = tiny_experiment()
    tx, _ = build_optimizer(cfg_obj.train.optim, 10_000)
    abstract, _ = abstract_train_state(lambda: TOY_LM.build(cfg_obj, nnx.Rngs(0)), tx, cfg_obj.train.optim,
                                       one_device_mesh())
    state, data, step = Checkpointer(run / "checkpoints").restore(abstract)
    assert step == int(state.step) == last_logged and data["index"] == last_logged


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(cfg: Path, run: Path, cache_env: dict) -> list[subprocess.Popen]:
    """Processes 0 and 1 of a 2-process run (2 CPU devices each, a localhost coordinator)."""
    port = _free_port()
    return [_launch(cfg, run, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                    devices=2, env_extra=cache_env) for i in range(2)]


def _finish_two(multi: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    """``(returncode, output)`` of both processes; both are killed whatever happens (one left
    waiting in a collective would otherwise outlive the test)."""
    try:
        return [_finish(p, timeout=timeout) for p in multi]
    finally:
        for p in multi:
            p.kill()


def test_two_process_run_matches_one_process(tmp_path, cache_env):
    """2 processes x 2 CPU devices (gloo collectives, localhost coordinator) on a (data, fsdp,
    tensor) = (2, 2, 1) mesh, each loading its half of every batch, == one process on one
    device (this one), 3 steps."""
    updates = {"train.steps": 3, "mesh.data": 2, "mesh.fsdp": 2}
    cfg = _config(tmp_path, **updates, **{"data.batch_size": 4})  # per process: 2 x 4 = the 8 rows below
    multi = _launch_two(cfg, tmp_path / "multi", cache_env)
    single = fit_toy(tiny_experiment(**{"train.steps": 3, "train.run_dir": str(tmp_path / "single")}))
    for p in multi:
        _ok(p)
    lm = _losses(tmp_path / "multi")
    assert sorted(lm) == [1, 2, 3]
    np.testing.assert_allclose([lm[s] for s in (1, 2, 3)], [h["loss"] for h in single.history], atol=1e-5, rtol=0)
    a, b = _final_params(tmp_path / "multi"), params_np(single.state)
    for k in b:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0, err_msg=k)


@pytest.mark.slow  # ~15 s; the padding rule itself is checked in the default suite (test_data_pipeline)
def test_two_process_run_with_different_buckets_matches_one_process(tmp_path, cache_env):
    """Process 0's rows are 16 tokens long, process 1's 8: each pipeline picks the bucket that
    fits its own rows (16 and 8 columns). The processes agree on 16 before their rows become one
    global array; losses and params equal one process holding all rows at 16. (Before, each
    process built the array with its own global shape, which JAX does not define; in this
    data-parallel layout it happened to give the same numbers, so this checks the padding.)"""
    updates = {"train.steps": 3, "mesh.data": 2, "mesh.fsdp": 2, "data_options": {"row_lengths": [16] * 4 + [8] * 4}}
    cfg = _config(tmp_path, **updates, **{"data.batch_size": 4})
    multi = _launch_two(cfg, tmp_path / "multi", cache_env)
    single = fit_toy(tiny_experiment(**{**updates, "mesh.data": 1, "mesh.fsdp": 1,
                                        "train.run_dir": str(tmp_path / "single")}))
    for p in multi:
        _ok(p)
    lm = _losses(tmp_path / "multi")
    np.testing.assert_allclose([lm[s] for s in (1, 2, 3)], [h["loss"] for h in single.history], atol=1e-5, rtol=0)
    a, b = _final_params(tmp_path / "multi"), params_np(single.state)
    for k in b:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0, err_msg=k)


def test_two_process_run_stops_together_when_one_process_data_ends(tmp_path, cache_env):
    """Process 1's data ends after 2 batches, process 0's after 3 (e.g. skipped samples in one
    shard with data.num_epochs): both stop after step 2 and save it, rather than process 0
    waiting forever in step 3's collectives for a process that has left."""
    cfg = _config(tmp_path, **{"train.steps": 5, "mesh.data": 2, "mesh.fsdp": 2, "data.batch_size": 4,
                               "data_options": {"num_batches": [3, 2]}})
    multi = _launch_two(cfg, tmp_path / "multi", cache_env)
    outs = [_ok(p) for p in multi]
    assert sorted(_losses(tmp_path / "multi")) == [1, 2]
    assert _steps(tmp_path / "multi") == [2]
    assert "the training data ended at step 2 of train.steps=5 (data.num_epochs) on another process" in outs[0]
    # process 0 fetched a third batch before it learnt that process 1's data had ended: its saved
    # position is after the 2 batches it trained on (it was 3: a resume skipped that batch)
    data = tmp_path / "multi" / "checkpoints" / "2" / "data"
    assert [json.loads((data / f"process_{i}-of-2.json").read_text())["index"] for i in range(2)] == [2, 2]


def test_two_process_run_stops_together_when_one_process_is_signalled(tmp_path, cache_env):
    """SIGTERM to process 1 only, while it fetches its third batch: step 3 runs on both, then
    both save step 3 and exit as preempted. Process 0 had fetched a fourth batch before it learnt
    of the signal (the step's one agreement carries the next batch's lengths): its saved data
    position is after the 3 batches it trained on."""
    cfg = _config(tmp_path, **{"train.steps": 6, "train.checkpoint.every_steps": 0, "mesh.data": 2, "mesh.fsdp": 2,
                               "data.batch_size": 4, "data_options": {"sigterm_at": [None, 2]}})
    rcs = _finish_two(_launch_two(cfg, tmp_path / "multi", cache_env))
    assert [rc for rc, _ in rcs] == [128 + signal.SIGTERM] * 2, rcs[0][1][-3000:] + rcs[1][1][-3000:]
    assert all("preempted at step 3" in out for _, out in rcs)
    assert sorted(_losses(tmp_path / "multi")) == [1, 2, 3]
    assert _steps(tmp_path / "multi") == [3]
    data = tmp_path / "multi" / "checkpoints" / "3" / "data"
    assert [json.loads((data / f"process_{i}-of-2.json").read_text())["index"] for i in range(2)] == [3, 3]


def test_two_process_eval_stops_together_when_one_process_eval_data_ends(tmp_path, cache_env):
    """Process 1's eval data ends after 2 batches, process 0's after 3 (train.eval_steps=3): a
    third eval step where process 1 feeds padding rows evaluates process 0's last rows (they were
    left out), and both stop together (process 0 once ran that step alone: a hang in collectives
    process 1 never joined)."""
    cfg = _config(tmp_path, **{"train.steps": 1, "train.eval_every": 1, "train.eval_steps": 3, "mesh.data": 2,
                               "mesh.fsdp": 2, "data.batch_size": 4, "data_options": {"num_batches": [3, 2]}})
    rcs = _finish_two(_launch_two(cfg, tmp_path / "multi", cache_env))
    assert all(rc == 0 for rc, _ in rcs), rcs[0][1][-3000:] + rcs[1][1][-3000:]
    rows = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [1]
    # 2 global batches of 2 x 4 rows with 16 target tokens each, then process 0's 4 rows
    assert evals[0]["eval/loss/ntp_tokens"] == 2 * 8 * 16 + 4 * 16
    assert np.isfinite(evals[0]["eval/loss"])
