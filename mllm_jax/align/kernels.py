"""Local costs / kernels between the elements of two sequences, and the Sugar target kernels.

Every local function comes in two shapes:
- batched: ``x: float[..., n, d]``, ``y: float[..., m, d]`` (same leading dims) -> ``float[..., n, m]``;
- pairwise (``pairwise=True``): ``x: float[P, n, d]``, ``y: float[Q, m, d]`` -> ``float[P, Q, n, m]``,
  one matrix product over all pairs (the inputs are never copied P x Q times).

The Gaussian-type kernel is tslearn's GAK local kernel (Cuturi 2011),
``k(a, b) = exp(-phi(a, b))``, ``phi = |a-b|^2 / (2 sigma^2) + log(2 - exp(-|a-b|^2 / (2 sigma^2)))``,
so our GAK values are directly comparable with ``tslearn.metrics.gak``.

The *triple kernel* (METHODS.md section 1, "Target similarity") builds Sugar's target
similarity matrix from several frozen teachers: the local kernel between two slices switches on
their modalities (image-image on image features, text-text on text features, image-text on the
shared space) and the target for two samples is the normalised GAK of their slice sequences.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

TEXT, IMAGE = 0, 1  # slice modality codes used by ``triple_kernel``


# ---- costs -----------------------------------------------------------------------------------

def _dots(x: Array, y: Array, pairwise: bool, pairs_last: bool) -> Array:
    if pairwise:  # [n, P, m, Q] is what one matrix product gives; a Q-block swap gives pairs last
        (p, n, d), (q, m) = x.shape, y.shape[:2]
        # one plain 2-D product of the (small) element-major inputs, so that its output is
        # [n P, m Q] as is (an einsum lets XLA pick a [m Q, n P] product and a scattered 4-D
        # transpose of the large output, ~2x slower on CPU, in both directions)
        a = jnp.swapaxes(x, 0, 1).reshape(n * p, d)
        b = jnp.swapaxes(y, 0, 1).reshape(m * q, d)
        dots = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ()))).reshape(n, p, m, q)
        return jnp.swapaxes(dots, 1, 2) if pairs_last else jnp.transpose(dots, (1, 3, 0, 2))
    if not pairs_last:
        return jnp.einsum("...id,...jd->...ij", x, y)
    # [..., n, m] from an explicit batched product, then moved pairs-last: an einsum straight
    # to [n, m, ...] lets XLA pick a [..., m, n] product, whose transpose reads the large
    # output against its grain (~2x slower on CPU)
    lead = jnp.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    x = jnp.broadcast_to(x, lead + x.shape[-2:])
    y = jnp.broadcast_to(y, lead + y.shape[-2:])
    xb, yb = x.reshape((-1,) + x.shape[-2:]), y.reshape((-1,) + y.shape[-2:])
    dots = jax.lax.dot_general(xb, yb, (((2,), (2,)), ((0,), (0,))))
    return jnp.moveaxis(dots, 0, -1).reshape(dots.shape[1:] + lead)


def _outer_sum(a: Array, b: Array, pairwise: bool, pairs_last: bool) -> Array:
    """``a: [..., n]``, ``b: [..., m]`` -> ``a_i + b_j`` in the layout of ``_dots``."""
    if pairwise and pairs_last:
        return a.T[:, None, :, None] + b.T[None, :, None, :]
    if pairwise:
        return a[:, None, :, None] + b[None, :, None, :]
    if pairs_last:
        return jnp.moveaxis(a, -1, 0)[:, None] + jnp.moveaxis(b, -1, 0)[None, :]
    return a[..., :, None] + b[..., None, :]


def sqeuclidean(x: Array, y: Array, pairwise: bool = False, pairs_last: bool = False) -> Array:
    """Squared Euclidean distances ``|x_i - y_j|^2`` (``|x|^2 + |y|^2 - 2 x.y``, clipped at 0).

    ``pairs_last`` (internal layout of the alignment sweeps): ``[n, m, ...]`` instead of
    ``[..., n, m]``."""
    d = (_outer_sum(jnp.sum(x * x, -1), jnp.sum(y * y, -1), pairwise, pairs_last)
         - 2 * _dots(x, y, pairwise, pairs_last))
    return jnp.maximum(d, 0)


def cosine_distance(x: Array, y: Array, pairwise: bool = False, pairs_last: bool = False,
                    eps: float = 1e-12) -> Array:
    """``1 - cos(x_i, y_j)``, in ``[0, 2]``."""
    xn = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps))
    yn = y * jax.lax.rsqrt(jnp.maximum(jnp.sum(y * y, -1, keepdims=True), eps))
    return 1 - _dots(xn, yn, pairwise, pairs_last)


def gak_log_kernel_of_z(z: Array) -> Array:
    """tslearn's GAK log local kernel of ``z = |a-b|^2 / (2 sigma^2)``: ``-z - log(2 - e^-z)``
    (tslearn's own formula, so rounding matches too)."""
    return -z - jnp.log(2 - jnp.exp(-z))


def gak_log_kernel_from_sqdist(sqdist: Array, sigma) -> Array:
    """``log k = -phi_sigma`` from squared distances (tslearn's GAK local kernel)."""
    return gak_log_kernel_of_z(sqdist / (2 * jnp.square(sigma)))


def gak_log_kernel(x: Array, y: Array, sigma, pairwise: bool = False,
                   pairs_last: bool = False) -> Array:
    """``log k_sigma(x_i, y_j)`` of tslearn's GAK (always ``<= 0``; ``k(a, a) = 1``)."""
    return gak_log_kernel_from_sqdist(sqeuclidean(x, y, pairwise, pairs_last), sigma)


def neg_log_kernel(x: Array, y: Array, sigma, pairwise: bool = False,
                   pairs_last: bool = False) -> Array:
    """``phi_sigma = -log k_sigma``: the negative log Gaussian (GAK) kernel as a soft-DTW cost.

    With this cost and ``gamma = 1``, ``softdtw = -log(unnormalised GAK)``.
    """
    return -gak_log_kernel(x, y, sigma, pairwise, pairs_last)


COSTS = ("sqeuclidean", "cosine", "neg_log_kernel")


def cost_matrix(x: Array, y: Array, cost: str | Callable = "sqeuclidean", *,
                pairwise: bool = False, sigma=None, pairs_last: bool = False) -> Array:
    """The local cost matrix for soft-DTW: ``float[..., n, m]`` (or ``[P, Q, n, m]``; with
    ``pairs_last``, ``[n, m, ...]``).

    ``cost`` is one of ``COSTS`` or a callable ``cost(x, y, pairwise) -> [..., n, m]`` (or
    ``[P, Q, n, m]``). ``neg_log_kernel`` needs ``sigma``.
    """
    if callable(cost):
        c = cost(x, y, pairwise)
        return jnp.moveaxis(c, (-2, -1), (0, 1)) if pairs_last else c
    if cost == "sqeuclidean":
        return sqeuclidean(x, y, pairwise, pairs_last)
    if cost == "cosine":
        return cosine_distance(x, y, pairwise, pairs_last)
    if cost == "neg_log_kernel":
        if sigma is None:
            raise ValueError("cost='neg_log_kernel' needs sigma= (the Gaussian bandwidth)")
        return neg_log_kernel(x, y, sigma, pairwise, pairs_last)
    raise ValueError(f"unknown cost {cost!r}: expected one of {COSTS} or a callable")


def sigma_gak(x: Array, mask: Array | None = None) -> Array:
    """tslearn's ``sigma_gak`` bandwidth heuristic, deterministic: the median Euclidean distance
    between all (valid) elements of the data set ``x: float[N, T, d]``, times ``sqrt(T)``.

    tslearn draws a random subsample; with all points drawn its value equals this one.
    Eager only (the median over a variable set of points is not jit-friendly).
    """
    x = np.asarray(x, np.float64)
    n, t, d = x.shape
    pts = x.reshape(-1, d)
    if mask is not None:
        pts = pts[np.asarray(mask, bool).reshape(-1)]
    sq = np.sum(pts * pts, 1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * pts @ pts.T, 0))
    iu = np.triu_indices(len(pts), 1)
    return float(np.median(dist[iu]) * np.sqrt(t))


