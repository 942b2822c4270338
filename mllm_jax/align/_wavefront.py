"""Anti-diagonal ("wavefront") machinery shared by soft-DTW and the global alignment kernel.

Both recursions fill a table ``R[i, j]`` from ``R[i-1, j]``, ``R[i, j-1]`` and ``R[i-1, j-1]``,
so every cell of anti-diagonal ``t = i + j`` depends only on diagonals ``t-1`` and ``t-2``. We
sweep the ``n + m - 1`` diagonals with ``lax.scan``; each step updates a whole diagonal of every
pair of the batch at once.

Layout ("pair-minor", time-major). The tables of a batch, ``C[i, j, b]`` (``n <= m``), are
*skewed* to ``S[t, i, b] = C[i, t - i, b]`` (``[n + m - 1, n, B]``) by padding, reshaping and
transposing (no gather): diagonal ``t`` is the slab ``S[t]``, indexed by the row ``i``, and
the pairs are the minor axis. So XLA vectorises along the batch, the shifts ``i -> i - 1`` of the
recursion are whole-row offsets, and every layout change is a copy of contiguous blocks.

XLA:CPU emits scalar code for a fusion that slices a ``lax.scan`` input inside the loop body but
vectorises slices of loop carries. So scan inputs are used whole, and carried diagonals use an
"ext" layout with one extra leading row (row ``a - 1``: the table's border or, inside a chunk,
a cell that is invalid for the whole chunk), so that a shift is a slice of a carry.

Windows. Diagonal ``t`` has valid cells only for rows in ``[lo_t, hi_t]``: half of an
``n``-row slab is empty on average, and a Sakoe-Chiba band leaves far fewer. The sweep is cut
into a few chunks of consecutive diagonals; each runs its own ``lax.scan`` over a static window
``[a, b)`` of rows covering the valid cells of its diagonals and of the two diagonals on either
side, so that a value shifted in from outside the window always belongs to an invalid cell.
Carries are re-windowed between chunks. This removes most of the wasted work at the price of
one scan per chunk (more to compile), so only large problems are chunked.

Everything here is static-shape bookkeeping; the recursions live in ``softdtw.py`` and
``gak.py``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def big(dtype) -> float:
    """A large *finite* stand-in for +inf (no ``inf - inf`` = NaN in masked autodiff)."""
    return 1e300 if jnp.dtype(dtype) == jnp.float64 else 1e30


def compute_dtype(*dtypes) -> jnp.dtype:
    """The dtype the recursions run in: the inputs' float type, at least float32."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


# ---- skew ------------------------------------------------------------------------------------

def skew(c: Array, fill) -> Array:
    """``float[n, m, B] -> float[n+m-1, n, B]`` with ``out[t, i, b] = c[i, t-i, b]``;
    out-of-table cells get ``fill``. Pad, reshape, transpose: copies, no gather."""
    n, m, b = c.shape
    t = n + m - 1
    cp = jnp.pad(c, ((0, 0), (0, n), (0, 0)), constant_values=fill)
    cp = cp.reshape(n * (m + n), b)[: n * t].reshape(n, t, b)
    return jnp.swapaxes(cp, 0, 1)


def unskew(s: Array, m: int) -> Array:
    """Inverse of ``skew``: ``float[n+m-1, n, B] -> float[n, m, B]``."""
    t, n, b = s.shape
    flat = jnp.pad(jnp.swapaxes(s, 0, 1).reshape(n * t, b), ((0, n), (0, 0)))
    return flat.reshape(n, m + n, b)[:, :m]


# ---- windows ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Chunk:
    """Diagonals ``[t0, t1)`` swept over the rows ``[a, b)`` of the skewed layout."""
    t0: int
    t1: int
    a: int
    b: int

    @property
    def width(self) -> int:
        return self.b - self.a


