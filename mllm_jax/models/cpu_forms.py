"""The XLA:CPU forms of the layers' products (used by ``mllm_jax.models.layers`` when
``on_cpu()``; other backends keep the generic forms).

XLA:CPU multiplies bfloat16 at twice the float32 rate through YNNPACK, but only for a dot whose
two operands are row-major and whose left operand contracts its last dimension (a right operand
contracting its last dimension is taken as it is); any other bfloat16 dot is converted to
float32 first. XLA:CPU's bfloat16 GEMM writes float32, and it rounds the result of every op of
a bfloat16 elementwise chain. Hence: custom-VJP products whose backward passes keep that form
(``bf16_matmul``, ``bf16_bmm``, with row-major copies ``rowmajor``), and elementwise steps that
compute in float32, round once and save little for the backward pass (``softmax_to``,
``swiglu_to``). Checked in ``tests/models/test_cpu_paths.py``; measured in
``experiments/bench/cpu_layers.py`` and ``train_step.py`` (BUILD.md, "bfloat16 training").
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def on_cpu() -> bool:
    """Whether the CPU forms apply: the default backend is XLA:CPU."""
    return jax.default_backend() == "cpu"


def cpu_native_bf16(cpuinfo: Optional[str] = None) -> Optional[bool]:
    """Whether this CPU multiplies bfloat16 natively: x86 ``avx512_bf16`` or ``amx_bf16``, Arm
    ``bf16`` (``/proc/cpuinfo``'s ``flags`` / ``Features``). Without them (AVX2-only x86, e.g.
    Zen 2/3) XLA:CPU's bfloat16 GEMM converts to float32 on the fly and runs below the float32
    rate. ``None`` when it cannot tell (no ``/proc/cpuinfo``)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def rowmajor(a: Array, perm: tuple[int, ...]) -> Array:
    """``jnp.transpose(a, perm)``, written (through a trailing unit dimension) so that XLA:CPU
    materialises it as a row-major copy instead of giving the transpose a permuted layout. A
    bfloat16 dot with an operand in a permuted layout (or with an LHS that does not contract its
    last dimension) is outside XLA:CPU's native bfloat16 GEMM (YNNPACK): the compiler then
    converts both operands to float32 and runs the float32 GEMM at half the bfloat16 rate
    (a bfloat16 dense layer fwd+bwd: 150-200 vs 310-380 GFLOP/s on a 2-core Zen 4 with the
    copies included; ``experiments/bench/cpu_layers.py``)."""
    out = jnp.transpose(a[..., None], tuple(perm) + (a.ndim,))
    return out.reshape(out.shape[:-1])


def rowmajor_t(a: Array) -> Array:
    """``a.T`` (2-D) as a row-major copy; see ``rowmajor``."""
    return rowmajor(a, (1, 0))


