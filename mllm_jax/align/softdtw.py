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
- The forward pass stores, per cell, the logs of its three soft-min weights (the
  probabilities of coming from each predecessor), computed as ``(min - pred) - lse``: no
  cancellation (re-deriving them from ``R - C`` loses all float32 precision once
  ``|R| / gamma`` is large). The backward pass is Cuturi & Blondel's expected-alignment
  recursion ``E[p] = sum_{q successor of p} E[q] w[p -> q]``, also a wavefront.
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
    (works on Python ints and on arrays of lengths)."""
    delta = m - n
    return jnp.minimum(0, delta) - radius, jnp.maximum(0, delta) + radius


# ---- the recursion at gamma = 1 --------------------------------------------------------------

def _forward(view: Array, lim: wf.Limits, plan: wf.Plan, cells: wf.Cells, save: bool):
    """Soft-DTW forward sweep over the strided table view (``wf.prepare``) of raw entries
    (``cells.f`` makes them costs / gamma).

    Returns ``(R[end]: [B], logw)``. With ``save``, ``logw`` holds per chunk the log soft-min
    weights of each cell's up, left and diagonal predecessor (three ``[steps, width, B]``).
    """
    bsz, dt = view.shape[2], view.dtype
    inf = wf.big(dt)
    r1 = jnp.full((plan.chunks[0].width + 1, bsz), inf, dt)   # diagonal -1 (ext layout)
    r2 = r1.at[0].set(0)                          # diagonal -2: the virtual start R[-1, -1] = 0

    def step(ch, carry, t):
        (r1, r2), val = carry
        c = wf.cell_values(cells, plan, ch, t, wf.diagonal(view, plan, ch, t), lim)
        up, left, dg = r1[:-1], r1[1:], r2[:-1]
        mn = jnp.minimum(jnp.minimum(up, left), dg)
        lse = jnp.log(jnp.exp(mn - up) + jnp.exp(mn - left) + jnp.exp(mn - dg))
        r = jnp.minimum(c + (mn - lse), inf)
        if lim.ragged:
            val = jnp.where(t == lim.t_end, wf.take_rows(r, lim.i_end - ch.a), val)
        # log-weights as (mn - pred) - lse: never subtract two large numbers' rounded sum
        y = ((mn - up) - lse, (mn - left) - lse, (mn - dg) - lse) if save else None
        return ((wf.pad_front(r, inf), r1), val), y

    (r1, _), val, logw = wf.sweep(step, (r1, r2), jnp.zeros((bsz,), dt),
                                  lambda ch: jnp.arange(ch.t0, ch.t1), plan,
                                  fills=(inf, inf), exts=(1, 1))
    if not lim.ragged:
        val = r1[plan.n - plan.chunks[-1].a]
    return val, logw


def _backward(view: Array, logw: list, lim: wf.Limits, plan: wf.Plan, cells: wf.Cells) -> Array:
    """``d R[end] / d view``: the expected alignment ``E[p] = sum over successors q of
    E[q] w[p -> q]`` (swept from the last diagonal) times the slope of ``cells.f``."""
    bsz, dt = view.shape[2], view.dtype
    by_chunk = dict(zip(plan.chunks, logw))
    init = (jnp.zeros((plan.chunks[-1].width, bsz), dt),) * 2

    def step(ch, carry, x):
        (e, pend), grad = carry
        (lu, ll, ld), t = x
        e = e + wf.end_onehot(ch, lim.i_end, dt) * (t == lim.t_end).astype(dt)
        e_prev = wf.shift_up(e * jnp.exp(lu)) + e * jnp.exp(ll) + pend
        slope = wf.cell_slope(cells, wf.diagonal(view, plan, ch, t))
        grad = wf.add_diagonal(grad, plan, ch, t, e if slope is None else e * slope)
        return ((e_prev, wf.shift_up(e * jnp.exp(ld))), grad), None

    _, grad, _ = wf.sweep(step, init, jnp.zeros_like(view),
                          lambda ch: (by_chunk[ch], jnp.arange(ch.t0, ch.t1)),
                          plan, fills=(0, 0), exts=(0, 0), reverse=True)
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
    val, logw = _forward(view, lim, plan, cells, save=True)
    return val, jnp.sum(_backward(view, logw, lim, plan, cells) * tangents[0], axis=(0, 1))


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


def _softdtw(cost, gamma, x_len, y_len, band, return_alignment, pairs_last):
    n, m = cost.shape[:2] if pairs_last else cost.shape[-2:]
    dt = wf.compute_dtype(cost.dtype)
    inf = wf.big(dt)
    if band is not None:
        if x_len is None and y_len is None:
            band = tuple(int(v) for v in sakoe_chiba_offsets(n, m, int(band)))
        else:
            nl = n if x_len is None else x_len
            ml = m if y_len is None else y_len
            band = sakoe_chiba_offsets(jnp.asarray(nl), jnp.asarray(ml), int(band))
    gamma = jnp.asarray(gamma, dt)

    def value(c):
        view, lim, plan, finish = wf.prepare(c.astype(dt) / gamma, x_len, y_len, band, inf,
                                             pairs_last)
        return finish(sdtw_core(view, lim, plan, _COST)) * gamma

    if not return_alignment:
        return value(cost)
    val, vjp = jax.vjp(value, cost)
    e = vjp(jnp.ones_like(val))[0]
    return val, (jnp.moveaxis(e, (0, 1), (-2, -1)) if pairs_last else e)


def softdtw(x: Array, y: Array, gamma=1.0, x_mask: Array | None = None,
            y_mask: Array | None = None, cost: str | Callable = "sqeuclidean",
            band: int | None = None, *, sigma=None, return_alignment: bool = False):
    """Soft-DTW between paired sequences: ``x: float[B, n, d]``, ``y: float[B, m, d]`` -> ``float[B]``.

    ``x_mask: bool[B, n]`` / ``y_mask: bool[B, m]`` mark valid elements (a prefix); a padded pair
    gives the unpadded value. ``cost``: ``"sqeuclidean"`` (tslearn's), ``"cosine"``,
    ``"neg_log_kernel"`` (with ``sigma``) or a callable (see ``kernels.cost_matrix``).
    ``band``: Sakoe-Chiba radius. ``return_alignment``: also return ``E: float[B, n, m]``.
    """
    c = cost_matrix(x, y, cost, sigma=sigma, pairs_last=True)
    return _softdtw(c, gamma, wf.lengths_from_mask(x_mask, x.shape[-2], "x_mask"),
                    wf.lengths_from_mask(y_mask, y.shape[-2], "y_mask"), band, return_alignment,
                    pairs_last=True)


def softdtw_pairwise(X: Array, Y: Array | None = None, gamma=1.0, x_mask: Array | None = None,
                     y_mask: Array | None = None, cost: str | Callable = "sqeuclidean",
                     band: int | None = None, *, sigma=None, return_alignment: bool = False):
    """Soft-DTW between all pairs: ``X: float[P, n, d]``, ``Y: float[Q, m, d]`` -> ``float[P, Q]``
    (``Y=None``: ``Y = X``, ``y_mask = x_mask``). Same options as ``softdtw``; the alignment,
    when requested, is ``float[P, Q, n, m]``."""
    if Y is None:
        Y, y_mask = X, x_mask
    c = cost_matrix(X, Y, cost, pairwise=True, sigma=sigma, pairs_last=True)
    xl = wf.lengths_from_mask(x_mask, X.shape[-2], "x_mask")
    yl = wf.lengths_from_mask(y_mask, Y.shape[-2], "y_mask")
    return _softdtw(c, gamma, None if xl is None else xl[:, None],
                    None if yl is None else yl[None, :], band, return_alignment, pairs_last=True)


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
