"""Sugar's structure-induced loss (METHODS.md §1).

For a batch of samples, each a sequence of slices (an image, or a span of text):

    S_model[i, j]  = similarity of the MLLM's slice-embedding sequences of samples i and j
                     (normalised GAK by default; soft-DTW divergence; pooled cosine for the ablation)
    S_target[i, j] = the "triple kernel": normalised GAK over the two samples' slice sequences
                     with a local kernel that switches by modality pair over teacher features
                     (image-image on image features, text-text on text features, image-text on a
                     shared space), or a subset of teachers (the scene-graph kernel alone = oracle)
    L_d            = mean over pairs i != j of valid samples of (S_model - S_target)^2

The target has no gradient (teachers are frozen); the loss reaches the MLLM through the slice
embeddings (and so through LoRA, the projector, ... whatever the optimiser trains).
"""
from __future__ import annotations

import logging
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from mllm_jax import align
from mllm_jax.config import StructureConfig

Array = jax.Array
log = logging.getLogger("mllm_jax.objectives")


def _l2(x: Array) -> Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


def _safe_mask(mask: Array) -> tuple[Array, Array]:
    """Rows without any slice get a dummy first slice (finite math); ``valid`` marks real rows."""
    mask = jnp.asarray(mask).astype(bool)
    valid = mask.any(axis=1)
    return mask.at[:, 0].set(mask[:, 0] | ~valid), valid


def model_similarity(emb: Array, mask: Array, cfg: StructureConfig) -> Array:
    """``emb: float[B, S, D]`` slice embeddings, ``mask: bool[B, S]`` (valid prefix) -> ``float32[B, B]``."""
    e = _l2(emb.astype(jnp.float32))
    m, _ = _safe_mask(mask)
    if cfg.alignment == "gak":
        return align.gak_pairwise(e, None, sigma=cfg.sigma, x_mask=m)
    if cfg.alignment == "softdtw":
        div = align.softdtw_divergence_pairwise(e, None, gamma=cfg.gamma, x_mask=m)
        return jnp.exp(-jnp.maximum(div, 0.0) / cfg.softdtw_scale)
    return align.pooled_cosine(e, m)


def _key(name: str) -> str:
    return f"teacher_{name}"


_warned: set = set()


def _modality_features(batch: Mapping[str, Array], names, shared: Array, field: str) -> Array:
    """The features of one modality's local kernel: one teacher's, or (a list of names) the
    concatenation of each teacher's L2-normalised features (the triple kernel normalises the
    whole again, so each teacher weighs the same: the local kernel's squared distance is the
    mean of the teachers'). A single teacher missing from the batch falls back to the shared
    one (logged once); a missing teacher of a list is an error."""
    have = sorted(k for k in batch if k.startswith("teacher_"))
    if isinstance(names, str):
        if _key(names) in batch:
            return batch[_key(names)].astype(jnp.float32)
        if (field, names) not in _warned:
            _warned.add((field, names))
            log.warning("structure loss: objective.structure.%s=%r is not in the batch (teachers present: %s); "
                        "its pairs use the shared teacher's features", field, names, have)
        return shared
    missing = [n for n in names if _key(n) not in batch]
    if missing:
        raise KeyError(f"structure loss: objective.structure.{field}={list(names)} but the batch has no "
                       f"{[_key(n) for n in missing]} (teachers present: {have}); set data.teachers to include them")
    return jnp.concatenate([_l2(batch[_key(n)].astype(jnp.float32)) for n in names], axis=-1)


def target_similarity(batch: Mapping[str, Array], cfg: StructureConfig) -> Array:
    """The triple kernel over the batch's per-slice teacher features: ``float32[B, B]``.

    ``cfg.image_teacher`` / ``cfg.text_teacher`` name one teacher each or a list to concatenate
    (the paper's DINOv2 + CLIP image, BGE + CLIP text features). A single one missing from the
    batch falls back to the shared teacher (so ``scene_graph`` alone gives the oracle structure
    kernel); the shared teacher must be present.
    """
    if _key(cfg.shared_teacher) not in batch:
        have = sorted(k for k in batch if k.startswith("teacher_"))
        raise KeyError(f"structure loss: the batch has no {_key(cfg.shared_teacher)!r} (teachers present: {have}); "
                       "set data.teachers to include it")
    shared = batch[_key(cfg.shared_teacher)].astype(jnp.float32)
    feats = {"shared": shared,
             "image": _modality_features(batch, cfg.image_teacher, shared, "image_teacher"),
             "text": _modality_features(batch, cfg.text_teacher, shared, "text_teacher")}
    m, _ = _safe_mask(batch["slice_mask"])
    modality = batch["slice_is_image"].astype(jnp.int32)
    t = align.triple_kernel(feats, modality, m, sigma=cfg.target_sigma)
    return jax.lax.stop_gradient(t)


def structure_loss(emb: Array, batch: Mapping[str, Array], cfg: StructureConfig,
                   target: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
    """MSE between the model's and the target's similarity matrices over valid pairs ``i != j``.

    ``emb: float[B, S, D]`` slice embeddings of the batch's samples (``batch`` holds
    ``slice_mask``, ``slice_is_image`` and the ``teacher_*`` features). Returns ``(loss, parts)``
    with ``structure`` (the MSE), ``structure_corr`` (Pearson correlation of the off-diagonal
    entries: how well the model ranks pairs, for logging) and ``structure_pairs`` (the number of
    pairs the MSE is over).
    """
    s_model = model_similarity(emb, batch["slice_mask"], cfg)
    s_target = target_similarity(batch, cfg) if target is None else target
    _, valid = _safe_mask(batch["slice_mask"])
    b = s_model.shape[0]
    w = (valid[:, None] & valid[None, :] & ~jnp.eye(b, dtype=bool)).astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    mse = jnp.sum(w * jnp.square(s_model - s_target)) / n
    mu_m, mu_t = jnp.sum(w * s_model) / n, jnp.sum(w * s_target) / n
    dm, dt = (s_model - mu_m) * w, (s_target - mu_t) * w
    corr = jnp.sum(dm * dt) * jax.lax.rsqrt(jnp.maximum(jnp.sum(dm * dm) * jnp.sum(dt * dt), 1e-20))
    return mse, {"structure": mse, "structure_corr": jax.lax.stop_gradient(corr), "structure_pairs": w.sum()}


__all__ = ["StructureConfig", "model_similarity", "target_similarity", "structure_loss"]
