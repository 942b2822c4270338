"""`make demo` end to end in its --quick form, as `make demo` runs it: a fresh process on one
CPU device (slow: ~2 min of compiles on 2 cores)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mllm_jax.demo import ARMS, HEADLINE

ROOT = Path(__file__).resolve().parents[1]


def _demo(out: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "mllm_jax", "demo", "--quick", "--out", str(out), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_quick_demo_writes_the_table_json_and_plots(tmp_path):
    _demo(tmp_path)
    res = json.loads((tmp_path / "demo.json").read_text())
    assert set(res) == set(ARMS) | {"seconds"} and res["seconds"] > 0
    for arm in ARMS:
        assert set(res[arm]) == set(HEADLINE)
        assert all(0.0 <= v <= 1.0 for v in res[arm].values()), res[arm]
    for f in ("demo.md", "demo/losses.png", "demo/similarity_sugar.png", "demo/details.json"):
        assert (tmp_path / f).stat().st_size > 0, f
    # a second run reuses the cached stages (config hashes match) and gives the same table
    _demo(tmp_path, "--arms", "generative")
    again = json.loads((tmp_path / "demo.json").read_text())
    assert again["generative"] == res["generative"]


def test_arm_runs_are_retrained_when_the_shared_stage_changes(tmp_path, monkeypatch):
    """An arm's cached run is reused only if it started from the same shared-stage config: the
    arm's own config names that stage by its run dir alone, so a shared stage retrained with other
    settings (e.g. --pretrain-steps) left stale arms in use."""
    from mllm_jax import demo
    from mllm_jax.config import ExperimentConfig, apply_updates
    from mllm_jax.train import experiment
    calls = []

    def fake_train(cfg):
        calls.append(cfg.name)
        (Path(cfg.train.run_dir) / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(experiment, "train", fake_train)
    arm = apply_updates(ExperimentConfig(), {"train.run_dir": str(tmp_path / "arm")})
    shared = [apply_updates(ExperimentConfig(), {"train.steps": n}) for n in (100, 2000)]
    demo._train_cached(arm, parent=shared[0])
    demo._train_cached(arm, parent=shared[0])          # reused
    demo._train_cached(arm, parent=shared[1])          # the shared stage changed: retrained
    assert len(calls) == 2


def test_cached_stages_are_retrained_when_the_code_changes(tmp_path, monkeypatch):
    """A stage cached by other code (another float rounding, another layer) is not reused: a rerun
    in a working copy then gives what a fresh clone gives. The fingerprint follows the package's
    sources: a changed source file changes it."""
    from mllm_jax import demo
    from mllm_jax.config import ExperimentConfig, apply_updates
    from mllm_jax.train import experiment
    calls = []

    def fake_train(cfg):
        calls.append(cfg.name)
        (Path(cfg.train.run_dir) / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(experiment, "train", fake_train)
    fingerprint = demo.code_fingerprint.__wrapped__                   # uncached
    run = apply_updates(ExperimentConfig(), {"train.run_dir": str(tmp_path / "run")})
    demo._train_cached(run)
    demo._train_cached(run)                                            # reused
    monkeypatch.setattr(demo, "code_fingerprint", lambda: "other-code")
    demo._train_cached(run)                                            # other code: retrained
    assert len(calls) == 2

    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "demo.py").write_text("x = 1\n")
    (pkg / "sub" / "k.cc").write_text("int f();\n")
    monkeypatch.setattr(demo, "__file__", str(pkg / "demo.py"))
    a = fingerprint()
    (pkg / "sub" / "k.cc").write_text("int g();\n")
    assert fingerprint() != a


def test_the_tokenizer_is_retrained_when_the_code_changes(tmp_path, monkeypatch):
    """The demo's tokenizer folder was keyed by the world's version, the scene config and the
    vocabulary size only: a change to the tokenizer trainer or the scene corpus (code) reused a
    tokenizer the new code would not make, while the trained stages were retrained. Now it is
    keyed by the code too (a real, sub-second BPE training on the scene corpus)."""
    from mllm_jax import demo
    from mllm_jax.config import ExperimentConfig, load_config
    from mllm_jax.data import tokenize
    cfg = load_config(demo.CONFIG, ExperimentConfig)
    trained = []
    real = tokenize.train_tokenizer
    monkeypatch.setattr(tokenize, "train_tokenizer", lambda *a, **kw: trained.append(a[1]) or real(*a, **kw))
    monkeypatch.setattr(demo, "code_fingerprint", lambda: "0123456789abcdef")
    first = demo._tokenizer(cfg, tmp_path)
    assert demo._tokenizer(cfg, tmp_path) == first and len(trained) == 1           # same code: reused
    monkeypatch.setattr(demo, "code_fingerprint", lambda: "fedcba9876543210")
    other = demo._tokenizer(cfg, tmp_path)
    assert other != first and len(trained) == 2                                     # other code: retrained
    assert (Path(first) / "tokenizer.json").exists() and (Path(other) / "tokenizer.json").exists()
    assert Path(first).parent == Path(other).parent == tmp_path / "demo"


def test_bad_options_are_refused_before_anything_trains(tmp_path, monkeypatch):
    """An unknown --arms name, or --text-teacher minilm without the MiniLM assets, ended the demo
    only after the tokenizer, the vision stage (and, for --arms, the shared stage) had trained."""
    from mllm_jax import demo

    def trained(*a, **k):
        raise AssertionError("trained before the options were checked")
    for stage in ("_tokenizer", "_vision_init", "_train_cached"):
        monkeypatch.setattr(demo, stage, trained)
    with pytest.raises(SystemExit, match=r"--arms: unknown \['nope'\]"):
        demo.main(["--out", str(tmp_path), "--arms", "generative,nope"])
    monkeypatch.setenv("MLLM_JAX_ASSETS", str(tmp_path / "no_assets"))
    with pytest.raises(SystemExit, match="--text-teacher minilm: .*all-MiniLM-L6-v2/model.safetensors not found"):
        demo.main(["--out", str(tmp_path), "--text-teacher", "minilm"])