def diagonal_ranges(n: int, m: int, band: tuple[int, int] | None = None) -> np.ndarray:
    """``int[n+m-1, 2]``: the inclusive row range ``[lo, hi]`` of the valid cells of each
    diagonal (``lo > hi`` when a band leaves a diagonal empty).

    ``band = (dlo, dhi)`` keeps only cells with ``dlo <= j - i <= dhi``.
    """
    t = np.arange(n + m - 1)
    lo = np.maximum(0, t - m + 1)
    hi = np.minimum(t, n - 1)
    if band is not None:
        dlo, dhi = band
        lo = np.maximum(lo, -((dhi - t) // 2))   # ceil((t - dhi) / 2)
        hi = np.minimum(hi, (t - dlo) // 2)      # floor((t - dlo) / 2)
    return np.stack([lo, hi], axis=1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to sweep an ``n x m`` table (``n <= m``): its chunks, in diagonal order."""
    n: int
    m: int
    chunks: tuple[Chunk, ...]


# Chunking pays when the sweep is long and wide; each chunk is one more scan to compile.
MAX_CHUNKS = 6
MIN_CELLS_TO_CHUNK = 1 << 18


@functools.lru_cache(maxsize=256)
def plan_chunks(n: int, m: int, band: tuple[int, int] | None = None, *,
                max_chunks: int = 1, grid: int = 48) -> Plan:
    """Cuts the ``n+m-1`` diagonals into at most ``max_chunks`` chunks minimising the number of
    swept slots (sum of steps x window width), by dynamic programming over ``grid`` candidate
    boundaries; uses the fewest chunks within 3% of the best."""
    rng = diagonal_ranges(n, m, band)
    nt = len(rng)
    ok = rng[:, 0] <= rng[:, 1]

    def window(t0, t1):
        lo, hi = max(0, t0 - 2), min(nt, t1 + 2)
        sel = ok[lo:hi]
        if not sel.any():
            return 0, 1
        return int(rng[lo:hi, 0][sel].min()), int(rng[lo:hi, 1][sel].max()) + 1

    cuts = sorted(set(np.linspace(0, nt, min(grid, nt) + 1).round().astype(int).tolist()))
    g = len(cuts)
    area = np.full((g, g), np.inf)
    for i in range(g):
        for j in range(i + 1, g):
            a, b = window(cuts[i], cuts[j])
            area[i, j] = (cuts[j] - cuts[i]) * (b - a)
    best = [area[0].copy()]          # best[k][j]: cover [0, cuts[j]) with k+1 chunks
    arg = [np.zeros(g, int)]
    for _ in range(1, max_chunks):
        tot = best[-1][:, None] + area
        arg.append(tot.argmin(0))
        best.append(tot.min(0))
    k = next(k for k in range(max_chunks) if best[k][-1] <= 1.03 * best[-1][-1])
    bounds, j = [g - 1], g - 1
    for kk in range(k, 0, -1):
        j = int(arg[kk][j])
        bounds.append(j)
    bounds = [0] + [cuts[b] for b in reversed(bounds)] if bounds[-1] != 0 else \
        [cuts[b] for b in reversed(bounds)]
    chunks = tuple(Chunk(t0, t1, *window(t0, t1)) for t0, t1 in zip(bounds[:-1], bounds[1:]))
    return Plan(n, m, chunks)


# ---- lengths, masks and the common front end --------------------------------------------------

def lengths_from_mask(mask: Array | None, n: int, name: str) -> Array | None:
    """``bool[..., n]`` (True on a prefix) -> ``int32[...]`` lengths; ``None`` stays ``None``.

    Masks must mark a prefix of each sequence (padding at the end). A concrete mask is checked.
    """
    if mask is None:
        return None
    if mask.shape[-1] != n:
        raise ValueError(f"{name} has shape {mask.shape} but its sequences have length {n}")
    if not isinstance(mask, jax.core.Tracer):
        mk = np.asarray(mask, bool)
        length = mk.sum(-1)
        prefix = np.arange(n) < length[..., None]
        if not np.array_equal(mk, prefix):
            raise ValueError(f"{name} must be True on a prefix of each sequence (padding at the "
                             f"end); shape {mask.shape}")
        if (length < 1).any():
            raise ValueError(f"{name}: every sequence needs at least one valid element")
    return jnp.sum(mask, -1).astype(jnp.int32)


def validity(n: int, m: int, x_len, y_len, band_lo, band_hi) -> Array | None:
    """``bool[..., n, m]`` of the cells a path may use (inside both lengths and the band), or
    ``None`` when every cell is valid. Lengths / band bounds are ``[...]`` arrays or ``None``."""
    i = jnp.arange(n)[:, None]
    j = jnp.arange(m)[None, :]
    ok = None

    def conj(a, b):
        return b if a is None else a & b

    if x_len is not None:
        ok = conj(ok, i < jnp.asarray(x_len)[..., None, None])
    if y_len is not None:
        ok = conj(ok, j < jnp.asarray(y_len)[..., None, None])
    if band_lo is not None:
        ok = conj(ok, (j - i) >= jnp.asarray(band_lo)[..., None, None])
        ok = conj(ok, (j - i) <= jnp.asarray(band_hi)[..., None, None])
    return ok


def prepare(table: Array, x_len, y_len, band, fill) -> tuple:
    """Shared front end of the soft-DTW and GAK recursions.

    ``table: float[..., n, m]`` (costs or log-kernels), lengths ``int[...]`` or ``None``,
    ``band = (dlo, dhi)`` bounds on ``j - i`` (ints, or arrays broadcasting to ``[...]``).
    Fills invalid cells with ``fill``, puts the shorter side on the rows and the pairs last,
    skews, and returns ``(S [T, n, B], t_end [B], i_end [B], plan, finish)``: pair ``b`` ends on
    diagonal ``t_end[b]`` at row ``i_end[b]``; ``finish`` maps a per-pair ``[B]`` result back to
    ``[...]`` and a ``[T, n, B]`` table to ``[..., n, m]``.
    """
    *lead, n, m = table.shape
    lead = tuple(lead)
    static_band = band is not None and all(isinstance(v, (int, np.integer)) for v in band)
    ok = validity(n, m, x_len, y_len, *(band if band is not None else (None, None)))
    if ok is not None:
        table = jnp.where(ok, table, fill)
    nl = jnp.broadcast_to(jnp.asarray(n if x_len is None else x_len, jnp.int32), lead)
    ml = jnp.broadcast_to(jnp.asarray(m if y_len is None else y_len, jnp.int32), lead)
    b = int(np.prod(lead))
    table, nl, ml = table.reshape(b, n, m), nl.reshape(b), ml.reshape(b)
    plan_band = (int(band[0]), int(band[1])) if static_band else None
    swap = n > m  # the diagonal runs along the shorter side: less skew padding
    if swap:
        nl, ml, n, m = ml, nl, m, n
        plan_band = None if plan_band is None else (-plan_band[1], -plan_band[0])
    table = jnp.transpose(table, (2, 1, 0) if swap else (1, 2, 0))    # [n, m, B]
    chunks = MAX_CHUNKS if b * n * m >= MIN_CELLS_TO_CHUNK else 1
    plan = plan_chunks(n, m, plan_band, max_chunks=chunks)

    def finish(v):
        if v.ndim == 1:
            return v.reshape(lead)
        v = unskew(v, m)                                                # [n, m, B]
        v = jnp.transpose(v, (2, 1, 0) if swap else (2, 0, 1))
        return v.reshape(lead + v.shape[1:])

    return skew(table, fill), nl + ml - 2, nl - 1, plan, finish


# ---- per-chunk views -------------------------------------------------------------------------

def chunk_view(st: Array, ch: Chunk) -> Array:
    """``[T, n, B]`` -> the chunk's scan inputs ``[t1-t0, width, B]``."""
    return st[ch.t0:ch.t1, ch.a:ch.b]


def assemble(parts: Sequence[Array], plan: Plan) -> Array:
    """Per-chunk scan outputs ``[t1-t0, width, B]`` -> ``[T, n, B]`` (zero outside windows)."""
    return jnp.concatenate([jnp.pad(p, ((0, 0), (ch.a, plan.n - ch.b), (0, 0)))
                            for p, ch in zip(parts, plan.chunks)], axis=0)


def rewindow(v: Array, old: Chunk, new: Chunk, fill, ext: int = 0) -> Array:
    """Moves a carried diagonal ``[ext + width, ...]`` from the rows of ``old`` to those of
    ``new``; rows ``old`` did not hold get ``fill`` (invalid cells, by construction)."""
    oa, na = old.a - ext, new.a - ext
    lo, hi = max(oa, na), min(old.b, new.b)
    if lo >= hi:
        return jnp.full((new.b - na,) + v.shape[1:], fill, v.dtype)
    pad = [(lo - na, new.b - hi)] + [(0, 0)] * (v.ndim - 1)
    return jnp.pad(v[lo - oa: hi - oa], pad, constant_values=fill)


def pad_front(v: Array, fill) -> Array:
    """``[W, B] -> [W+1, B]`` with a ``fill`` row in front: a diagonal in the ext layout."""
    return jnp.pad(v, ((1, 0), (0, 0)), constant_values=fill)


def shift_up(v: Array) -> Array:
    """``out[i] = v[i+1]``, zero in the last row."""
    return jnp.pad(v[1:], ((0, 1), (0, 0)))


def take_rows(v: Array, idx: Array) -> Array:
    """``v[idx[b], b]`` for ``v: [W, B]``, ``idx: int[B]`` (clipped to the window)."""
    idx = jnp.clip(idx, 0, v.shape[0] - 1)
    return jnp.take_along_axis(v, idx[None, :], axis=0)[0]


def end_onehot(ch: Chunk, i_end: Array, dtype) -> Array:
    """``float[width, B]``: 1 at each pair's end row inside the chunk's window."""
    return (jnp.arange(ch.a, ch.b)[:, None] == i_end[None, :]).astype(dtype)


# ---- the sweep -------------------------------------------------------------------------------

def sweep(step: Callable, windowed: tuple, rest, xs: Callable[[Chunk], object], plan: Plan,
          fills: tuple, exts: tuple, *, reverse: bool = False):
    """Runs ``step`` over every diagonal of ``plan``, one ``lax.scan`` per chunk.

    ``step(chunk, (windowed, rest), x) -> ((windowed, rest), y)``; ``windowed`` is a tuple of
    carried diagonals ``[ext + width, B]`` (re-windowed between chunks with ``fills``),
    ``rest`` any other carry; ``xs(chunk)`` gives the chunk's scan inputs. The initial
    ``windowed`` must fit the first chunk swept (the last one when ``reverse``). Returns the
    final carries and the per-chunk outputs in diagonal order.
    """
    order = list(plan.chunks)[::-1] if reverse else list(plan.chunks)
    ys, prev = [], None
    for ch in order:
        if prev is not None:
            windowed = tuple(rewindow(w, prev, ch, f, e) for w, f, e in zip(windowed, fills, exts))
        (windowed, rest), y = jax.lax.scan(lambda c, x, ch=ch: step(ch, c, x), (windowed, rest),
                                           xs(ch), reverse=reverse, unroll=1)
        ys.append(y)
        prev = ch
    return windowed, rest, (ys[::-1] if reverse else ys)
