"""Cuturi's global alignment kernel (GAK, ICML 2011), normalised, differentiable, batched.

    M[-1, -1] = 1, M[i, -1] = M[-1, j] = 0,
    M[i, j] = k(x_i, y_j) (M[i-1, j-1] + M[i-1, j] + M[i, j-1]),    K(x, y) = M[n-1, m-1],
    normalised:  K(x, y) / sqrt(K(x, x) K(y, y)),

with tslearn's local kernel ``k = exp(-phi_sigma)`` (``kernels.gak_log_kernel``), optionally
times Cuturi's triangular kernel ``1 - |i-j|/T`` (``triangular = T``; cells with
``|i - j| >= T`` are excluded).

``K`` sums over all alignment paths, so it grows or shrinks geometrically with the lengths
(float64 overflows past ~400 steps). Two exact evaluations, both without over/underflow:
- ``method="linear"`` (default): tslearn's cheap linear-space recursion (a multiply and two
  adds per cell, no transcendental in the sweep), where each anti-diagonal is stored divided
  by its maximum and the log of the scale is carried per pair. Values below
  ``finfo.tiny`` times the largest cell *of the same anti-diagonal* flush to zero, which only
  matters for alignments ~1e-38 (float32) less likely than the best one at that diagonal.
- ``method="log"``: ``log K = -softdtw_{gamma=1}(-log k)``: the soft-DTW sweep (log-sum-exp
  per cell), exact at any dynamic range.

The backward pass of the linear method is the forward-backward identity
``d log K / d log k[c] = M[c] B[c] / K`` (the posterior probability that an alignment passes
through cell ``c``), with ``B`` the backward path sums, computed by a second rescaled wavefront.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from mllm_jax.align import _wavefront as wf
from mllm_jax.align.kernels import gak_log_kernel, triangular_log_weights
from mllm_jax.align.softdtw import sdtw_core

Array = jax.Array

lengths_from_mask = wf.lengths_from_mask


def _rescale(u: Array):
    """``u: [W, B] >= 0`` -> ``(u / c, log c)`` with ``c`` the per-pair max (1 when all zero)."""
    c = jnp.max(u, axis=0)
    c = jnp.where(c > 0, c, 1)
    return u * (1 / c), jnp.log(c)


def _linear_forward(kt: Array, kap: Array, t_end: Array, i_end: Array, plan: wf.Plan,
                    save: bool, capture: bool):
    """Rescaled linear-space sweep. ``kt: [T, n, B]`` local kernels divided by their per-diagonal
    maximum ``exp(kap)`` (``kap: [T, B]``). Returns ``(log K: [B], saved)``; ``saved`` (with
    ``save``) holds per chunk the normalised diagonals ``[steps, width, B]`` and their log
    scales ``[steps, B]``."""
    _, _, bsz = kt.shape
    dt = kt.dtype
    m1 = jnp.zeros((plan.chunks[0].width + 1, bsz), dt)    # diagonal -1 (ext layout)
    m2 = m1.at[0].set(1)                                   # diagonal -2: M[-1, -1] = 1
    zero = jnp.zeros((bsz,), dt)

    def step(ch, carry, x):
        (m1, m2), (s1, s2, val) = carry
        k, kp, t = x
        ref = jnp.maximum(s1, s2)
        u = k * ((m1[:-1] + m1[1:]) * jnp.exp(s1 - ref) + m2[:-1] * jnp.exp(s2 - ref))
        m, logc = _rescale(u)
        s = ref + kp + logc
        if capture:
            val = jnp.where(t == t_end, jnp.log(wf.take_rows(m, i_end - ch.a)) + s, val)
        return ((wf.pad_front(m, 0), m1), (s, s1, val)), ((m, s) if save else None)

    (m1, _), (s1, _, val), saved = wf.sweep(
        step, (m1, m2), (zero, zero, zero),
        lambda ch: (wf.chunk_view(kt, ch), kap[ch.t0:ch.t1], jnp.arange(ch.t0, ch.t1)),
        plan, fills=(0, 0), exts=(1, 1))
    if not capture:
        val = jnp.log(m1[plan.n - plan.chunks[-1].a]) + s1
    return val, saved


def _linear_backward(kt, kap, saved, logk_end, t_end, i_end, plan, g):
    """``g[b] * d log K[b] / d log k`` (``g``: per-pair weights) in the skewed layout
    ``[T, n, B]``."""
    dt = kt.dtype
    bsz = kt.shape[2]
    by_chunk = dict(zip(plan.chunks, saved))
    init = (jnp.zeros((plan.chunks[-1].width, bsz), dt),) * 2

    def step(ch, carry, x):
        # a: backward sums B[t] reaching this diagonal; q: pending for diagonal t-1 (from t+1);
        # both in the scale exp(sig)
        (a, q), sig = carry
        k, kp, (m, s), t = x
        a = a + wf.end_onehot(ch, i_end, dt) * jnp.where(t == t_end, jnp.exp(-sig), 0)
        e = m * a * (g * jnp.exp(s + sig - logk_end))
        u, logc = _rescale(k * a)
        sig_t = sig + kp + logc
        ref = jnp.maximum(sig, sig_t)
        ft, fq = jnp.exp(sig_t - ref), jnp.exp(sig - ref)
        up = wf.shift_up(u)
        return (((up + u) * ft + q * fq, up * ft), ref), e

    _, _, es = wf.sweep(
        step, init, jnp.zeros((bsz,), dt),
        lambda ch: (wf.chunk_view(kt, ch), kap[ch.t0:ch.t1], by_chunk[ch],
                    jnp.arange(ch.t0, ch.t1)),
        plan, fills=(0, 0), exts=(0, 0), reverse=True)
    return wf.assemble(es, plan)


def _split_kernel(lt: Array):
    """Skewed log-kernel ``[T, n, B]`` -> ``(k / max_diag, log max_diag [T, B])``."""
    neg = -0.5 * wf.big(lt.dtype)
    kap = jnp.max(lt, axis=1)
    kap = jnp.where(kap > neg, kap, 0)          # diagonals with no valid cell for this pair
    return jnp.exp(lt - kap[:, None, :]), kap


@partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def log_gak_core(lt: Array, t_end: Array, i_end: Array, plan: wf.Plan, capture: bool) -> Array:
    """``log K`` from the skewed log local kernel ``lt: float[T, n, B]`` (invalid cells hold
    ``-big``) by the rescaled linear-space sweep. Differentiable in both modes: the tangent is
    ``<P, d log k>`` with the cell posteriors ``P`` (see ``softdtw.sdtw_core``)."""
    kt, kap = _split_kernel(lt)
    return _linear_forward(kt, kap, t_end, i_end, plan, save=False, capture=capture)[0]


@log_gak_core.defjvp
def _core_jvp(plan, capture, primals, tangents):
    lt, t_end, i_end = primals
    kt, kap = _split_kernel(lt)
    val, saved = _linear_forward(kt, kap, t_end, i_end, plan, save=True, capture=capture)
    post = _linear_backward(kt, kap, saved, val, t_end, i_end, plan, jnp.ones_like(val))
    return val, jnp.sum(post * tangents[0], axis=(0, 1))


# ---- public API ------------------------------------------------------------------------------

METHODS = ("linear", "log")


def gak_from_log_kernel(log_kernel: Array, x_len: Array | None = None,
                        y_len: Array | None = None, method: str = "linear") -> Array:
    """``log K`` (unnormalised) from a local log-kernel matrix ``float[..., n, m]`` -> ``float[...]``.

    ``x_len``, ``y_len``: ``int[...]`` true lengths (or None). Entries ``<= -big`` (or ``-inf``)
    exclude a cell. Differentiable in ``log_kernel``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    dt = wf.compute_dtype(log_kernel.dtype)
    neg = -wf.big(dt)
    lk = jnp.maximum(log_kernel.astype(dt), neg)
    capture = x_len is not None or y_len is not None
    if method == "log":
        st, t_end, i_end, plan, finish = wf.prepare(-lk, x_len, y_len, None, -neg)
        return -finish(sdtw_core(st, t_end, i_end, plan, capture))
    lt, t_end, i_end, plan, finish = wf.prepare(lk, x_len, y_len, None, neg)
    return finish(log_gak_core(lt, t_end, i_end, plan, capture))


