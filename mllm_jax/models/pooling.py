"""Pooling of hidden-state sequences into embeddings: masked mean, last token, slices.

All functions are pure, shape-static and jit/vmap friendly; masks are ``int/bool[B, T]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def mean_pool(hidden: Array, mask: Array) -> Array:
    """Masked mean over time (sentence-transformers' mean pooling).

    ``hidden: float[B, T, D]``, ``mask: int/bool[B, T]`` -> ``float[B, D]``; a row with no valid
    token gives zeros.
    """
    m = mask.astype(hidden.dtype)[..., None]
    total = jnp.sum(hidden * m, axis=1)
    count = jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    return total / count


def last_token_pool(hidden: Array, mask: Array) -> Array:
    """Hidden state of each row's last valid token (works for left or right padding).

    ``hidden: float[B, T, D]``, ``mask: int/bool[B, T]`` -> ``float[B, D]``.
    """
    t = hidden.shape[1]
    idx = jnp.max(jnp.where(mask.astype(bool), jnp.arange(t)[None, :], -1), axis=1)
    idx = jnp.maximum(idx, 0)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def pool(hidden: Array, mask: Array, method: str = "mean") -> Array:
    """``method``: ``mean`` (masked mean), ``last`` (last valid token) or ``prompt`` (the last
    token of a summary prompt that ends the sequence, E5-V / VladVA style; same as ``last``)."""
    if method == "mean":
        return mean_pool(hidden, mask)
    if method in ("last", "prompt"):
        return last_token_pool(hidden, mask)
    raise ValueError(f"pooling method {method!r}: expected 'mean', 'last' or 'prompt'")


def slice_pool(hidden: Array, slice_ids: Array, slice_is_image: Array, num_slices: int) -> Array:
    """Sugar's slice embeddings: the mean over an image slice's tokens, the last token of a text slice.

    ``hidden: float[B, T, D]``; ``slice_ids: int[B, T]`` (0 = no slice, s >= 1 = slice s-1);
    ``slice_is_image: bool[B, S]`` -> ``float[B, S, D]`` (S = ``num_slices``; empty slices are 0).
    """
    t = hidden.shape[1]
    onehot = slice_ids[..., None] == jnp.arange(1, num_slices + 1)[None, None, :]       # [B, T, S]
    oh = onehot.astype(hidden.dtype)
    count = jnp.maximum(jnp.sum(oh, axis=1), 1.0)                                      # [B, S]
    mean = jnp.einsum("bts,btd->bsd", oh, hidden) / count[..., None]
    last_idx = jnp.max(jnp.where(onehot, jnp.arange(t)[None, :, None], -1), axis=1)  # [B, S]
    last = jnp.take_along_axis(hidden, jnp.maximum(last_idx, 0)[..., None], axis=1)   # [B, S, D]
    last = jnp.where((last_idx >= 0)[..., None], last, 0.0)
    return jnp.where(slice_is_image[..., None], mean, last)


__all__ = ["mean_pool", "last_token_pool", "pool", "slice_pool"]
