"""Samples -> embeddings -> similarity matrices, configured by ``EmbedConfig``.

    emb = Embedder(model, encoder, EmbedConfig(method="prompt"))     # VladVA / E5-V style
    sim = emb.similarity(emb.encode(images), emb.encode(captions))   # float32[N_img, N_cap]

    emb = Embedder(model, encoder, EmbedConfig(alignment="gak", sigma=1.0))   # Sugar style

* ``alignment="none"``: one vector per sample (``MLLM.embed``'s pooling: ``mean``, ``last``,
  or ``prompt`` = the summary-prompt view's last token), cosine similarity.
* ``alignment="gak" | "softdtw"``: the sample is rendered as a document and each segment
  becomes one Sugar slice embedding (``models.mllm.slice_embeddings``: image = mean of its
  tokens, text = its last token); two samples compare through ``sequence_similarity``, the one
  place that calls ``mllm_jax.align``.

Anything with ``cfg``, ``encode(samples) -> Embeddings`` and ``similarity(a, b)`` is an
embedder for the retrieval metrics; ``SceneGraphOracle`` is one that reads the scene world's
exact structure (no learning), used to check the retrieval plumbing.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.config import EmbedConfig
from mllm_jax.data.schema import Sample
from mllm_jax.eval.encode import BatchEncoder, document_view, prompt_view
from mllm_jax.models.mllm import slice_embeddings

ROW_CHUNK = 64        # rows of one all-pairs alignment call (fixed: one compile per column count)
_BATCH_KEYS = ("input_ids", "attention_mask", "positions", "pixel_values", "image_mask", "slice_ids",
               "slice_is_image")


@dataclasses.dataclass
class Embeddings:
    """What an embedder returns for N samples: pooled ``vectors: float32[N, D]`` (alignment
    ``none``) or slice sequences ``slices: float32[N, S, D]`` with ``slice_mask: bool[N, S]``
    (True on a prefix: the sample's segments in order)."""
    vectors: Optional[np.ndarray] = None
    slices: Optional[np.ndarray] = None
    slice_mask: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.vectors if self.vectors is not None else self.slices)

    def take(self, idx) -> "Embeddings":
        pick = lambda x: None if x is None else x[np.asarray(idx)]  # noqa: E731
        return Embeddings(pick(self.vectors), pick(self.slices), pick(self.slice_mask))


def _l2n(x, eps: float = 1e-6):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _pooled_cosine(a, mask_a, b, mask_b):
    """Cosine of the masked means of two sets of sequences -> ``float32[P, Q]``."""
    def mean(x, m):
        m = m.astype(x.dtype)[..., None]
        return _l2n((x * m).sum(-2) / jnp.maximum(m.sum(-2), 1.0))
    return mean(a, mask_a) @ mean(b, mask_b).T


def _align_fn(cfg: EmbedConfig):
    try:
        from mllm_jax import align
        fn = align.gak_pairwise if cfg.alignment == "gak" else align.softdtw_divergence_pairwise
    except (ImportError, AttributeError) as e:
        raise NotImplementedError(
            f"EmbedConfig(alignment={cfg.alignment!r}) needs mllm_jax.align.{cfg.alignment}_pairwise, which "
            f"is not available here ({type(e).__name__}: {e}); merge the alignment ops or use "
            "alignment='none'") from None
    if cfg.alignment == "gak":
        return lambda x, mx, y, my: fn(x, y, cfg.sigma, x_mask=mx, y_mask=my)        # normalised, [P, Q]
    # the soft-DTW divergence (as the structure loss uses): a distance -> similarity
    return lambda x, mx, y, my: -fn(x, y, cfg.gamma, x_mask=mx, y_mask=my)


@functools.lru_cache(maxsize=None)
def _jitted_similarity(cfg: EmbedConfig):
    if cfg.alignment == "none":
        return jax.jit(_pooled_cosine)
    return jax.jit(_align_fn(cfg))


def sequence_similarity(emb_a: np.ndarray, mask_a: np.ndarray, emb_b: np.ndarray, mask_b: np.ndarray,
                        cfg: EmbedConfig) -> np.ndarray:
    """All-pairs similarity of slice sequences ``emb_a: float[P, n, D]`` (``mask_a: bool[P, n]``,
    a prefix) and ``emb_b: float[Q, m, D]`` -> ``float32[P, Q]``.

    ``cfg.alignment``: ``gak`` -> ``mllm_jax.align.gak_pairwise(X, Y, sigma)`` (normalised GAK,
    in (0, 1]); ``softdtw`` -> ``-mllm_jax.align.softdtw_divergence_pairwise(X, Y, gamma)``; ``none`` -> the
    cosine of the masked mean slice embeddings. Rows go in chunks of ``ROW_CHUNK``."""
    emb_a, emb_b = np.asarray(emb_a, np.float32), np.asarray(emb_b, np.float32)
    mask_a, mask_b = np.asarray(mask_a, bool), np.asarray(mask_b, bool)
    for name, e, m in (("emb_a", emb_a, mask_a), ("emb_b", emb_b, mask_b)):
        if e.ndim != 3 or m.shape != e.shape[:2]:
            raise ValueError(f"sequence_similarity: {name} has shape {e.shape} and its mask {m.shape}; "
                             "expected [N, S, D] and [N, S]")
        if not m[:, 0].all():
            raise ValueError(f"sequence_similarity: {name} has rows with no valid slice "
                             f"(rows {np.flatnonzero(~m[:, 0])[:8].tolist()})")
    fn = _jitted_similarity(cfg)
    out = np.empty((len(emb_a), len(emb_b)), np.float32)
    for lo in range(0, len(emb_a), ROW_CHUNK):
        x, mx = emb_a[lo:lo + ROW_CHUNK], mask_a[lo:lo + ROW_CHUNK]
        n = len(x)
        if n < ROW_CHUNK and len(emb_a) > ROW_CHUNK:     # pad the last chunk: one compile
            x = np.concatenate([x, np.repeat(x[:1], ROW_CHUNK - n, 0)])
            mx = np.concatenate([mx, np.repeat(mx[:1], ROW_CHUNK - n, 0)])
        out[lo:lo + n] = np.asarray(fn(x, mx, emb_b, mask_b))[:n]
    return out


