"""``loop.step_compiler_options``: on XLA:CPU a float32 model's train step runs its dots on Eigen
(YNNPACK keeps the reductions), a model with a bfloat16 part keeps XLA's defaults, and
``train.xla_options`` overrides both; ``fit`` and the eval path compile with them."""
import re

import jax
import numpy as np
import pytest
from flax import nnx

from mllm_jax.config import OptimConfig, apply_updates
from mllm_jax.train.loop import CPU_FLOAT32_OPTIONS, jit_train_step, make_train_step, step_compiler_options
from mllm_jax.train.optim import build_optimizer
from mllm_jax.train.registry import make_loss_fn, ntp_objective
from mllm_jax.train.state import abstract_train_state, create_train_state
from tests.toy import TOY_LM, fit_toy, one_device_mesh, params_np, tiny_experiment

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")


def _model_fn(**updates):
    cfg = tiny_experiment(**updates)
    return lambda: TOY_LM.build(cfg, nnx.Rngs(0))


def _ynn_dots(hlo: str) -> int:
    """YNNPACK fusions of an optimised XLA:CPU module that are a dot (their root); a reduction
    fusion may still take in the dot feeding it (the softmax backward's)."""
    bodies = dict(re.findall(r"\n(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S))
    called = re.findall(r"calls=(%[\w.\-]+)[^\n]*__ynn_fusion", hlo)
    return sum(bool(re.search(r"ROOT [^\n]* dot\(", bodies[c])) for c in called)


def test_options_follow_the_model_dtype_and_the_override():
    tx, _ = build_optimizer(OptimConfig(), 10)
    mesh = one_device_mesh()
    f32, _ = abstract_train_state(_model_fn(), tx, OptimConfig(), mesh)
    bf16, _ = abstract_train_state(_model_fn(**{"model.decoder.dtype": "bfloat16"}), tx, OptimConfig(), mesh)
    assert step_compiler_options(f32) == CPU_FLOAT32_OPTIONS
    assert step_compiler_options(bf16) is None
    assert step_compiler_options(f32, {}) is None                      # {}: XLA's defaults
    mine = {"xla_cpu_enable_fast_min_max": True}
    assert step_compiler_options(bf16, mine) == mine


ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni\n"
ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
SAPPHIRE = "flags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"
NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
NEOVERSE_N1 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"


def test_native_bf16_read_from_cpuinfo_flags():
    from mllm_jax.models.cpu_forms import cpu_native_bf16
    assert [cpu_native_bf16(c) for c in (ZEN4, ZEN3, SAPPHIRE, NEOVERSE_V1, NEOVERSE_N1, "")] == \
        [True, False, True, True, False, None]
    assert cpu_native_bf16(ZEN3.replace("avx2", "avx512_bf16x")) is False     # whole flags only


def test_bfloat16_on_a_cpu_without_native_bf16_is_warned(monkeypatch, caplog):
    """A bfloat16 model on an AVX2-only CPU runs slower than in float32: fit warns (what it calls)."""
    from mllm_jax.models import cpu_forms
    from mllm_jax.train.loop import warn_if_bf16_emulated
    tx, _ = build_optimizer(OptimConfig(), 10)
    mesh = one_device_mesh()
    f32, _ = abstract_train_state(_model_fn(), tx, OptimConfig(), mesh)
    bf16, _ = abstract_train_state(_model_fn(**{"model.decoder.dtype": "bfloat16"}), tx, OptimConfig(), mesh)
    real = cpu_forms.cpu_native_bf16
    for cpuinfo, state, warned in ((ZEN3, bf16, True), (ZEN3, f32, False), (ZEN4, bf16, False), ("", bf16, False)):
        monkeypatch.setattr(cpu_forms, "cpu_native_bf16", lambda c=cpuinfo: real(c))
        caplog.clear()
        assert warn_if_bf16_emulated(state) is warned
        assert ("no native bfloat16 products" in caplog.text) is warned


def test_float32_step_runs_dots_outside_ynnpack_with_the_same_result():
    """XLA's default CPU step runs its dots as YNNPACK fusions (the premise: a newer jaxlib may
    change it); with the float32 options none, and one step gives the same loss and params."""
    optim = OptimConfig(lr=1e-2, schedule="constant")
    tx, sched = build_optimizer(optim, 10)
    mesh = one_device_mesh()
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, 64, (4, 16)).astype(np.int32),
             "labels": rng.integers(0, 64, (4, 16)).astype(np.int32), "loss_mask": np.ones((4, 16), np.int32)}
    out = {}
    for name, options in (("default", None), ("float32", CPU_FLOAT32_OPTIONS)):
        state, shardings = create_train_state(_model_fn(), tx, optim, mesh, seed=0)
        step = jit_train_step(make_train_step(make_loss_fn(ntp_objective(None)), tx, sched, mesh=mesh),
                              shardings, mesh, options)
        dots = _ynn_dots(step.lower(state, batch).compile().as_text())
        state, m = step(state, batch)
        out[name] = (dots, float(m["loss"]), params_np(state))
    assert out["default"][0] > 0 and out["float32"][0] == 0
    assert out["float32"][1] == pytest.approx(out["default"][1], rel=1e-6)
    for k, v in out["default"][2].items():
        np.testing.assert_allclose(out["float32"][2][k], v, atol=1e-6, rtol=0, err_msg=k)