def _log_kernel(x, y, sigma, triangular, pairwise):
    lk = gak_log_kernel(x, y, sigma, pairwise)
    if triangular:
        n, m = x.shape[-2], y.shape[-2]
        lk = lk + triangular_log_weights(n, m, triangular, lk.dtype, -jnp.inf)
    return lk


def _check_triangular(triangular, x_len, y_len, n, m, out):
    """Cuturi: with ``|len(x) - len(y)| >= T`` no alignment fits the band: ``K = 0``."""
    if not triangular:
        return out
    xl = n if x_len is None else x_len
    yl = m if y_len is None else y_len
    return jnp.where(jnp.abs(jnp.asarray(xl) - jnp.asarray(yl)) >= triangular, -jnp.inf, out)


def gak(x: Array, y: Array, sigma=1.0, triangular: int = 0, x_mask: Array | None = None,
        y_mask: Array | None = None, normalize: bool = True, log: bool = False,
        method: str = "linear") -> Array:
    """Global alignment kernel between paired sequences ``x: float[B, n, d]``, ``y: float[B, m, d]``
    -> ``float[B]``.

    ``normalize``: ``K(x,y) / sqrt(K(x,x) K(y,y))`` (tslearn's ``gak``; in ``[0, 1]``, 1 for
    ``x = y``), else the raw kernel (tslearn's ``unnormalized_gak``). ``log``: return the
    logarithm (use it for long sequences: the normalised kernel underflows float32 quickly).
    Masks ``bool[B, n]`` / ``bool[B, m]`` mark valid elements (a prefix).
    """
    xl = lengths_from_mask(x_mask, x.shape[-2], "x_mask")
    yl = lengths_from_mask(y_mask, y.shape[-2], "y_mask")

    def lg(a, b, al, bl):
        out = gak_from_log_kernel(_log_kernel(a, b, sigma, triangular, False), al, bl, method)
        return _check_triangular(triangular, al, bl, a.shape[-2], b.shape[-2], out)

    val = lg(x, y, xl, yl)
    if normalize:
        val = val - 0.5 * (lg(x, x, xl, xl) + lg(y, y, yl, yl))
    return val if log else jnp.exp(val)