def similarity(a: Embeddings, b: Embeddings, cfg: EmbedConfig) -> np.ndarray:
    """``float32[len(a), len(b)]``: cosine of the vectors, or ``sequence_similarity`` of the slices."""
    if a.vectors is not None and b.vectors is not None:
        return np.asarray(a.vectors, np.float32) @ np.asarray(b.vectors, np.float32).T
    if a.slices is None or b.slices is None:
        raise ValueError("similarity: both sides need slice embeddings (or both pooled vectors)")
    return sequence_similarity(a.slices, a.slice_mask, b.slices, b.slice_mask, cfg)


def _trim(slices: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = max(int(mask.sum(1).max()), 1)
    return slices[:, :s], mask[:, :s]


# ---- the model's embedder --------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "method", "layer", "num_slices", "normalize"))
def _embed_batch(graphdef, state, batch, *, method: str, layer: int, num_slices: int, normalize: bool):
    """``num_slices == 0``: pooled ``float32[B, D]``; else slice embeddings ``float32[B, S, D]``."""
    model = nnx.merge(graphdef, state)
    kw = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
              image_mask=batch["image_mask"])
    if not num_slices:
        return model.embed(batch["input_ids"], method=method, layer=layer, normalize=normalize, **kw)
    out = model(batch["input_ids"], positions=batch["positions"], output_hidden_states=layer != -1,
                return_logits=False, **kw)
    e = slice_embeddings(out, batch["slice_ids"], batch["slice_is_image"], num_slices, layer,
                         head=model.embed_head).astype(jnp.float32)
    return _l2n(e) if normalize else e


class Embedder:
    """Embeds samples with an ``MLLM`` (``model``) as ``cfg`` says; see the module docstring.

    ``encoder`` is the ``BatchEncoder`` that renders samples as training did. The model's
    state is split once here (re-create the embedder after changing the weights)."""

    def __init__(self, model, encoder: BatchEncoder, cfg: EmbedConfig = EmbedConfig()):
        self.cfg, self.encoder = cfg, encoder
        self.graphdef, self.state = nnx.split(model)

    def view(self, sample: Sample) -> Sample:
        """What the model reads for ``sample`` (assistant answers are always dropped)."""
        if self.cfg.alignment == "none" and self.cfg.method == "prompt":
            return prompt_view(sample, self.encoder.model_cfg.num_soft_prompts)
        return document_view(sample)

    def encode(self, samples: Sequence[Sample]) -> Embeddings:
        """``Embeddings`` of ``samples``: ``vectors`` (alignment ``none``) or ``slices`` trimmed to
        the longest sample's segment count."""
        if not samples:
            raise ValueError("Embedder.encode: no samples")
        cfg = self.cfg
        num_slices = self.encoder.limits.max_slices if cfg.alignment != "none" else 0
        out, masks = None, np.zeros((len(samples), num_slices), bool)
        for rows, batch in self.encoder.batches([self.view(s) for s in samples]):
            e = np.asarray(_embed_batch(self.graphdef, self.state, {k: batch[k] for k in _BATCH_KEYS},
                                        method=cfg.method, layer=cfg.layer, num_slices=num_slices,
                                        normalize=cfg.normalize))
            if out is None:
                out = np.zeros((len(samples),) + e.shape[1:], np.float32)
            out[rows] = e[:len(rows)]
            masks[rows] = batch["slice_mask"][:len(rows), :num_slices]
        if not num_slices:
            return Embeddings(vectors=out)
        return Embeddings(None, *_trim(out, masks))

    def similarity(self, a: Embeddings, b: Embeddings) -> np.ndarray:
        return similarity(a, b, self.cfg)


class SceneGraphOracle:
    """An embedder that knows the answer: each segment's scene-graph teacher features
    (``synthetic.scene_features`` of the graph it shows or states; exact, both modalities in
    one space). ``alignment="none"``: the normalised mean over segments."""

    def __init__(self, cfg: EmbedConfig = EmbedConfig(method="mean")):
        from mllm_jax.data.teachers import SceneGraphTeacher
        self.cfg, self.teacher = cfg, SceneGraphTeacher()

    def encode(self, samples: Sequence[Sample]) -> Embeddings:
        segs = [[s for s in smp.segments if s.role != "assistant"] for smp in samples]
        s_max = max(len(x) for x in segs)
        slices = np.zeros((len(samples), s_max, self.teacher.dim), np.float32)
        mask = np.zeros((len(samples), s_max), bool)
        for i, x in enumerate(segs):
            slices[i, :len(x)] = self.teacher.embed(x)
            mask[i, :len(x)] = True
        if self.cfg.alignment != "none":
            return Embeddings(None, slices, mask)
        v = slices.sum(1)
        return Embeddings(vectors=v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12))

    def similarity(self, a: Embeddings, b: Embeddings) -> np.ndarray:
        return similarity(a, b, self.cfg)


__all__ = ["Embeddings", "Embedder", "SceneGraphOracle", "sequence_similarity", "similarity"]
