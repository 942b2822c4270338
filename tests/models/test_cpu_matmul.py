"""The CPU small-batch matmul kernel (mllm_jax/kernels/cpu_matmul.cc) against float64 numpy and
XLA's dot, and its use inside generate (same tokens as transformers, with and without it)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mllm_jax import generate as generate_mod
from mllm_jax.kernels import cpu_matmul
from mllm_jax.sharding import make_mesh, shard_model
from tests.tiny_hf import hf_and_ours

pytestmark = pytest.mark.skipif(not cpu_matmul.available(),
                                reason=f"CPU kernel unavailable: {cpu_matmul.unavailable_reason()}")


def _f64(a):
    return np.asarray(a, np.float64)


@pytest.mark.parametrize("m,k,n", [
    (1, 1, 1), (1, 64, 48), (2, 7, 47), (3, 100, 50), (5, 33, 97), (7, 48, 96), (8, 512, 1408),
    (9, 64, 200), (16, 130, 49), (17, 576, 1536), (64, 40, 145)])
def test_matches_float64_and_xla(m, k, n):
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    ref = _f64(x) @ _f64(w)
    got = jax.jit(lambda x, w: cpu_matmul.matmul(x, cpu_matmul.pack(w), n))(x, w)
    got_t = jax.jit(lambda x, e: cpu_matmul.matmul(x, cpu_matmul.pack_transposed(e), n))(x, w.T)
    assert got.shape == got_t.shape == (m, n)
    # float32 accumulation over k terms: error ~ sqrt(k) * eps * |x||w| row scale
    tol = 4 * np.sqrt(k) * np.finfo(np.float32).eps * (np.abs(_f64(x)) @ np.abs(_f64(w))).max()
    np.testing.assert_allclose(_f64(got), ref, rtol=0, atol=tol)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(got_t))
    np.testing.assert_allclose(_f64(got), _f64(jnp.dot(x, w)), rtol=0, atol=tol)


def test_leading_dims_and_pack_layout():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 50)).astype(np.float32)
    wp = np.asarray(cpu_matmul.pack(w))
    assert wp.shape == (2, 5, 48)
    np.testing.assert_array_equal(wp[1, :, :2], w[:, 48:])     # the second panel: columns 48, 49
    np.testing.assert_array_equal(wp[1, :, 2:], 0)              # then zero padding
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    y = cpu_matmul.matmul(jnp.asarray(x), jnp.asarray(wp), 50)
    assert y.shape == (2, 3, 50)
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-5)


def test_wrong_packed_shape_is_a_clear_error():
    x = jnp.ones((2, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"packed weight \(1, 7, 48\) does not fit x \(2, 8\).*expected \[1, 8, 48\]"):
        cpu_matmul.matmul(x, jnp.zeros((1, 7, 48), jnp.float32), 10)


def test_applies_only_to_small_float32_inputs():
    lo, hi = cpu_matmul.row_range()
    assert (lo, hi) == cpu_matmul.ROWS[cpu_matmul.isa()] and lo <= 2 and 8 <= hi
    assert cpu_matmul.applies(jnp.ones((8, 1, 16), jnp.float32))
    assert cpu_matmul.applies(jnp.ones((hi, 16), jnp.float32))
    assert not cpu_matmul.applies(jnp.ones((hi + 1, 16), jnp.float32))
    assert cpu_matmul.applies(jnp.ones((1, 16), jnp.float32)) == (lo == 1)
    assert not cpu_matmul.applies(jnp.ones((8, 16), jnp.bfloat16))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MLLM_JAX_CPU_KERNELS", "0")
    assert not cpu_matmul.available()
    assert "MLLM_JAX_CPU_KERNELS" in cpu_matmul.unavailable_reason()


def test_a_compiler_that_hangs_leaves_the_kernel_unavailable(monkeypatch, tmp_path):
    """A compile past its timeout raised subprocess.TimeoutExpired out of available() (only
    KernelUnavailable and OSError were caught): now KernelUnavailable, so XLA's dot is used."""
    import subprocess
    run = subprocess.run

    def fake(cmd, *a, **kw):
        if "--version" in cmd:
            return run(cmd, *a, **kw)
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))
    monkeypatch.setattr(cpu_matmul, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(cpu_matmul.subprocess, "run", fake)
    with pytest.raises(cpu_matmul.KernelUnavailable, match="timed out"):
        cpu_matmul.build()
    assert list(tmp_path.rglob("*.so")) == []


@pytest.fixture(scope="module", params=["llama_tied", "qwen2"])
def models(request, tmp_path_factory):
    family, overrides = {"llama_tied": ("llama", dict(tie_word_embeddings=True)), "qwen2": ("qwen2", {})}[request.param]
    hf, ours = hf_and_ours(tmp_path_factory.mktemp(request.param), family, seed=5, **overrides)
    assert hf.config.tie_word_embeddings == (request.param == "llama_tied")
    return hf, ours


def _custom_calls(model, ids, mask, cpu_kernels):
    graphdef, state = nnx.split(model)
    packs = generate_mod._pack_weights(graphdef, state) if cpu_kernels else None
    hlo = generate_mod._generate.lower(
        graphdef, state, packs, jnp.asarray(ids), None, jnp.asarray(mask), None, jax.random.key(0),
        jnp.float32(1), jnp.float32(1), max_new_tokens=4, do_sample=False, top_k=0, use_top_p=False,
        stop_tokens=(), pad_id=0, cache_dtype=None).as_text()
    return hlo.count(cpu_matmul.TARGET)


def test_generate_uses_the_kernel_and_gives_transformers_tokens(models):
    hf, model = models
    rng = np.random.default_rng(1)
    b, t, n = 8, 5, 12
    ids = rng.integers(1, hf.config.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[2, :3] = 0                                   # a left-padded row
    ids[2, :3] = 0
    # every Dense of the decoder (q, k, v, o, gate, up, down; lm_head or the tied embedding) is
    # called through the kernel in the loop body (b rows), and in the prefill (b * t rows) where
    # the kernel's row range takes them (AVX-512: up to 128; AVX2: up to 8)
    n_dense = sum(isinstance(m, generate_mod.Dense) for _, m in nnx.iter_modules(model))
    tied = hf.config.tie_word_embeddings
    per_pass = n_dense + int(tied)
    lo, hi = cpu_matmul.row_range()
    assert _custom_calls(model, ids, mask, True) >= per_pass * (2 if lo <= b * t <= hi else 1)
    assert _custom_calls(model, ids, mask, False) == 0
    with_k = generate_mod.generate(model, ids, attention_mask=mask, max_new_tokens=n, stop_tokens=())
    without = generate_mod.generate(model, ids, attention_mask=mask, max_new_tokens=n, stop_tokens=(),
                                    cpu_kernels=False)
    np.testing.assert_array_equal(with_k.tokens, without.tokens)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(with_k.tokens, out[:, t:].numpy())
    assert len(np.unique(with_k.tokens)) > 3


def test_sharded_weights_keep_xla_dot(models):
    _, model = models
    assert generate_mod._kernels_apply(nnx.state(model))
    sharded = shard_model(nnx.clone(model), make_mesh(1, 4, 2))
    assert not generate_mod._kernels_apply(nnx.state(sharded))
    ids = np.ones((1, 3), np.int32)
    with pytest.raises(ValueError, match=r"cpu_kernels=True\): the CPU kernel needs .* one CPU device"):
        generate_mod.generate(sharded, ids, max_new_tokens=2, cpu_kernels=True)


def test_packed_weights_are_reused_and_follow_weight_updates(models):
    _, model = models
    model = nnx.clone(model)
    ids = np.random.default_rng(2).integers(1, model.config.vocab_size, (2, 4)).astype(np.int32)
    run = lambda ck=None: np.asarray(generate_mod.generate(model, ids, max_new_tokens=6, stop_tokens=(),
                                                           cpu_kernels=ck).tokens)
    first = run()
    packs = generate_mod._PACKS._packs
    assert packs is not None
    np.testing.assert_array_equal(run(), first)
    assert generate_mod._PACKS._packs is packs               # same weights: not packed again
    # a new value for one weight (as an optimizer update does) must not meet stale packed weights
    down = model.layers[0].mlp.down_proj.kernel
    down[...] = down[...] * -3.0
    changed = run()
    assert generate_mod._PACKS._packs is not packs
    np.testing.assert_array_equal(changed, run(False))
    assert not np.array_equal(changed, first)
    # the packed copy does not outlive the model's weights
    del model, down
    import gc
    gc.collect()
    assert generate_mod._PACKS._packs is None


def test_the_widest_path_this_cpu_has_is_built():
    """AVX-512 where the CPU has it, else the AVX2 + FMA path (2-row register blocks): the
    library was AVX-512 only, and AVX2 CPUs kept XLA's dot."""
    flags = set(cpu_matmul._cpu_flags().split())
    assert cpu_matmul.isa() == ("avx512" if "avx512f" in flags else "avx2")
