"""Masked next-token cross-entropy (answer tokens only) with an optional z-loss."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array
NTP_DENOMINATOR = "ntp_denominator"   # batch key set by gradient accumulation (see train/loop.py)


def next_token_loss(logits: Array, labels: Array, loss_mask: Array, *, z_loss: float = 0.0,
                    denominator: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
    """Mean cross-entropy over the positions where ``loss_mask`` is 1.

    ``logits: float[B, T, V]`` (prediction at t of token t+1), ``labels: int[B, T]``
    (``labels[t] = input_ids[t+1]``), ``loss_mask: int/bool[B, T]``. The mean is over all masked
    tokens of the (global) batch, so a sharded batch gives the same value as an unsharded one.
    ``z_loss`` adds ``z_loss * mean(logsumexp(logits)^2)`` over the same tokens (PaLM).
    ``denominator`` replaces this batch's token count as the divisor: gradient accumulation
    passes the whole batch's count / micro-batches (``NTP_DENOMINATOR`` in the batch), so that
    the mean over micro-batches is the whole batch's token mean.

    Returns ``(loss, parts)`` with parts ``ntp`` (the cross-entropy), ``z_loss`` and
    ``ntp_tokens`` (the token count).
    """
    logits = logits.astype(jnp.float32)
    mask = loss_mask.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    # labels at masked positions are never read: an ignore value there (HF's -100, or any id
    # outside the vocabulary) made the gather fill NaN, and NaN * 0 made the whole loss NaN
    labels = jnp.where(mask > 0, labels.astype(jnp.int32), 0)
    target = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    n = jnp.maximum(mask.sum(), 1.0) if denominator is None else denominator.astype(jnp.float32)
    ce = jnp.sum((lse - target) * mask) / n
    parts = {"ntp": ce, "ntp_tokens": mask.sum()}
    loss = ce
    if z_loss:
        z = jnp.sum(jnp.square(lse) * mask) / n
        parts["z_loss"] = z
        loss = loss + z_loss * z
    return loss, parts


__all__ = ["NTP_DENOMINATOR", "next_token_loss"]