def gak_pairwise(X: Array, Y: Array | None = None, sigma=1.0, triangular: int = 0,
                 x_mask: Array | None = None, y_mask: Array | None = None,
                 normalize: bool = True, log: bool = False, method: str = "linear") -> Array:
    """GAK between all pairs: ``X: float[P, n, d]``, ``Y: float[Q, m, d]`` -> ``float[P, Q]``
    (``Y=None``: ``Y = X``, symmetric, and the normalisation reuses the diagonal).
    Same options as ``gak``."""
    same = Y is None
    if same:
        Y, y_mask = X, x_mask
    xl = lengths_from_mask(x_mask, X.shape[-2], "x_mask")
    yl = lengths_from_mask(y_mask, Y.shape[-2], "y_mask")
    lk = _log_kernel(X, Y, sigma, triangular, True)
    xlp = None if xl is None else xl[:, None]
    ylp = None if yl is None else yl[None, :]
    val = _check_triangular(triangular, xlp, ylp, X.shape[-2], Y.shape[-2],
                            gak_from_log_kernel(lk, xlp, ylp, method))
    if normalize:
        if same:
            dx = dy = jnp.diagonal(val)
        else:
            dx = gak(X, X, sigma, triangular, x_mask, x_mask, False, True, method)
            dy = gak(Y, Y, sigma, triangular, y_mask, y_mask, False, True, method)
        val = val - 0.5 * (dx[:, None] + dy[None, :])
    return val if log else jnp.exp(val)
