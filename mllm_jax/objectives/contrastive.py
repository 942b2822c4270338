"""Contrastive losses between two batches of embeddings: InfoNCE and SigLIP, dense and chunked.

Both take L2-normalised embeddings ``a, b: float[B, D]`` where ``(a[i], b[i])`` are positives and
every other pair is a negative, plus the learned scalars (a log-temperature; SigLIP's bias).

- Dense forms build the whole ``[B, B]`` logit matrix.
- Chunked forms stream over column blocks of ``chunk`` rows of ``b`` with a running
  log-sum-exp (InfoNCE) or running sum (SigLIP), with the chunk body rematerialised in the
  backward pass, so memory is O(B * chunk) instead of O(B^2); they equal the dense forms.
- ``valid: bool[B]`` (optional) marks real rows; padding rows (an epoch's padded last batch)
  are neither queries nor keys, and the means are over the real rows: the loss equals the loss
  of the real rows alone.
- Data-parallel: under ``jit`` with ``a``/``b`` sharded over the batch axes, XLA all-gathers
  the embeddings (never the logits) for the similarity matrix, so a sharded batch gives the
  global-batch loss, as big_vision's contrastive trainer does with an explicit all_gather.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


_MASKED = -1e30   # the logit of a pair with a padding row: exp() underflows to 0, stays finite


def _logits(a: Array, b: Array, log_scale: Array) -> Array:
    return jnp.exp(log_scale) * jnp.einsum("id,jd->ij", a.astype(jnp.float32), b.astype(jnp.float32))


def _valid(valid: Array | None, n: int) -> Array:
    return jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)


def _row_mean(x: Array, valid: Array) -> Array:
    """Mean of ``x`` over the real rows (0 where there are none)."""
    return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


def infonce_dense(a: Array, b: Array, log_scale: Array, valid: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Symmetric InfoNCE (CLIP): mean of the a->b and b->a cross-entropies with diagonal targets.

    ``log_scale``: log of the inverse temperature (CLIP initialises it at log(1/0.07)).
    """
    v = _valid(valid, a.shape[0])
    z = _logits(a, b, log_scale)
    diag = jnp.diagonal(z)
    z = jnp.where(v[:, None] & v[None, :], z, _MASKED)
    a2b = _row_mean(jax.nn.logsumexp(z, axis=1) - diag, v)
    b2a = _row_mean(jax.nn.logsumexp(z, axis=0) - diag, v)
    acc = _row_mean((jnp.argmax(z, axis=1) == jnp.arange(z.shape[0])).astype(jnp.float32), v)
    return 0.5 * (a2b + b2a), {"infonce_a2b": a2b, "infonce_b2a": b2a, "contrastive_acc": acc}


def _chunks(x: Array, chunk: int) -> Array:
    n = x.shape[0]
    if n % chunk:
        raise ValueError(f"chunked contrastive loss: batch {n} is not a multiple of chunk {chunk}")
    return x.reshape(n // chunk, chunk, *x.shape[1:])


def _streaming_lse(q: Array, keys: Array, log_scale: Array, chunk: int, valid: Array) -> Array:
    """``logsumexp_j exp(s) q_i . k_j`` over the real keys j for every i, streaming over key
    chunks: ``float32[B]``."""
    @jax.checkpoint
    def body(carry, xs):
        m, s = carry
        kc, vc = xs
        z = jnp.where(vc[None, :], _logits(q, kc, log_scale), _MASKED)      # [B, chunk]
        m_new = jnp.maximum(m, z.max(axis=1))
        s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[:, None]).sum(axis=1)
        return (m_new, s), None

    n = q.shape[0]
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
    (m, s), _ = jax.lax.scan(body, init, (_chunks(keys, chunk), _chunks(valid, chunk)))
    return m + jnp.log(s)


def infonce_chunked(a: Array, b: Array, log_scale: Array, chunk: int = 128, valid: Array | None = None
                    ) -> tuple[Array, dict[str, Array]]:
    """``infonce_dense`` in O(B * chunk) memory (same value and gradients)."""
    v = _valid(valid, a.shape[0])
    diag = jnp.exp(log_scale) * jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=-1)
    a2b = _row_mean(_streaming_lse(a, b, log_scale, chunk, v) - diag, v)
    b2a = _row_mean(_streaming_lse(b, a, log_scale, chunk, v) - diag, v)
    return 0.5 * (a2b + b2a), {"infonce_a2b": a2b, "infonce_b2a": b2a}


def siglip_dense(a: Array, b: Array, log_scale: Array, bias: Array, valid: Array | None = None
                 ) -> tuple[Array, dict[str, Array]]:
    """SigLIP's pairwise sigmoid loss: ``-1/B * sum_ij log sigmoid(z_ij * (t a_i.b_j + bias))``,
    ``z_ij = +1`` on the diagonal and -1 elsewhere (Zhai et al. 2023)."""
    v = _valid(valid, a.shape[0])
    z = _logits(a, b, log_scale) + bias
    labels = 2.0 * jnp.eye(z.shape[0], dtype=jnp.float32) - 1.0
    pairs = v[:, None] & v[None, :]
    loss = -jnp.sum(jnp.where(pairs, jax.nn.log_sigmoid(labels * z), 0.0)) / jnp.maximum(jnp.sum(v), 1)
    return loss, {"siglip": loss}


def siglip_chunked(a: Array, b: Array, log_scale: Array, bias: Array, chunk: int = 128,
                   valid: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """``siglip_dense`` in O(B * chunk) memory (same value and gradients)."""
    n = a.shape[0]
    v = _valid(valid, n)
    a32 = a.astype(jnp.float32)

    @jax.checkpoint
    def body(total, xs):
        bc, vc, start = xs
        z = _logits(a32, bc, log_scale) + bias                          # [B, chunk]
        labels = jnp.where(jnp.arange(n)[:, None] == start + jnp.arange(bc.shape[0])[None, :], 1.0, -1.0)
        pairs = v[:, None] & vc[None, :]
        return total + jnp.sum(jnp.where(pairs, jax.nn.log_sigmoid(labels * z), 0.0)), None

    starts = jnp.arange(0, n, chunk)
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (_chunks(b, chunk), _chunks(v, chunk), starts))
    loss = -total / jnp.maximum(jnp.sum(v), 1)
    return loss, {"siglip": loss}


def contrastive_loss(a: Array, b: Array, *, kind: str = "infonce", log_scale: Array, bias: Array | None = None,
                     chunk: int | None = None, valid: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Dispatch: ``kind`` in {infonce, siglip}; ``chunk`` None = dense; ``valid: bool[B]`` the
    real rows (None: all)."""
    if kind == "infonce":
        return infonce_dense(a, b, log_scale, valid) if chunk is None else infonce_chunked(a, b, log_scale, chunk, valid)
    if kind == "siglip":
        if bias is None:
            raise ValueError("siglip loss needs a bias")
        return siglip_dense(a, b, log_scale, bias, valid) if chunk is None else \
            siglip_chunked(a, b, log_scale, bias, chunk, valid)
    raise ValueError(f"contrastive kind {kind!r}: expected 'infonce' or 'siglip'")


__all__ = ["infonce_dense", "infonce_chunked", "siglip_dense", "siglip_chunked", "contrastive_loss"]
