"""Cuturi's global alignment kernel (GAK, ICML 2011), normalised, differentiable, batched.

    M[-1, -1] = 1, M[i, -1] = M[-1, j] = 0,
    M[i, j] = k(x_i, y_j) (M[i-1, j-1] + M[i-1, j] + M[i, j-1]),    K(x, y) = M[n-1, m-1],
    normalised:  K(x, y) / sqrt(K(x, x) K(y, y)),

with tslearn's local kernel ``k = exp(-phi_sigma)`` (``kernels.gak_log_kernel``), optionally
times Cuturi's triangular kernel ``1 - |i-j|/T`` (``triangular = T``; cells with
``|i - j| >= T`` are excluded).

``K`` sums over all alignment paths, so it grows or shrinks geometrically with the lengths
(float64 overflows past ~400 steps). Evaluations, all without over/underflow of ``K`` itself:
- ``method="linear"``: tslearn's cheap linear-space recursion (a multiply and two adds per
  cell, no transcendental in the sweep), where each anti-diagonal is stored divided by its
  maximum and the log of the scale is carried per pair. Cells below ``finfo.tiny`` times the
  largest cell *of the same anti-diagonal* flush to zero, also when the alignments through
  them carry most of ``K`` (the largest cells can lie on paths that die out later): ``K``
  then comes out finite but too small, with no sign of the loss. Float32 examples: N(0, 1)
  sequences in 32-d, ``sigma = 1``, 128 x 128 (``log K`` off by 3) or 200 x 200 (off by
  up to 72); any ``sigma`` well below the spread of the data, at any length. The backward
  sweep loses mass the same way, so gradients can be wrong where ``K`` is right (5 of 64
  such pairs at 64 x 64). Faster (~1.5x forward, ~1.2x with the gradient), for data known
  to stay in range.
- ``method="log"``: ``log K = -softdtw_{gamma=1}(-log k)``: the soft-DTW sweep (log-sum-exp
  per cell), exact at any dynamic range.
- ``method="auto"`` (default): the log sweep. A finite linear value that lost mass looks like
  a correct one; the checks that tell them apart (a second sweep carrying the lost mass, the
  backward sweep's posterior of cell (0, 0), which must be 1) cost as much as the log sweep.

The backward pass of the linear method is the forward-backward identity
``d log K / d log k[c] = M[c] B[c] / K`` (the posterior probability that an alignment passes
through cell ``c``), with ``B`` the backward path sums, computed by a second rescaled wavefront.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.align import _wavefront as wf
from mllm_jax.align.kernels import gak_log_kernel_of_z, sqeuclidean
from mllm_jax.align.softdtw import sdtw_core

Array = jax.Array

lengths_from_mask = wf.lengths_from_mask


def _rescale(u: Array):
    """``u: [W, B] >= 0`` -> ``(u / c, log c)`` with ``c`` the per-pair max (1 when all zero)."""
    c = jnp.max(u, axis=0)
    c = jnp.where(c > 0, c, 1)
    return u * (1 / c), jnp.log(c)


def _local_kernel(raw, cells, plan, ch, t, lim):
    """``(k / e^kap, kap)`` for diagonal ``t`` (``raw`` read from the view): ``[W, B]`` and
    ``[B]``, with ``kap`` the largest log local kernel of the diagonal (0 when it has no valid
    cell), so that no valid kernel value underflows unless it is ~1e-38 times the largest of
    its diagonal."""
    if cells.f is not gak_log_kernel_of_z:
        lk = wf.cell_values(cells, plan, ch, t, raw, lim)
        kap = jnp.max(lk, axis=0)
        kap = jnp.where(kap > -0.5 * wf.big(lk.dtype), kap, 0)
        return jnp.exp(lk - kap), kap
    # raw = z = |a-b|^2 / (2 sigma^2), k = w e^-z / (2 - e^-z): with e1 = e^(zmin - z) and
    # em = e^-zmin, k / k(zmin) = w e1 (2 - em) / (2 - e1 em): one exp and one divide per cell
    ok, logw = wf.cell_mask(cells, plan, ch, t, lim, raw.dtype)
    inf = wf.big(raw.dtype)
    z = jnp.where(ok, raw, inf)
    zmin = jnp.min(z, axis=0)
    zmin = jnp.where(zmin < 0.5 * inf, zmin, 0)
    em = jnp.exp(-zmin)
    e1 = jnp.exp(zmin - z)
    k = e1 * ((2 - em) / (2 - e1 * em))
    if logw is not None:
        k = k * jnp.exp(logw)
    return jnp.where(ok, k, 0), -zmin - jnp.log(2 - em)


def _posterior(m: Array, a: Array, h: Array) -> Array:
    """``M B / K = m a e^h`` per cell (``m``, ``a``: forward and backward sums of a diagonal,
    each divided by its own maximum; ``h: [B]`` the log of the rest). When ``M`` and ``B`` peak
    at different cells ``h`` is large and ``m a`` tiny: their product can underflow while
    ``e^h`` overflows, so that case goes through logs."""
    lim = 0.8 * np.log(np.finfo(m.dtype).max)
    h = jnp.where(jnp.isfinite(h), h, -jnp.inf)          # K = 0 (no alignment): no posterior
    return jax.lax.cond(jnp.all(h < lim), lambda: m * a * jnp.exp(h),
                        lambda: jnp.exp(jnp.log(m) + jnp.log(a) + h))


def _slope(view, cells, plan, ch, t, lim, k, kap):
    """``d log k / d raw`` for diagonal ``t`` (None for an identity map)."""
    if cells.f is not gak_log_kernel_of_z:
        return wf.cell_slope(cells, wf.diagonal(view, plan, ch, t))
    # d/dz [-z - log(2 - e^-z)] = -1 - e^-z / (2 - e^-z) = -1 - k / w
    kk = k * jnp.exp(kap)
    if cells.tri:
        kk = kk * jnp.exp(-wf.cell_mask(cells, plan, ch, t, lim, k.dtype)[1])
    return -1 - kk


def _forward(view: Array, lim: wf.Limits, plan: wf.Plan, cells: wf.Cells, save: bool):
    """Rescaled linear-space sweep over the strided table view (``wf.prepare``) of raw entries
    (``cells.f`` makes them log local kernels). Returns ``(log K: [B], saved)``; with ``save``,
    every cell's normalised ``M`` in the view's strided layout and, per chunk,
    the normalised local kernels ``k`` (``[steps, width, B]``) and the log scales ``s``,
    ``kap`` (``[steps, B]``)."""
    bsz, dt = view.shape[2], view.dtype
    m1 = jnp.zeros((plan.chunks[0].width + 1, bsz), dt)    # diagonal -1 (ext layout)
    m2 = m1.at[0].set(1)                                   # diagonal -2: M[-1, -1] = 1
    zero = jnp.zeros((bsz,), dt)

    def step(ch, carry, t):
        (m1, m2), (s1, s2, val, mview) = carry
        raw = wf.diagonal(view, plan, ch, t)
        k, kap = _local_kernel(raw, cells, plan, ch, t, lim)
        # the reference scale is that of a diagonal that actually feeds this one (the larger if
        # both do): with max(s1, s2) alone, a diagonal t-2 that feeds no cell of t (a one-row
        # table, or the empty diagonal -1 feeding diagonal 1) set the scale, the real
        # contributions of t-1 underflowed (|s1 - s2| > ~87 in float32) and K came out 0
        fa, fd = k * (m1[:-1] + m1[1:]), k * m2[:-1]
        has_a, has_d = jnp.any(fa > 0, axis=0), jnp.any(fd > 0, axis=0)
        ref = jnp.where(has_a & has_d, jnp.maximum(s1, s2), jnp.where(has_a, s1, s2))
        u = (fa * jnp.exp(jnp.minimum(s1 - ref, 0))) + fd * jnp.exp(jnp.minimum(s2 - ref, 0))
        m, logc = _rescale(u)
        s = ref + kap + logc
        if lim.ragged:
            val = jnp.where(t == lim.t_end, jnp.log(wf.take_rows(m, lim.i_end - ch.a)) + s, val)
        if save:
            mview = wf.write_diagonal(mview, plan, ch, t, m)
        return ((wf.pad_front(m, 0), m1), (s, s1, val, mview)), ((k, s, kap) if save else None)

    (m1, _), (s1, _, val, mview), saved = wf.sweep(
        step, (m1, m2), (zero, zero, zero, jnp.zeros_like(view) if save else None),
        lambda ch: jnp.arange(ch.t0, ch.t1), plan, fills=(0, 0), exts=(1, 1))
    if not lim.ragged:
        val = jnp.log(m1[plan.n - plan.chunks[-1].a]) + s1
    return val, (mview, saved)


def _backward(view, saved, log_k, lim, plan, cells):
    """``d log K / d view``: the cell posteriors times the slope of ``cells.f``."""
    bsz, dt = view.shape[2], view.dtype
    mview, saved = saved
    by_chunk = dict(zip(plan.chunks, saved))
    init = (jnp.zeros((plan.chunks[-1].width, bsz), dt),) * 2

    def step(ch, carry, x):
        # a: backward path sums B[t] reaching this diagonal; q: pending for diagonal t-1
        # (from t+1); both in the scale exp(sig)
        (a, q), (sig, grad) = carry
        (k, s, kap), t = x
        a = a + wf.end_onehot(ch, lim.i_end, dt) * jnp.where(t == lim.t_end, jnp.exp(-sig), 0)
        m = jnp.where(wf.in_table(plan, ch.a, ch.b, t), wf.diagonal(mview, plan, ch, t), 0)
        post = _posterior(m, a, s + sig - log_k)
        slope = _slope(view, cells, plan, ch, t, lim, k, kap)
        grad = wf.add_diagonal(grad, plan, ch, t, post if slope is None else post * slope)
        u, logc = _rescale(k * a)
        sig_t = sig + kap + logc
        # combine u (scale sig_t) and q (scale sig) in the scale of whichever is nonzero (the larger
        # if both: the factors are <= 1), then renormalise the carried sums. Without that, a and q
        # kept the scale of the first diagonal, shrank by exp(kap + logc) < 1 per step and
        # flushed to 0 after ~87/|log k| diagonals in float32: d log K came out ~0 for early cells.
        has_u, has_q = jnp.any(u > 0, axis=0), jnp.any(q > 0, axis=0)
        ref = jnp.where(has_u & has_q, jnp.maximum(sig, sig_t), jnp.where(has_u, sig_t, sig))
        ft, fq = jnp.exp(jnp.minimum(sig_t - ref, 0)), jnp.exp(jnp.minimum(sig - ref, 0))
        up = wf.shift_up(u)
        a, q = (up + u) * ft + q * fq, up * ft
        c = jnp.maximum(jnp.max(a, axis=0), jnp.max(q, axis=0))
        c = jnp.where(c > 0, c, 1)
        return ((a / c, q / c), (ref + jnp.log(c), grad)), None

    _, (_, grad), _ = wf.sweep(
        step, init, (jnp.zeros((bsz,), dt), jnp.zeros_like(view)),
        lambda ch: (by_chunk[ch], jnp.arange(ch.t0, ch.t1)),
        plan, fills=(0, 0), exts=(0, 0), reverse=True)
    return grad


@partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def log_gak_core(view: Array, lim: wf.Limits, plan: wf.Plan, cells: wf.Cells) -> Array:
    """``log K`` for the log local kernel ``cells.f(view)`` (``view``: ``wf.prepare``'s strided
    table) by the rescaled linear-space sweep. Differentiable in both modes: the tangent is
    ``<P f'(view), d view>`` with the cell posteriors ``P`` (see ``softdtw.sdtw_core``)."""
    return _forward(view, lim, plan, cells, save=False)[0]