def test_fit_compiles_with_train_xla_options(tmp_path):
    """``train.xla_options`` reaches the compiler: an option XLA does not know fails the run
    naming it."""
    cfg = tiny_experiment(**{"train.run_dir": str(tmp_path / "bad"), "train.steps": 1,
                             "train.xla_options": {"xla_cpu_no_such_option": True}})
    with pytest.raises(Exception, match="xla_cpu_no_such_option"):
        fit_toy(cfg)


def test_bfloat16_named_by_a_string_or_held_in_params_keeps_xla_defaults():
    """A module whose dtype is the name "bfloat16" (``nnx.Linear(dtype="bfloat16")`` keeps it as
    given) or whose params are bfloat16 computes in bfloat16: XLA's defaults (YNNPACK dots)."""
    import jax.numpy as jnp

    class Lin(nnx.Module):
        def __init__(self, **kw):
            self.l = nnx.Linear(8, 8, rngs=nnx.Rngs(0), **kw)

    tx, _ = build_optimizer(OptimConfig(), 10)
    mesh = one_device_mesh()
    for kw, want in (({}, CPU_FLOAT32_OPTIONS), ({"dtype": "float32"}, CPU_FLOAT32_OPTIONS),
                     ({"dtype": "bfloat16"}, None), ({"dtype": jnp.bfloat16}, None),
                     ({"param_dtype": jnp.bfloat16}, None)):
        state, _ = abstract_train_state(lambda: Lin(**kw), tx, OptimConfig(), mesh)
        assert step_compiler_options(state) == want, kw


def test_fit_and_eval_compile_with_the_automatic_options(tmp_path, monkeypatch):
    """With train.xla_options unset, what ``step_compiler_options`` chooses reaches the compiler
    of fit's steps and of ``evaluate_checkpoint``'s (an option XLA does not know, returned by the
    automatic choice, fails each of them naming it)."""
    from mllm_jax.train import experiment, loop
    from mllm_jax.train.experiment import evaluate_checkpoint
    cfg = tiny_experiment(**{"train.run_dir": str(tmp_path / "run"), "train.steps": 1})
    assert np.isfinite(fit_toy(cfg).history[-1]["loss"])                   # a checkpoint to evaluate
    real = loop.step_compiler_options
    bogus = lambda state, override=None: real(state, override) and {"xla_cpu_no_such_option_auto": True}  # noqa: E731
    monkeypatch.setattr(loop, "step_compiler_options", bogus)
    monkeypatch.setattr(experiment, "step_compiler_options", bogus)
    with pytest.raises(Exception, match="xla_cpu_no_such_option_auto"):
        fit_toy(tiny_experiment(**{"train.run_dir": str(tmp_path / "other"), "train.steps": 1}))
    with pytest.raises(Exception, match="xla_cpu_no_such_option_auto"):
        evaluate_checkpoint(apply_updates(cfg, {"mesh.fsdp": -1}), steps=1)        # this machine's devices