# ---- Sugar target kernels --------------------------------------------------------------------

def _normalise(v: Array, eps: float = 1e-12) -> Array:
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, -1, keepdims=True), eps))


def triple_log_kernel(features: Mapping[str, Array], modality: Array,
                      sigma: float | Mapping[str, float] = 0.5) -> Array:
    """Pairwise local log-kernel between the slices of every two samples of a batch.

    Args:
      features: per-slice teacher features, each L2-normalised here:
        ``"image": float[B, S, Di]`` (e.g. DINOv2 + CLIP image, concatenated),
        ``"text": float[B, S, Dt]`` (e.g. BGE + CLIP text),
        ``"shared": float[B, S, Ds]`` (a space where images and texts are comparable, e.g. CLIP).
        Rows of slices of the other modality are ignored (fill them with anything finite).
      modality: ``int[B, S]``, ``IMAGE`` (1) or ``TEXT`` (0) per slice.
      sigma: bandwidth of the GAK local kernel on unit vectors, one for all spaces or per space.

    Returns:
      ``float[B, B, S, S]``: ``log k`` of image-image pairs on ``"image"``, text-text on
      ``"text"``, image-text on ``"shared"``.
    """
    missing = {"image", "text", "shared"} - set(features)
    if missing:
        raise ValueError(f"triple_log_kernel: features is missing {sorted(missing)}; "
                         f"got {sorted(features)} (need 'image', 'text' and 'shared')")
    sig = {k: (sigma[k] if isinstance(sigma, Mapping) else sigma) for k in features}
    logk = {k: gak_log_kernel(_normalise(v), _normalise(v), sig[k], pairwise=True)
            for k, v in features.items() if k in ("image", "text", "shared")}
    img = modality == IMAGE
    both_img = img[:, None, :, None] & img[None, :, None, :]
    both_txt = ~img[:, None, :, None] & ~img[None, :, None, :]
    return jnp.where(both_img, logk["image"], jnp.where(both_txt, logk["text"], logk["shared"]))