@log_gak_core.defjvp
def _core_jvp(plan, cells, primals, tangents):
    view, lim = primals
    val, saved = _forward(view, lim, plan, cells, save=True)
    grad = _backward(view, saved, val, lim, plan, cells)
    return val, jnp.sum(grad * tangents[0], axis=(0, 1))


# ---- public API ------------------------------------------------------------------------------

METHODS = ("auto", "linear", "log")


def _neg_log_kernel_of_z(z):
    return -gak_log_kernel_of_z(z)


def _neg(v):
    return -v


def _log_gak(raw: Array, x_len, y_len, triangular: int, method: str, of_z: bool,
             pairs_last: bool = False, m_valid: int | None = None) -> Array:
    """``log K`` from raw entries ``float[..., n, m]`` (``[n, m, ...]`` with ``pairs_last``):
    ``z`` values (``of_z``) or log-kernels."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    dt = wf.compute_dtype(raw.dtype)
    inf = wf.big(dt)
    raw = raw.astype(dt)
    band = (-(triangular - 1), triangular - 1) if triangular else None
    # a raw value that every cell map below sends to an excluded cell
    fill = inf if of_z else -inf
    if not of_z:
        raw = jnp.maximum(raw, -inf)            # -inf log-kernels (excluded cells) -> -big
    view, lim, plan, finish = wf.prepare(raw, x_len, y_len, None, fill, pairs_last,
                                         plan_band=band, m_valid=m_valid)
    log_cells = wf.Cells(_neg_log_kernel_of_z if of_z else _neg, "cost", triangular)
    if method != "linear":
        return -finish(sdtw_core(view, lim, plan, log_cells))
    cells = wf.Cells(gak_log_kernel_of_z if of_z else wf.identity, "logk", triangular)
    return finish(log_gak_core(view, lim, plan, cells))


def gak_from_log_kernel(log_kernel: Array, x_len: Array | None = None,
                        y_len: Array | None = None, triangular: int = 0,
                        method: str = "auto") -> Array:
    """``log K`` (unnormalised) from a local log-kernel matrix ``float[..., n, m]`` -> ``float[...]``.

    ``x_len``, ``y_len``: ``int[...]`` true lengths (or None). ``-inf`` entries exclude a cell.
    Differentiable in ``log_kernel``.
    """
    return _log_gak(log_kernel, x_len, y_len, triangular, method, of_z=False)


def _z(x, y, sigma, pairwise):
    """``|x_i - y_j|^2 / (2 sigma^2)`` in the sweep's pairs-last layout, and ``m_valid``
    (square tables get one dummy column: see ``wf.pad_square``)."""
    if isinstance(sigma, (int, float)) and not sigma > 0:    # a traced sigma is the caller's to check
        raise ValueError(f"gak: sigma must be > 0, got {sigma}")
    y, m_valid = wf.pad_square(y, x.shape[-2])
    return sqeuclidean(x, y, pairwise, pairs_last=True) / (2 * jnp.square(sigma)), m_valid


def _check_triangular(triangular, x_len, y_len, n, m, out):
    """Cuturi: with ``|len(x) - len(y)| >= T`` no alignment fits the band: ``K = 0``."""
    if not triangular:
        return out
    xl = n if x_len is None else x_len
    yl = m if y_len is None else y_len
    return jnp.where(jnp.abs(jnp.asarray(xl) - jnp.asarray(yl)) >= triangular, -jnp.inf, out)


def gak(x: Array, y: Array, sigma=1.0, triangular: int = 0, x_mask: Array | None = None,
        y_mask: Array | None = None, normalize: bool = True, log: bool = False,
        method: str = "auto") -> Array:
    """Global alignment kernel between paired sequences ``x: float[B, n, d]``, ``y: float[B, m, d]``
    -> ``float[B]``.

    ``normalize``: ``K(x,y) / sqrt(K(x,x) K(y,y))`` (tslearn's ``gak``; in ``[0, 1]``, 1 for
    ``x = y``), else the raw kernel (tslearn's ``unnormalized_gak``). ``log``: return the
    logarithm (use it for long sequences: the normalised kernel underflows float32 quickly).
    ``triangular``: Cuturi's ``T`` (0: none). Masks ``bool[B, n]`` / ``bool[B, m]`` mark valid
    elements (a prefix). ``method``: ``"auto"``, ``"linear"`` or ``"log"`` (module docstring).
    """
    xl = lengths_from_mask(x_mask, x.shape[-2], "x_mask")
    yl = lengths_from_mask(y_mask, y.shape[-2], "y_mask")

    def lg(a, b, al, bl):
        z, m_valid = _z(a, b, sigma, False)
        out = _log_gak(z, al, bl, triangular, method, True, True, m_valid)
        return _check_triangular(triangular, al, bl, a.shape[-2], b.shape[-2], out)

    val = lg(x, y, xl, yl)
    if normalize:
        val = val - 0.5 * (lg(x, x, xl, xl) + lg(y, y, yl, yl))
    return val if log else jnp.exp(val)


def gak_pairwise(X: Array, Y: Array | None = None, sigma=1.0, triangular: int = 0,
                 x_mask: Array | None = None, y_mask: Array | None = None,
                 normalize: bool = True, log: bool = False, method: str = "auto") -> Array:
    """GAK between all pairs: ``X: float[P, n, d]``, ``Y: float[Q, m, d]`` -> ``float[P, Q]``
    (``Y=None``: ``Y = X``, symmetric, and the normalisation reuses the diagonal).
    Same options as ``gak``."""
    same = Y is None
    if same:
        Y, y_mask = X, x_mask
    xl = lengths_from_mask(x_mask, X.shape[-2], "x_mask")
    yl = lengths_from_mask(y_mask, Y.shape[-2], "y_mask")
    xlp = None if xl is None else xl[:, None]
    ylp = None if yl is None else yl[None, :]
    z, m_valid = _z(X, Y, sigma, True)
    val = _log_gak(z, xlp, ylp, triangular, method, True, True, m_valid)
    val = _check_triangular(triangular, xlp, ylp, X.shape[-2], Y.shape[-2], val)
    if normalize:
        if same:
            dx = dy = jnp.diagonal(val)
        else:
            dx = gak(X, X, sigma, triangular, x_mask, x_mask, False, True, method)
            dy = gak(Y, Y, sigma, triangular, y_mask, y_mask, False, True, method)
        val = val - 0.5 * (dx[:, None] + dy[None, :])
    return val if log else jnp.exp(val)