def dot_f32acc(a: Array, b: Array, *, nt: bool = False) -> Array:
    """``a @ b`` (``nt``: ``a @ b.T``, contracting the last dims of both: XLA:CPU's bfloat16 GEMM
    takes such a right operand as it is, so a transposed weight needs no copy) -> float32."""
    return jax.lax.dot_general(a, b, (((1,), (1 if nt else 0,)), ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def bf16_matmul(x: Array, w: Array, bias: Optional[Array], transpose_w: bool, out_dtype) -> Array:
    """``bf16[M, K] @ w (+ bias)`` (``w: [K, N]``, or ``[N, K]`` with ``transpose_w``; any float
    dtype, cast to bfloat16) -> ``out_dtype[M, N]``, accumulated and biased in float32 and
    rounded once (if ``out_dtype`` is bfloat16), as torch's bfloat16 autocast and TPUs do. In
    the backward pass the weight is contracted as it is (a right operand contracting its last
    dim, or a plain one), the weight gradient's left operand is a row-major transposed copy
    (``rowmajor_t``), and the weight and bias gradients are accumulated in float32 and
    returned in their own dtypes."""
    return _bf16_matmul_fwd(x, w, bias, transpose_w, out_dtype)[0]


def _bf16_matmul_fwd(x, w, bias, transpose_w, out_dtype):
    y = dot_f32acc(x, w.astype(jnp.bfloat16), nt=transpose_w)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype), (x, w, bias)


def _bf16_matmul_bwd(transpose_w, out_dtype, res, g):
    x, w, bias = res
    wb, g = w.astype(jnp.bfloat16), g.astype(jnp.bfloat16)
    if transpose_w:   # y = x @ w.T, w: [N, K]
        dx = dot_f32acc(g, wb)
        dw = dot_f32acc(rowmajor_t(g), x)
    else:             # y = x @ w, w: [K, N]
        dx = dot_f32acc(g, wb, nt=True)
        dw = dot_f32acc(rowmajor_t(x), g)
    db = None if bias is None else jnp.sum(g.astype(jnp.float32), axis=0).astype(bias.dtype)
    return dx.astype(x.dtype), dw.astype(w.dtype), db


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def bmm(a: Array, b: Array) -> Array:
    """``[B, H, M, K] @ [B, H, K, N]`` -> float32 ``[B, H, M, N]``."""
    return jax.lax.dot_general(a, b, (((3,), (2,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32)


@jax.custom_vjp
def bf16_bmm(a: Array, b: Array) -> Array:
    """``bmm`` of two row-major bfloat16 operands (float32 accumulation), whose backward pass
    keeps its two products in that form (``rowmajor``), as ``bf16_matmul`` does. (Contracting
    the right operand's last dim instead, as ``bf16_matmul`` does for weights, made the bf16
    lm-small step 5 % slower with the keys in that form.)"""
    return bmm(a, b)


def _bf16_bmm_fwd(a, b):
    return bmm(a, b), (a, b)


def _bf16_bmm_bwd(res, g):
    a, b = res
    g = g.astype(jnp.bfloat16)
    da = bmm(g, rowmajor(b, (0, 1, 3, 2)))
    db = bmm(rowmajor(a, (0, 1, 3, 2)), g)
    return da.astype(a.dtype), db.astype(b.dtype)


bf16_bmm.defvjp(_bf16_bmm_fwd, _bf16_bmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def swiglu_to(gate: Array, up: Array, dtype) -> Array:
    """``silu(gate) * up`` rounded once to ``dtype``, whose backward pass recomputes the sigmoid
    from ``gate`` and ``up`` (the only residuals: autodiff also kept the sigmoid and the silu,
    two more activations of the MLP's width per layer)."""
    return (jax.nn.silu(gate) * up).astype(dtype)


def _swiglu_to_fwd(gate, up, dtype):
    return swiglu_to(gate, up, dtype), (gate, up)


def _swiglu_to_bwd(dtype, res, g):
    gate, up = res
    g = g.astype(jnp.float32)
    s = jax.nn.sigmoid(gate.astype(jnp.float32))
    gs = g * s
    dgate = gs * up * (1.0 + gate * (1.0 - s))
    dup = gs * gate
    return dgate.astype(gate.dtype), dup.astype(up.dtype)


swiglu_to.defvjp(_swiglu_to_fwd, _swiglu_to_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_to(x: Array, dtype) -> Array:
    """``softmax(x, -1)`` of float32 ``x``, rounded once to ``dtype``; the backward pass uses
    the rounded probabilities (as torch's bfloat16 attention does) in float32."""
    m = jnp.max(x, axis=-1, keepdims=True)
    e = jnp.exp(x - m)
    return (e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))).astype(dtype)


def _softmax_to_fwd(x, dtype):
    p = softmax_to(x, dtype)
    return p, p


def _softmax_to_bwd(dtype, p, g):
    p = p.astype(jnp.float32)
    g = g.astype(jnp.float32)
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax_to.defvjp(_softmax_to_fwd, _softmax_to_bwd)


__all__ = ["on_cpu", "rowmajor", "rowmajor_t", "dot_f32acc", "bf16_matmul", "bmm", "bf16_bmm",
           "softmax_to", "swiglu_to"]