def triple_kernel(features: Mapping[str, Array], modality: Array, mask: Array,
                  sigma: float | Mapping[str, float] = 0.5, triangular: int = 0,
                  normalize: bool = True) -> Array:
    """Sugar's target similarity matrix ``float[B, B]``: the (normalised) global alignment kernel
    between the slice sequences of every two samples, with the modality-switched local kernel
    of ``triple_log_kernel``. ``mask: bool[B, S]`` marks the valid slices (a prefix per sample).

    Symmetric; with ``normalize`` the diagonal is 1 and entries lie in ``[0, 1]``.
    """
    from mllm_jax.align.gak import gak_from_log_kernel, lengths_from_mask  # no import cycle

    logk = triple_log_kernel(features, modality, sigma)
    length = lengths_from_mask(mask, mask.shape[1], "mask")
    log_kxy = gak_from_log_kernel(logk, length[:, None], length[None, :], triangular)
    if not normalize:
        return jnp.exp(log_kxy)
    diag = jnp.diagonal(log_kxy)
    return jnp.exp(log_kxy - 0.5 * (diag[:, None] + diag[None, :]))


def pooled_cosine(features: Array, mask: Array) -> Array:
    """The simple alternative target: cosine similarity of the masked mean of each sample's slice
    features (``features: float[B, S, D]``, ``mask: bool[B, S]``) -> ``float[B, B]``."""
    w = mask.astype(features.dtype)[..., None]
    pooled = jnp.sum(features * w, 1) / jnp.maximum(jnp.sum(w, 1), 1)
    p = _normalise(pooled)
    return p @ p.T
