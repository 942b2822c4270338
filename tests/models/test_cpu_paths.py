"""The CPU-specific forms of the layers (mllm_jax.models.layers, mllm_jax.models.cpu_forms):
bfloat16 GEMMs with float32 accumulation (``matmul_2d`` -> ``cpu_forms.bf16_matmul``), attention
with the heads moved in front (``_attention_cpu``), row-major transposes (``cpu_forms.rowmajor``),
parameters added in float32 (``add_param``).

They must compute what the generic forms compute (checked against float64 numpy on the same
bfloat16-rounded operands, and against the einsum attention), and they must keep every product
of a bfloat16 model's forward and backward pass a bfloat16 GEMM in the compiled program (the
reason they exist: XLA:CPU otherwise converts those dots to float32 and runs them at half the
rate)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.config import DecoderConfig, LoRAConfig, MLLMConfig, VisionConfig
from mllm_jax.models import cpu_forms as C
from mllm_jax.models import layers as L
from mllm_jax.models.lora import LoRA

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU code paths")

BF16 = jnp.bfloat16


def _bf16_np(a) -> np.ndarray:
    """The float64 value of ``a`` rounded to bfloat16."""
    return np.asarray(jnp.asarray(a, jnp.float32).astype(BF16).astype(jnp.float32), np.float64)


def _dot_operand_types(compiled_text: str) -> list[tuple[str, str, str]]:
    """(lhs type, rhs type, op name) of every dot in a compiled HLO module (dots sit inside
    fusions, whose parameters carry the types)."""
    types = dict(re.findall(r"%([\w.\-]+) = ([a-z0-9]+)\[", compiled_text))
    out = []
    for lhs, rhs, rest in re.findall(r"= [a-z0-9]+\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)", compiled_text):
        name = re.search(r'op_name="([^"]*)"', rest)
        out.append((types.get(lhs, "?"), types.get(rhs, "?"), name.group(1) if name else ""))
    return out


def _assert_all_dots_bf16(fn, *args):
    """Every dot of ``jit(fn)`` compiled for ``args`` takes bfloat16 operands; returns the
    compiled function (to run what was checked without compiling it again)."""
    compiled = jax.jit(fn).lower(*args).compile()
    dots = _dot_operand_types(compiled.as_text())
    assert dots, "no dot in the compiled program"
    assert all(d[:2] == ("bf16", "bf16") for d in dots), [d for d in dots if d[:2] != ("bf16", "bf16")]
    return compiled


@pytest.mark.parametrize("perm", [(1, 0), (0, 2, 1), (2, 0, 1), (0, 2, 3, 1), (0, 3, 1, 2, 4)])
def test_rowmajor_is_a_transpose(perm):
    a = jnp.arange(np.prod([2, 3, 4, 5, 6][:len(perm)]), dtype=jnp.float32).reshape([2, 3, 4, 5, 6][:len(perm)])
    np.testing.assert_array_equal(jax.jit(lambda x: C.rowmajor(x, perm))(a), jnp.transpose(a, perm))


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_matmul_matches_float64_on_rounded_operands(transpose_w, with_bias):
    rng = np.random.default_rng(0)
    m, k, n = 24, 40, 56
    x = jnp.asarray(rng.normal(size=(2, m // 2, k)), BF16)
    w = jnp.asarray(rng.normal(size=(n, k) if transpose_w else (k, n)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(n,)), jnp.float32) if with_bias else None
    ct = jnp.asarray(rng.normal(size=(2, m // 2, n)), BF16).astype(jnp.float32)  # bf16-exact cotangent

    def f(x, w, b):
        y = L.matmul_2d(x, w, b, transpose_w=transpose_w)
        assert y.dtype == BF16
        return jnp.sum(y.astype(jnp.float32) * ct), y
    (_, y), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(x, w, b)

    xn, wn = _bf16_np(x).reshape(m, k), _bf16_np(w)
    wn = wn.T if transpose_w else wn
    ref = xn @ wn + (np.asarray(b, np.float64) if with_bias else 0.0)
    # accumulated in float32 (error ~ k * 2^-24 relative to |x||w|), then rounded once to bfloat16
    scale = np.abs(xn) @ np.abs(wn) + (np.abs(np.asarray(b)) if with_bias else 0.0)
    err = np.abs(np.asarray(y, np.float64).reshape(m, n) - ref)
    assert np.all(err <= 2.0 ** -8 * np.abs(ref) + 1e-5 * scale), err.max()

    g = np.asarray(ct, np.float64).reshape(m, n)
    dx, dw, db = grads
    assert dx.dtype == BF16 and dw.dtype == jnp.float32
    dx_ref = g @ wn.T
    assert np.all(np.abs(np.asarray(dx, np.float64).reshape(m, k) - dx_ref)
                  <= 2.0 ** -8 * np.abs(dx_ref) + 1e-5 * (np.abs(g) @ np.abs(wn.T))), "dx"
    dw_ref = xn.T @ g  # float32 accumulation of exact bf16 x bf16 products, kept in float32
    dw_ref = dw_ref.T if transpose_w else dw_ref
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=1e-5, atol=1e-5 * np.abs(dw_ref).max())
    if with_bias:
        assert db.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(db), g.sum(0), rtol=1e-5, atol=1e-5)
    else:
        assert db is None


@pytest.mark.parametrize("transpose_w", [False, True])
def test_bf16_matmul_float32_output_is_the_unrounded_accumulation(transpose_w):
    """``out_dtype=float32``: the float32 accumulation itself (not a bfloat16 value widened),
    and the same gradients as the bfloat16 output (the cotangent is rounded to bfloat16 for the
    backward products either way)."""
    rng = np.random.default_rng(5)
    m, k, n = 32, 48, 40
    x = jnp.asarray(rng.normal(size=(m, k)), BF16)
    w = jnp.asarray(rng.normal(size=(n, k) if transpose_w else (k, n)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(m, n)), BF16).astype(jnp.float32)

    def f(x, w, b, out_dtype):
        y = L.matmul_2d(x, w, b, transpose_w=transpose_w, out_dtype=out_dtype)
        return jnp.sum(y.astype(jnp.float32) * ct), y
    vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (_, y32), g32 = vg(x, w, b, jnp.float32)
    (_, y16), g16 = vg(x, w, b, BF16)
    assert y32.dtype == jnp.float32 and y16.dtype == BF16
    wn = _bf16_np(w).T if transpose_w else _bf16_np(w)
    ref = _bf16_np(x) @ wn + np.asarray(b, np.float64)
    scale = np.abs(_bf16_np(x)) @ np.abs(wn) + np.abs(np.asarray(b))
    np.testing.assert_array_less(np.abs(np.asarray(y32, np.float64) - ref), 1e-5 * scale + 1e-6)
    # unrounded: most entries are not bfloat16 numbers, and rounding them gives the bf16 output
    assert np.mean(_bf16_np(y32) != np.asarray(y32, np.float64)) > 0.9
    np.testing.assert_array_equal(np.asarray(y32.astype(BF16)), np.asarray(y16))
    for a, c in zip(g32, g16):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_swiglu_rounds_once_in_bfloat16():
    """GatedMLP in bfloat16 on CPU: gate and up are float32 accumulations, ``silu(gate) * up``
    is computed in float32 and rounded once, and so is the output: the float64 chain on the
    bf16-rounded weights, rounded at those two points only, gives the same bfloat16 numbers
    (but for a rare near-tie, which may land one ulp apart)."""
    mlp = L.GatedMLP(32, 48, dtype=BF16, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 8, 32)), BF16)
    out = jax.jit(lambda x: mlp(x))(x)
    assert out.dtype == BF16
    xn = _bf16_np(x).reshape(16, 32)
    g = xn @ _bf16_np(mlp.gate_proj.kernel[...])
    u = xn @ _bf16_np(mlp.up_proj.kernel[...])
    h = _bf16_np((g / (1 + np.exp(-g))) * u)
    want = _bf16_np(h @ _bf16_np(mlp.down_proj.kernel[...])).reshape(2, 8, 32)
    got = np.asarray(out, np.float64)
    assert np.mean(got == want) > 0.97, np.mean(got == want)
    np.testing.assert_array_less(np.abs(got - want), 2.0 ** -7 * np.abs(want) + 1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
def test_swiglu_to_gradient_is_autodiffs(dtype):
    """``swiglu_to`` (SwiGLU's product with a recomputing backward pass): the value is
    ``silu(gate) * up`` rounded once to ``dtype``, and the gradients are autodiff's of the
    float32 expression (same cotangent)."""
    rng = np.random.default_rng(9)
    gate = jnp.asarray(rng.normal(size=(6, 40)) * 3, jnp.float32)
    up = jnp.asarray(rng.normal(size=(6, 40)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(6, 40)), dtype)
    y, vjp = jax.vjp(lambda a, b: C.swiglu_to(a, b, dtype), gate, up)
    ref, ref_vjp = jax.vjp(lambda a, b: jax.nn.silu(a) * b, gate, up)
    assert y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref.astype(dtype)))
    for got, want in zip(vjp(ct), ref_vjp(ct.astype(jnp.float32))):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_float32_matmul_path_is_unchanged():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 24)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(24,)), jnp.float32)
    np.testing.assert_allclose(L.matmul_2d(x, w, b), np.einsum("bti,io->bto", x, w) + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(L.matmul_2d(x, w.T, transpose_w=True), np.einsum("bti,io->bto", x, w),
                               rtol=1e-5, atol=1e-5)


def test_add_param_rounds_once_and_keeps_a_float32_gradient():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6, 8)), BF16)
    p = jnp.asarray(np.random.default_rng(3).normal(size=(6, 8)), jnp.float32)
    y = L.add_param(x, p[None])
    assert y.dtype == BF16
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)),
                                  np.asarray((x.astype(jnp.float32) + p).astype(BF16).astype(jnp.float32)))
    gp = jax.grad(lambda p: jnp.sum(L.add_param(x, p[None]).astype(jnp.float32)))(p)
    assert gp.dtype == jnp.float32
    np.testing.assert_array_equal(gp, np.full((6, 8), 4.0, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
def test_softmax_to_rounds_once_and_differentiates_the_rounded_probabilities(dtype):
    """``softmax_to`` (the CPU attention's softmax): float32 softmax rounded once to ``dtype``;
    its gradient is ``p * (g - sum(g * p))`` on those probabilities (float64 reference), which
    in float32 is jax.nn.softmax's gradient; a fully masked row stays finite (uniform)."""
    rng = np.random.default_rng(8)
    x = np.asarray(rng.normal(size=(3, 5, 17)) * 4, np.float32)
    x[1, 2] = L._NEG_INF
    ct = jnp.asarray(rng.normal(size=x.shape), dtype)
    p, vjp = jax.vjp(lambda x: C.softmax_to(x, dtype), jnp.asarray(x))
    (dx,) = vjp(ct)
    assert p.dtype == dtype and dx.dtype == jnp.float32
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    want = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(p, np.float64), want, rtol=2.0 ** -8 if dtype == BF16 else 1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(p, np.float64)[1, 2], np.full(17, 1 / 17), rtol=1e-2)
    pn, g = np.asarray(p, np.float64), np.asarray(ct, np.float64)
    np.testing.assert_allclose(np.asarray(dx, np.float64), pn * (g - (g * pn).sum(-1, keepdims=True)), rtol=1e-5, atol=1e-6)
    if dtype == jnp.float32:
        ref = jax.vjp(lambda x: jax.nn.softmax(x, axis=-1), jnp.asarray(x))[1](ct)[0]
        np.testing.assert_allclose(np.asarray(dx), np.asarray(ref), rtol=1e-5, atol=1e-6)


def _attention_inputs(dtype, b=2, t=24, h=4, kvh=2, d=16, seed=0, s=None):
    """Causal self-attention with a left-padded row; or, with ``s``, ``t`` queries over ``s``
    keys (cross-attention, as the SigLIP pooling head) and no mask."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), dtype)
    k = jnp.asarray(rng.normal(size=(b, s or t, kvh, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, s or t, kvh, d)), dtype)
    mask = None
    if s is None:
        valid = np.ones((b, t), bool)
        valid[1, :5] = False  # a left-padded row
        mask = L.causal_mask(t)[None] & jnp.asarray(valid)[:, None, :]
    ct = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    return q, k, v, mask, ct


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (BF16, 3e-2)])
@pytest.mark.parametrize("shape", [dict(), dict(t=1, s=24, h=4, kvh=4)])
def test_cpu_attention_matches_the_einsum_form(dtype, tol, shape):
    q, k, v, mask, ct = _attention_inputs(dtype, **shape)

    def loss(fn):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * ct), argnums=(0, 1, 2)))
    (l0, g0), (l1, g1) = loss(L._attention_einsum)(q, k, v), loss(L._attention_cpu)(q, k, v)
    assert L.dot_product_attention(q, k, v, mask).dtype == dtype
    np.testing.assert_allclose(np.asarray(L._attention_cpu(q, k, v, mask), np.float32),
                               np.asarray(L._attention_einsum(q, k, v, mask), np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(float(l1), float(l0), rtol=tol)
    for a, b in zip(g1, g0):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_bf16_attention_and_dense_products_stay_bf16_gemms():
    q, k, v, mask, ct = _attention_inputs(BF16)
    _assert_all_dots_bf16(jax.grad(lambda q, k, v: jnp.sum(
        L.dot_product_attention(q, k, v, mask).astype(jnp.float32) * ct), argnums=(0, 1, 2)), q, k, v)
    x = jnp.ones((4, 16, 32), BF16)
    w, b = jnp.ones((32, 48), jnp.float32), jnp.ones((48,), jnp.float32)
    for tw, ww in ((False, w), (True, w.T)):
        _assert_all_dots_bf16(jax.grad(lambda x, w, b: jnp.sum(
            L.matmul_2d(x, w, b, transpose_w=tw).astype(jnp.float32)), argnums=(0, 1, 2)), x, ww, b)


DEC = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def _mllm_loss_and_grads(dtype: str):
    from mllm_jax.models.mllm import MLLM
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, dtype=dtype)
    cfg = MLLMConfig(vision=vision, decoder=DecoderConfig(**DEC, dtype=dtype), image_token_id=3,
                     lora=LoRAConfig(rank=8), num_soft_prompts=2, soft_prompt_token_id=6)
    model = MLLM(cfg, rngs=nnx.Rngs(0))
    for path, lora in nnx.iter_graph(model):  # b = 0 at init would leave a's gradient zero
        if isinstance(lora, LoRA):
            lora.b[...] = jnp.full(lora.b.shape, 0.05, jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    b, t = 2, 32
    ids = rng.integers(8, DEC["vocab_size"], size=(b, t)).astype(np.int32)
    ids[:, 1:1 + cfg.tokens_per_image] = cfg.image_token_id
    ids[:, 1 + cfg.tokens_per_image:3 + cfg.tokens_per_image] = cfg.soft_prompt_token_id
    pixels = jnp.asarray(rng.normal(size=(b, 1, 32, 32, 3)), jnp.float32)
    ids = jnp.asarray(ids)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        logits = m(ids, pixel_values=pixels, image_mask=jnp.ones((b, 1), bool)).logits.astype(jnp.float32)
        lp = jax.nn.log_softmax(logits[:, :-1], -1)
        return -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))
    return loss, params


def test_bf16_mllm_gradient_tracks_float32_and_uses_only_bf16_gemms():
    """The whole MLLM (vision tower, projector, decoder with LoRA on q/v, soft prompts, tied LM
    head) in bfloat16: every
    product of its loss gradient is a bfloat16 GEMM, and the gradient agrees with the float32
    model's (same params) to bfloat16 accuracy."""
    loss_bf, params = _mllm_loss_and_grads("bfloat16")
    loss_f32, _ = _mllm_loss_and_grads("float32")
    l_bf, g_bf = _assert_all_dots_bf16(jax.value_and_grad(loss_bf), params)(params)
    l_32, g_32 = jax.jit(jax.value_and_grad(loss_f32))(params)
    assert abs(float(l_bf) - float(l_32)) < 2e-2 * abs(float(l_32))
    flat_bf, flat_32 = jax.tree.leaves(g_bf), jax.tree.leaves(g_32)
    assert all(a.dtype == jnp.float32 for a in flat_bf)
    for a, b in zip(flat_bf, flat_32):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        if np.linalg.norm(b) < 1e-8:
            continue
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cos > 0.99, cos


@pytest.mark.parametrize("tie", [True, False])
def test_bf16_decoder_logits_are_the_float32_accumulation(tie):
    """In bfloat16 the LM head returns its float32 accumulation (as ``lm_logits`` documents),
    not bfloat16 logits widened: the loss sees logits no coarser than the float32 model's."""
    from mllm_jax.models.decoder import Decoder
    model = Decoder(DecoderConfig(**DEC, dtype="bfloat16", tie_word_embeddings=tie), rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(7).integers(0, DEC["vocab_size"], size=(2, 12)), jnp.int32)
    out = jax.jit(lambda ids: model(ids))(ids)
    logits = np.asarray(out.logits, np.float64)
    assert out.logits.dtype == jnp.float32
    assert np.mean(_bf16_np(logits) != logits) > 0.9
    head = model.embed_tokens.embedding[...].T if tie else model.lm_head.kernel[...]
    ref = _bf16_np(out.last_hidden_state) @ _bf16_np(head)
    np.testing.assert_array_less(np.abs(logits - ref), 1e-5 * (np.abs(_bf16_np(out.last_hidden_state))
                                                                @ np.abs(_bf16_np(head))) + 1e-6)
