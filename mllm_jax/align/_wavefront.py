"""Anti-diagonal ("wavefront") machinery shared by soft-DTW and the global alignment kernel.

Both recursions fill a table ``R[i, j]`` from ``R[i-1, j]``, ``R[i, j-1]`` and ``R[i-1, j-1]``,
so every cell of anti-diagonal ``t = i + j`` depends only on diagonals ``t-1`` and ``t-2``. We
sweep the ``n + m - 1`` diagonals with ``lax.scan``; each step updates a whole diagonal of every
pair of the batch at once.

Layout. The tables of a batch are kept in their natural order with the pairs last,
``C[i, j, b]`` (``[n, m, B]``, ``n <= m``), so XLA vectorises along the batch and the shifts
``i -> i - 1`` of the recursion are whole-row offsets. Diagonal ``t`` is read without any skewed
copy: cell ``(i, t - i)`` sits at flat row ``i (m - 1) + t`` of ``C.reshape(n m, B)``, so in
the view ``V = C.reshape(K, m - 1, B)`` (padded) diagonal ``t`` is the slab
``V[a + t // (m-1) : b + t // (m-1), t % (m-1)]``: one dynamic slice. Rows of the slab that
fall outside the table alias other cells and are masked. Gradients are accumulated the same way.

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
from typing import Callable, NamedTuple

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


# ---- windows ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Chunk:
    """Diagonals ``[t0, t1)`` swept over the rows ``[a, b)``."""
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
    """How to sweep an ``n x m`` table (``n <= m``): its chunks, in diagonal order, and the
    strided view ``[rows, stride, B]`` its diagonals are read from."""
    n: int
    m: int
    chunks: tuple[Chunk, ...]
    cols: int = 0  # columns the table is stored with (>= m: extra ones are never valid)

    @property
    def stride(self) -> int:
        return max(max(self.cols, self.m) - 1, 1)

    @property
    def rows(self) -> int:
        """Rows of the view: every slab ``[a + t // stride, b + t // stride)`` fits."""
        need = max((ch.t1 - 1) // self.stride + ch.b for ch in self.chunks)
        return max(need, -(-self.n * max(self.cols, self.m) // self.stride))


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

    def window(t0, t1):  # margins: the sweeps carry diagonals t-1, t-2 (forward), t+1, t+2
        lo, hi = max(0, t0 - 3), min(nt, t1 + 2)  # and load t-3 (backward)
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


class Limits(NamedTuple):
    """Per-pair bounds of the valid cells, in the swept orientation (rows = the shorter side).
    ``None`` fields mean "no constraint"."""
    t_end: Array               # int32[B]: diagonal of the pair's last cell
    i_end: Array               # int32[B]: its row
    nl: Array | None = None    # int32[B]: valid rows (padding beyond)
    ml: Array | None = None    # int32[B]: valid columns
    blo: Array | None = None   # int32[B]: band, lowest allowed j - i
    bhi: Array | None = None   # int32[B]: band, highest allowed j - i

    @property
    def ragged(self) -> bool:
        """Pairs end on different diagonals (so their values are picked up on the way)."""
        return self.nl is not None


@dataclasses.dataclass(frozen=True)
class Cells:
    """How the raw entries read from the table become what the recursion uses, inside the
    scan step (so that e.g. a Gaussian kernel's exp/log run on one diagonal at a time, in cache,
    and the table is produced by cheap elementwise code fused into its matrix product).

    ``f``: elementwise ``raw -> value`` (a module-level function, so that it hashes);
    ``kind``: ``"cost"`` (invalid cells ``+big``; ``log`` of the triangular weight subtracted)
    or ``"logk"`` (a log-kernel: invalid ``-big``, triangular weight added);
    ``tri``: Cuturi's triangular band ``T`` (0: none).
    """
    f: Callable
    kind: str = "cost"
    tri: int = 0


def identity(v):
    return v


def cell_mask(cells: Cells, plan: Plan, ch: Chunk, t: Array, lim: Limits, dtype):
    """Which cells of diagonal ``t`` (rows of the chunk's window) are valid, ``bool[width, B]``
    (or ``[width, 1]``), and the log triangular weights ``float[width, 1]`` (None when
    ``cells.tri == 0``)."""
    rows = jnp.arange(ch.a, ch.b, dtype=jnp.int32)[:, None]
    ok = in_table(plan, ch.a, ch.b, t)
    if lim.nl is not None:
        ok = ok & (rows < lim.nl[None]) & (t - rows < lim.ml[None])
    if lim.blo is not None:
        diff = t - 2 * rows                                 # j - i
        ok = ok & (diff >= lim.blo[None]) & (diff <= lim.bhi[None])
    if not cells.tri:
        return ok, None
    dist = jnp.abs(t - 2 * rows)                            # |i - j|
    logw = jnp.log1p(-jnp.minimum(dist, cells.tri - 1).astype(dtype) / cells.tri)
    return ok & (dist < cells.tri), logw


def cell_values(cells: Cells, plan: Plan, ch: Chunk, t: Array, raw: Array,
                lim: Limits) -> Array:
    """The table entries of diagonal ``t`` inside the window of ``ch`` (``raw`` from
    ``diagonal``): ``float[width, B]``, invalid cells (outside the table, the lengths or the
    band) set to ``+big`` for costs, ``-big`` for log-kernels."""
    v = cells.f(raw)
    ok, logw = cell_mask(cells, plan, ch, t, lim, v.dtype)
    if logw is not None:
        v = v + (logw if cells.kind == "logk" else -logw)
    return jnp.where(ok, v, big(v.dtype) if cells.kind == "cost" else -big(v.dtype))


def cell_slope(cells: Cells, raw: Array) -> Array | None:
    """``d f / d raw`` elementwise (None for the identity)."""
    if cells.f is identity:
        return None
    return jax.jvp(cells.f, (raw,), (jnp.ones_like(raw),))[1]


def prepare(table: Array, x_len, y_len, band, fill, pairs_last: bool = False,
            plan_band: tuple[int, int] | None = None, m_valid: int | None = None) -> tuple:
    """Shared front end of the soft-DTW and GAK recursions.

    ``table: float[..., n, m]`` (or ``float[n, m, ...]`` with ``pairs_last``, the layout the
    sweep wants: the pairwise costs are built that way to skip a scattered transpose): raw
    entries, mapped by ``Cells.f`` inside the sweep. Lengths ``int[...]`` or ``None``,
    ``band = (dlo, dhi)`` bounds on ``j - i`` (ints, or arrays broadcasting to ``[...]``),
    ``fill``: a raw value that ``Cells.f`` maps to an invalid entry; ``plan_band``: a static band
    that only narrows the swept windows (``band`` masks cells); ``m_valid``: the table's true
    number of columns when it carries extra dummy ones (with ``n == m_valid``, one dummy column
    makes the strided view a plain reshape, saving a copy). Puts the shorter side on
    the rows and the pairs last, and returns ``(view, limits, plan, finish)``: ``view`` is the
    strided ``[rows, stride, B]`` view of the table the sweep reads diagonals from, ``finish``
    maps a per-pair ``[B]`` result back to ``[...]``.
    """
    if pairs_last:
        n, m, *lead = table.shape
    else:
        *lead, n, m = table.shape
    lead = tuple(lead)
    b = int(np.prod(lead))
    cols = m
    m = cols if m_valid is None else m_valid
    if m_valid is not None and n > m_valid:
        raise ValueError(f"dummy columns need n <= m_valid, got n={n}, m_valid={m_valid}")

    def flat(v, default):
        if v is None:
            return None if default is None else jnp.full((b,), default, jnp.int32)
        return jnp.broadcast_to(jnp.asarray(v, jnp.int32), lead).reshape(b)

    ragged = x_len is not None or y_len is not None
    nl, ml = flat(x_len, n if ragged else None), flat(y_len, m if ragged else None)
    blo, bhi = (None, None) if band is None else (flat(band[0], None), flat(band[1], None))
    if band is not None and all(isinstance(v, (int, np.integer)) for v in band):
        plan_band = (int(band[0]), int(band[1]))
    swap = n > m  # the diagonal runs along the shorter side: shorter slabs, fewer steps
    if pairs_last:
        table = table.reshape(n, cols, b)
        if swap:
            table = jnp.swapaxes(table, 0, 1)
    else:
        table = jnp.transpose(table.reshape(b, n, cols), (2, 1, 0) if swap else (1, 2, 0))
    if swap:
        nl, ml, n, m, cols = ml, nl, m, n, n
        blo, bhi = (None, None) if band is None else (-bhi, -blo)
        plan_band = None if plan_band is None else (-plan_band[1], -plan_band[0])
    if ragged:
        t_end, i_end = nl + ml - 2, nl - 1
    else:
        t_end, i_end = jnp.full((b,), n + m - 2, jnp.int32), jnp.full((b,), n - 1, jnp.int32)
    chunks = MAX_CHUNKS if b * n * m >= MIN_CELLS_TO_CHUNK else 1
    plan = dataclasses.replace(plan_chunks(n, m, plan_band, max_chunks=chunks), cols=cols)

    def finish(v):
        return v.reshape(lead)

    return table_view(table, plan, fill), Limits(t_end, i_end, nl, ml, blo, bhi), plan, finish


def pad_square(y: Array, n: int):
    """For ``n == m`` tables: ``y: [..., m, d]`` with one extra zero element, and ``m``, so that
    the table is built with ``m + 1`` columns and the strided view needs no padded copy
    (``prepare(..., m_valid=m)``). Otherwise ``(y, None)``."""
    if y.shape[-2] != n:
        return y, None
    return jnp.pad(y, [(0, 0)] * (y.ndim - 2) + [(0, 1), (0, 0)]), n


# ---- reading and writing diagonals -------------------------------------------------------------

def table_view(table: Array, plan: Plan, fill) -> Array:
    """``float[n, cols, B]`` -> the strided view ``float[rows, stride, B]`` (a plain reshape
    when the sizes match, else padded with ``fill``)."""
    n, cols, b = table.shape
    flat = table.reshape(n * cols, b)
    extra = plan.rows * plan.stride - n * cols
    if extra:
        flat = jnp.pad(flat, ((0, extra), (0, 0)), constant_values=fill)
    return flat.reshape(plan.rows, plan.stride, b)


def _slab_start(plan: Plan, a: int, t: Array):
    t = jnp.asarray(t, jnp.int32)
    return (a + t // plan.stride, t % plan.stride, jnp.zeros((), jnp.int32))


def in_table(plan: Plan, a: int, b: int, t: Array) -> Array:
    """``bool[b - a, 1]``: rows ``[a, b)`` of diagonal ``t`` that are cells of the table."""
    rows = jnp.arange(a, b, dtype=jnp.int32)[:, None]
    return (t - rows >= 0) & (t - rows < plan.m)


def diagonal(view: Array, plan: Plan, ch: Chunk, t: Array) -> Array:
    """Entries ``(i, t - i)`` for the rows ``i`` of the chunk's window: ``float[width, B]``
    (rows outside the table hold other cells' entries: mask them with ``in_table``)."""
    return jax.lax.dynamic_slice(view, _slab_start(plan, ch.a, t),
                                 (ch.width, 1, view.shape[2]))[:, 0]


def diagonal_ext(view: Array, plan: Plan, ch: Chunk, t: Array, fill) -> Array:
    """Rows ``[a - 1, b)`` of diagonal ``t`` (the ext layout), ``fill`` outside the table."""
    if ch.a == 0:
        v = pad_front(diagonal(view, plan, ch, jnp.maximum(t, 0)), fill)
    else:
        v = jax.lax.dynamic_slice(view, _slab_start(plan, ch.a - 1, jnp.maximum(t, 0)),
                                  (ch.width + 1, 1, view.shape[2]))[:, 0]
    return jnp.where(in_table(plan, ch.a - 1, ch.b, t), v, fill)


def write_diagonal(view: Array, plan: Plan, ch: Chunk, t: Array, new: Array) -> Array:
    """``view`` with the cells of diagonal ``t`` in the window set to ``new``; rows outside the
    table alias other cells and keep their values (read-modify-write of the slab)."""
    start = _slab_start(plan, ch.a, t)
    old = jax.lax.dynamic_slice(view, start, (ch.width, 1, view.shape[2]))[:, 0]
    v = jnp.where(in_table(plan, ch.a, ch.b, t), new, old)
    return jax.lax.dynamic_update_slice(view, v[:, None], start)


def add_diagonal(view: Array, plan: Plan, ch: Chunk, t: Array, g: Array) -> Array:
    """``view`` with ``g: float[width, B]`` added to the entries of diagonal ``t`` (``g`` must
    be zero on rows outside the table, which alias other cells)."""
    start = _slab_start(plan, ch.a, t)
    cur = jax.lax.dynamic_slice(view, start, (ch.width, 1, view.shape[2]))
    return jax.lax.dynamic_update_slice(view, cur + g[:, None], start)


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
