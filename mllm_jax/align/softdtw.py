"""Soft-DTW (Cuturi & Blondel 2017) and the soft-DTW divergence (Blondel, Mensch & Vert 2021).

    R[i, j] = C[i, j] + softmin_gamma(R[i-1, j], R[i, j-1], R[i-1, j-1]),  R[-1, -1] = 0,
    softmin_gamma(a) = -gamma log sum_k exp(-a_k / gamma),   sdtw = R[n-1, m-1].

Implementation (see ``_wavefront.py`` for the layout):
- ``sdtw_gamma(C) = gamma * sdtw_1(C / gamma)``, so the recursion runs at ``gamma = 1`` and
  ``gamma`` stays an ordinary (traceable, differentiable) input.
- The soft-min of a cell is ``mn - log(1 + e^(mn-mid) + e^(mn-mx))`` over its sorted
  predecessors: two ``exp`` and one ``log`` per cell, never ``inf - inf``. Out-of-table, padded
  and out-of-band cells hold a large finite value (``_wavefront.big``), clamped, so masked
  autodiff stays NaN-free.
- The forward pass stores ``R``; the backward recomputes each cell's three soft-min weights
  (the probabilities of coming from each predecessor) from its predecessors' ``R`` as
  ``exp((min - pred) - lse)``, exactly as the forward computed them: no cancellation
  (re-deriving them from ``R - C`` loses all float32 precision once ``|R| / gamma`` is large;
  storing the weights instead measured slower: memory traffic). The backward pass is Cuturi &
  Blondel's expected-alignment recursion ``E[p] = sum_{q successor of p} E[q] w[p -> q]``,
  also a wavefront.
  ``E = d sdtw / d C`` is the expected alignment matrix.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.align import _wavefront as wf
from mllm_jax.align.kernels import cost_matrix

Array = jax.Array


# ---- bands ---------------------------------------------------------------------------------

def sakoe_chiba_offsets(n, m, radius: int):
    """tslearn's Sakoe-Chiba band as bounds on ``j - i``: ``[min(0, m-n) - r, max(0, m-n) + r]``
    (Python ints stay ints, so a static band narrows the swept windows; arrays of lengths give
    per-pair bounds)."""
    if isinstance(n, int) and isinstance(m, int):
        return min(0, m - n) - radius, max(0, m - n) + radius
    delta = m - n
    return jnp.minimum(0, delta) - radius, jnp.maximum(0, delta) + radius


_LN2 = float(np.log(2.0))


def _log_1_3(s: Array) -> Array:
    """``log(s)`` for ``s`` in ``[1, 3]`` (a soft-min's sum of exponentials). XLA:CPU's float64
    ``log`` is scalar code, ~3x the cost of ``exp``; this series (one halving, then
    ``2 atanh(u) = 2 (u + u^3/3 + ...)`` with ``|u| <= 0.2``) is within 1 ulp and vectorises.
    float32 keeps ``jnp.log``, which is vectorised already."""
    if s.dtype != jnp.float64:
        return jnp.log(s)
    half = s >= 1.5
    s = jnp.where(half, 0.5 * s, s)
    u = (s - 1) / (s + 1)
    u2 = u * u
    p = jnp.full_like(u, 1.0 / 23)
    for k in range(10, -1, -1):
        p = p * u2 + 1.0 / (2 * k + 1)
    return 2 * u * p + jnp.where(half, _LN2, 0.0)


def _forward(view: Array, lim: wf.Limits, plan: wf.Plan, cells: wf.Cells, save: bool):
    """Soft-DTW forward sweep over the strided table view (``wf.prepare``) of raw entries
    (``cells.f`` makes them costs / gamma).

    Returns ``(R[end]: [B], rview)``. With ``save``, ``rview`` holds every cell's ``R`` in the
    same strided layout (one value per cell, no windows): all the backward sweep needs.
    """
    bsz, dt = view.shape[2], view.dtype
    inf = wf.big(dt)
    r1 = jnp.full((plan.chunks[0].width + 1, bsz), inf, dt)   # diagonal -1 (ext layout)
    r2 = r1.at[0].set(0)                          # diagonal -2: the virtual start R[-1, -1] = 0

    def step(ch, carry, t):
        (r1, r2), (val, rview) = carry
        raw = wf.diagonal(view, plan, ch, t)
        c = wf.cell_values(cells, plan, ch, t, raw, lim)
        up, left, dg = r1[:-1], r1[1:], r2[:-1]
        mn = jnp.minimum(jnp.minimum(up, left), dg)
        r = jnp.minimum(c + (mn - _log_1_3(jnp.exp(mn - up) + jnp.exp(mn - left)
                                           + jnp.exp(mn - dg))), inf)
        if lim.ragged:
            val = jnp.where(t == lim.t_end, wf.take_rows(r, lim.i_end - ch.a), val)
        if save:  # a separate buffer: one written in place while also read gets copied
            rview = wf.write_diagonal(rview, plan, ch, t, r)
        return ((wf.pad_front(r, inf), r1), (val, rview)), None

    (r1, _), (val, rview), _ = wf.sweep(
        step, (r1, r2), (jnp.zeros((bsz,), dt), jnp.zeros_like(view) if save else None),
        lambda ch: jnp.arange(ch.t0, ch.t1), plan, fills=(inf, inf), exts=(1, 1))
    if not lim.ragged:
        val = r1[plan.n - plan.chunks[-1].a]
    return val, rview


def _backward(view: Array, rview: Array, lim: wf.Limits, plan: wf.Plan,
              cells: wf.Cells) -> Array:
    """``d R[end] / d view``: the expected alignment ``E[p] = sum over successors q of
    E[q] w[p -> q]`` (swept from the last diagonal) times the slope of ``cells.f``.

    The soft-min weights ``w`` of a cell are recomputed from its predecessors' ``R`` exactly as
    the forward sweep computed them (never from ``R - C``, which cancels catastrophically in
    float32 once ``|R| / gamma`` is large); ``R`` of diagonals ``t-1``, ``t-2`` is carried and
    ``t-3`` loaded from ``rview`` at each step.
    """
    bsz, dt = view.shape[2], view.dtype
    inf = wf.big(dt)

    def load(ch, t):  # R of diagonal t in the ext layout; the virtual R[-1, -1] = 0
        r = wf.diagonal_ext(rview, plan, ch, t, inf)
        return r.at[0].set(jnp.where(t == -2, 0, r[0])) if ch.a == 0 else r

    last = plan.chunks[-1]
    t_last = plan.n + plan.m - 2
    init = (load(last, t_last - 1), load(last, t_last - 2),
            jnp.zeros((last.width, bsz), dt), jnp.zeros((last.width, bsz), dt))

    def step(ch, carry, t):
        (r1, r2, e, pend), grad = carry
        up, left, dg = r1[:-1], r1[1:], r2[:-1]
        mn = jnp.minimum(jnp.minimum(up, left), dg)
        eu, el, ed = jnp.exp(mn - up), jnp.exp(mn - left), jnp.exp(mn - dg)
        e = e + wf.end_onehot(ch, lim.i_end, dt) * (t == lim.t_end).astype(dt)
        f = e / (eu + el + ed)
        slope = wf.cell_slope(cells, wf.diagonal(view, plan, ch, t))
        grad = wf.add_diagonal(grad, plan, ch, t, e if slope is None else e * slope)
        carry = (r2, load(ch, t - 3), wf.shift_up(f * eu) + f * el + pend, wf.shift_up(f * ed))
        return (carry, grad), None

    _, grad, _ = wf.sweep(step, init, jnp.zeros_like(view), lambda ch: jnp.arange(ch.t0, ch.t1),
                          plan, fills=(inf, inf, 0, 0), exts=(1, 1, 0, 0), reverse=True)
    return grad


@partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def sdtw_core(view: Array, lim: wf.Limits, plan: wf.Plan, cells: wf.Cells) -> Array:
    """Soft-DTW at ``gamma = 1`` of the table ``cells.f(view)`` (``view``: ``wf.prepare``'s
    strided ``float[rows, stride, B]``); ``R`` read at diagonal ``lim.t_end[b]``, row
    ``lim.i_end[b]``.

    Differentiable in ``view`` in both modes: the derivative is linear in the tangent,
    ``<E f'(view), d view>`` with the expected alignment ``E`` (``custom_jvp``; JAX transposes it
    for reverse mode, so ``grad`` costs one forward and one backward sweep).
    """
    return _forward(view, lim, plan, cells, save=False)[0]


@sdtw_core.defjvp
def _core_jvp(plan, cells, primals, tangents):
    view, lim = primals
    val, rview = _forward(view, lim, plan, cells, save=True)
    return val, jnp.sum(_backward(view, rview, lim, plan, cells) * tangents[0], axis=(0, 1))


# ---- public API ------------------------------------------------------------------------------

_COST = wf.Cells(wf.identity, "cost")


def softdtw_from_cost(cost: Array, gamma=1.0, x_len: Array | None = None,
                      y_len: Array | None = None, band: int | None = None,
                      return_alignment: bool = False):
    """Soft-DTW of precomputed cost matrices ``cost: float[..., n, m]`` -> ``float[...]``.

    Args:
      gamma: smoothing (> 0); a Python float or a traced scalar (differentiable).
      x_len, y_len: ``int[...]`` true lengths (rows / columns beyond them are padding), or None.
      band: Sakoe-Chiba radius as in tslearn (``sakoe_chiba_radius``), or None.
      return_alignment: also return the expected alignment ``E = d sdtw / d cost``
        (``float[..., n, m]``).
    """
    return _softdtw(cost, gamma, x_len, y_len, band, return_alignment, pairs_last=False)


def _softdtw(cost, gamma, x_len, y_len, band, return_alignment, pairs_last, m_valid=None):
    if isinstance(gamma, (int, float)) and not gamma > 0:    # a traced gamma is the caller's to check
        raise ValueError(f"softdtw: gamma must be > 0, got {gamma}")
    n, m = cost.shape[:2] if pairs_last else cost.shape[-2:]
    m = m if m_valid is None else m_valid
    dt = wf.compute_dtype(cost.dtype)
    inf = wf.big(dt)
    if band is not None:
        if x_len is None and y_len is None:
            band = sakoe_chiba_offsets(int(n), int(m), int(band))
        else:
            nl = n if x_len is None else x_len
            ml = m if y_len is None else y_len
            band = sakoe_chiba_offsets(jnp.asarray(nl), jnp.asarray(ml), int(band))
    gamma = jnp.asarray(gamma, dt)

    def value(c):
        view, lim, plan, finish = wf.prepare(c.astype(dt) / gamma, x_len, y_len, band, inf,
                                             pairs_last, m_valid=m_valid)
        return finish(sdtw_core(view, lim, plan, _COST)) * gamma

    if not return_alignment:
        return value(cost)
    val, vjp = jax.vjp(value, cost)
    e = vjp(jnp.ones_like(val))[0]
    e = jnp.moveaxis(e, (0, 1), (-2, -1)) if pairs_last else e
    return val, e[..., :m]


def softdtw(x: Array, y: Array, gamma=1.0, x_mask: Array | None = None,
            y_mask: Array | None = None, cost: str | Callable = "sqeuclidean",
            band: int | None = None, *, sigma=None, return_alignment: bool = False):
    """Soft-DTW between paired sequences: ``x: float[B, n, d]``, ``y: float[B, m, d]`` -> ``float[B]``.

    ``x_mask: bool[B, n]`` / ``y_mask: bool[B, m]`` mark valid elements (a prefix); a padded pair
    gives the unpadded value. ``cost``: ``"sqeuclidean"`` (tslearn's), ``"cosine"``,
    ``"neg_log_kernel"`` (with ``sigma``) or a callable (see ``kernels.cost_matrix``).
    ``band``: Sakoe-Chiba radius. ``return_alignment``: also return ``E: float[B, n, m]``.
    """
    yl = wf.lengths_from_mask(y_mask, y.shape[-2], "y_mask")
    y, m_valid = (y, None) if callable(cost) else wf.pad_square(y, x.shape[-2])
    c = cost_matrix(x, y, cost, sigma=sigma, pairs_last=True)
    return _softdtw(c, gamma, wf.lengths_from_mask(x_mask, x.shape[-2], "x_mask"), yl, band,
                    return_alignment, pairs_last=True, m_valid=m_valid)


def softdtw_pairwise(X: Array, Y: Array | None = None, gamma=1.0, x_mask: Array | None = None,
                     y_mask: Array | None = None, cost: str | Callable = "sqeuclidean",
                     band: int | None = None, *, sigma=None, return_alignment: bool = False):
    """Soft-DTW between all pairs: ``X: float[P, n, d]``, ``Y: float[Q, m, d]`` -> ``float[P, Q]``
    (``Y=None``: ``Y = X``, ``y_mask = x_mask``). Same options as ``softdtw``; the alignment,
    when requested, is ``float[P, Q, n, m]``."""
    if Y is None:
        Y, y_mask = X, x_mask
    xl = wf.lengths_from_mask(x_mask, X.shape[-2], "x_mask")
    yl = wf.lengths_from_mask(y_mask, Y.shape[-2], "y_mask")
    Y, m_valid = (Y, None) if callable(cost) else wf.pad_square(Y, X.shape[-2])
    c = cost_matrix(X, Y, cost, pairwise=True, sigma=sigma, pairs_last=True)
    return _softdtw(c, gamma, None if xl is None else xl[:, None],
                    None if yl is None else yl[None, :], band, return_alignment, pairs_last=True,
                    m_valid=m_valid)


def softdtw_divergence(x: Array, y: Array, gamma=1.0, x_mask: Array | None = None,
                       y_mask: Array | None = None, cost: str | Callable = "sqeuclidean",
                       band: int | None = None, *, sigma=None) -> Array:
    """``sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2`` -> ``float[B]`` (Blondel et al. 2021):
    zero for ``x = y`` and non-negative for the squared Euclidean cost."""
    kw = dict(gamma=gamma, cost=cost, band=band, sigma=sigma)
    return (softdtw(x, y, x_mask=x_mask, y_mask=y_mask, **kw)
            - 0.5 * (softdtw(x, x, x_mask=x_mask, y_mask=x_mask, **kw)
                     + softdtw(y, y, x_mask=y_mask, y_mask=y_mask, **kw)))


def softdtw_divergence_pairwise(X: Array, Y: Array | None = None, gamma=1.0,
                                x_mask: Array | None = None, y_mask: Array | None = None,
                                cost: str | Callable = "sqeuclidean", band: int | None = None,
                                *, sigma=None) -> Array:
    """Soft-DTW divergence between all pairs -> ``float[P, Q]`` (``Y=None``: ``Y = X``)."""
    kw = dict(gamma=gamma, cost=cost, band=band, sigma=sigma)
    if Y is None:
        s = softdtw_pairwise(X, None, x_mask=x_mask, **kw)
        d = jnp.diagonal(s)
        return s - 0.5 * (d[:, None] + d[None, :])
    s = softdtw_pairwise(X, Y, x_mask=x_mask, y_mask=y_mask, **kw)
    sx = softdtw(X, X, x_mask=x_mask, y_mask=x_mask, **kw)
    sy = softdtw(Y, Y, x_mask=y_mask, y_mask=y_mask, **kw)
    return s - 0.5 * (sx[:, None] + sy[None, :])
