"""Teacher features per slice, computed once and cached (tensorstore zarr), keyed by sample id.

Sugar's target similarity compares two samples' slice sequences with a kernel over frozen
"teacher" features (METHODS.md §1). Each teacher maps every segment of a sample to one row
``float32[D]``; a teacher that does not apply to a segment's modality gives a zero row.

* ``SceneGraphTeacher`` (``scene_graph``): exact structure. ``synthetic.scene_features`` of
  the graph a segment shows (image) or states (text); both modalities share the space, so it
  plays the role of CLIP's joint space. Zero for segments with no graph.
* ``PixelTeacher`` (``pixel``): pixels only, no semantics (plays DINOv2's role): the image
  average-pooled to an 8x8 grid, centred and sent through a fixed Gaussian random projection
  (64-d, seeded), concatenated with a 4x4x4 joint RGB colour histogram (64-d); each half
  L2-normalised, the whole scaled to unit norm. Text segments: zero.
* ``MiniLMTeacher`` (``minilm``): a real sentence encoder (all-MiniLM-L6-v2) run by our BERT
  (``models/text_encoder.py``): mean pooling over tokens then L2 normalisation, exactly as
  sentence-transformers does. Image segments: zero.
* ``VisionTeacher`` (``vision``): any of our vision towers (``models/vision.py``: CLIP, SigLIP,
  DINOv2), the pooled output L2-normalised (DINOv2: the final LayerNorm's CLS token, Sugar's
  image feature). Text segments: zero.

Each teacher has a ``fingerprint()`` (model id + config hash + weights digest). The cache
(``teacher_cache.py``, re-exported here) records the fingerprint, the source's fingerprint,
and a content hash per sample; opening a cache that does not match raises
``StaleCacheError`` and ``ensure_cache`` rebuilds it, so a stale cache is never silently used.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from mllm_jax.data.schema import Sample, Segment
from mllm_jax.data.teacher_cache import (CACHE_FORMAT, StaleCacheError, TeacherCache, build_cache,  # noqa: F401
                                         ensure_cache)


def _digest(*parts) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def params_digest(model) -> str:
    """Hash of every parameter's name and bytes (a fingerprint of the weights)."""
    from mllm_jax.convert.hf import flat_params
    h = hashlib.blake2b(digest_size=8)
    for k, v in sorted(flat_params(model).items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(np.asarray(v)).tobytes())
    return h.hexdigest()


# ---- teachers -----------------------------------------------------------------------------------

class SceneGraphTeacher:
    name = "scene_graph"

    def __init__(self):
        from mllm_jax.data.synthetic import SCENE_FEATURE_DIM
        self.dim = SCENE_FEATURE_DIM

    def fingerprint(self) -> str:
        return f"scene_graph:v1:dim={self.dim}"

    def embed(self, segments: Sequence[Segment]) -> np.ndarray:
        from mllm_jax.data.synthetic import scene_features
        return np.stack([scene_features(s.scene) for s in segments]) if segments else np.zeros((0, self.dim), np.float32)


class PixelTeacher:
    name = "pixel"

    def __init__(self, grid: int = 8, proj_dim: int = 64, bins: int = 4, seed: int = 0):
        self.grid, self.proj_dim, self.bins, self.seed = grid, proj_dim, bins, seed
        self.dim = proj_dim + bins ** 3
        rng = np.random.default_rng(seed)
        self.proj = (rng.standard_normal((grid * grid * 3, proj_dim)) / np.sqrt(proj_dim)).astype(np.float32)

    def fingerprint(self) -> str:
        return f"pixel:v1:" + _digest(self.grid, self.proj_dim, self.bins, self.seed)

    def image_features(self, img: np.ndarray) -> np.ndarray:
        """``uint8[H, W, C]`` -> ``float32[dim]``."""
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, -1)
        g = self.grid
        h, w = img.shape[:2]
        if h % g or w % g:
            from PIL import Image
            img = np.asarray(Image.fromarray(img).resize((g * 4, g * 4), Image.BILINEAR))
            h, w = img.shape[:2]
        pooled = img.reshape(g, h // g, g, w // g, 3).mean((1, 3), dtype=np.float32) / 255.0 - 0.5
        a = pooled.reshape(-1) @ self.proj
        q = (img.astype(np.int32) * self.bins) // 256
        hist = np.bincount(((q[..., 0] * self.bins + q[..., 1]) * self.bins + q[..., 2]).ravel(),
                           minlength=self.bins ** 3).astype(np.float32)
        out = np.concatenate([a / max(np.linalg.norm(a), 1e-12), hist / max(np.linalg.norm(hist), 1e-12)])
        return out / np.sqrt(2.0)

    def embed(self, segments: Sequence[Segment]) -> np.ndarray:
        out = np.zeros((len(segments), self.dim), np.float32)
        for i, s in enumerate(segments):
            if s.kind == "image":
                out[i] = self.image_features(np.asarray(s.image))
        return out


def _l2n(x, eps=1e-12):
    import jax.numpy as jnp
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class MiniLMTeacher:
    """Sentence embeddings of text segments from a BERT ``TextEncoder`` (our JAX model)."""
    name = "minilm"
    LENGTHS = (16, 32, 64, 128, 256, 512)

    def __init__(self, model, tokenizer, model_id: str, *, max_length: int = 256, batch_size: int = 64,
                 memo_size: int = 500_000):
        import jax
        from flax import nnx
        from mllm_jax.config import config_hash
        from mllm_jax.models.text_encoder import mean_pool
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.memo_size = memo_size        # distinct texts remembered by embed_texts
        self.dim = model.config.hidden_size
        self._fp = f"minilm:{model_id}:{config_hash(model.config)}:{params_digest(model)}:len={max_length}"
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.no_padding()
        graphdef, state = nnx.split(model)

        def forward(state, ids, mask):
            out = nnx.merge(graphdef, state)(ids, mask, jax.numpy.zeros_like(ids))
            return _l2n(mean_pool(out.last_hidden_state, mask))

        self._state, self._forward = state, jax.jit(forward)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw) -> "MiniLMTeacher":
        """An HF sentence-transformers folder (config.json, model.safetensors, tokenizer.json)."""
        from tokenizers import Tokenizer
        from mllm_jax.convert.hf import load_pretrained
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path}/tokenizer.json not found; expected a sentence-transformers folder "
                                    "such as all-MiniLM-L6-v2 (`make assets`)")
        return cls(load_pretrained(path), Tokenizer.from_file(str(path / "tokenizer.json")), path.name, **kw)

    def fingerprint(self) -> str:
        return self._fp

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``float32[len(texts), dim]``, unit norm. Each distinct text is encoded once (the scene
        world repeats its captions a lot) and remembered for later calls."""
        memo = self.__dict__.setdefault("_memo", {})
        todo = list(dict.fromkeys(t for t in texts if t not in memo))
        new = dict(zip(todo, self._encode(todo))) if todo else {}
        out = (np.stack([new[t] if t in new else memo[t] for t in texts]) if texts
               else np.zeros((0, self.dim), np.float32))
        if len(memo) + len(new) > self.memo_size:          # bounded: start over
            memo.clear()
        memo.update(new)
        return out

    def _encode(self, texts: list[str]) -> np.ndarray:
        """Padded to fixed (batch, length) buckets, so the forward compiles once per length."""
        out = np.zeros((len(texts), self.dim), np.float32)
        encs = self.tokenizer.encode_batch(list(texts))
        for lo in range(0, len(texts), self.batch_size):
            chunk = encs[lo:lo + self.batch_size]
            L = next((b for b in self.LENGTHS if b >= max(len(e.ids) for e in chunk)), self.max_length)
            ids = np.zeros((self.batch_size, L), np.int32)
            mask = np.zeros((self.batch_size, L), np.int32)
            for i, e in enumerate(chunk):
                ids[i, :len(e.ids)] = e.ids
                mask[i, :len(e.ids)] = 1
            out[lo:lo + len(chunk)] = np.asarray(self._forward(self._state, ids, mask))[:len(chunk)]
        return out

    def embed(self, segments: Sequence[Segment]) -> np.ndarray:
        out = np.zeros((len(segments), self.dim), np.float32)
        where = [i for i, s in enumerate(segments) if s.kind == "text"]
        if where:
            out[where] = self.embed_texts([segments[i].text for i in where])
        return out


class VisionTeacher:
    """Pooled, L2-normalised output of one of our vision towers for image segments."""
    name = "vision"

    def __init__(self, tower, model_id: str = "vision", *, batch_size: int = 64):
        import jax
        from flax import nnx
        from mllm_jax.config import config_hash
        from mllm_jax.data.pipeline import ImageSpec
        self.spec, self.batch_size = ImageSpec.from_vision(tower.config), batch_size
        self.dim = tower.config.hidden_size
        self._fp = f"vision:{model_id}:{config_hash(tower.config)}:{params_digest(tower)}"
        graphdef, state = nnx.split(tower)

        def forward(state, pixels):
            return _l2n(nnx.merge(graphdef, state)(pixels).pooled)

        self._state, self._forward = state, jax.jit(forward)

    def fingerprint(self) -> str:
        return self._fp

    def embed(self, segments: Sequence[Segment]) -> np.ndarray:
        out = np.zeros((len(segments), self.dim), np.float32)
        where = [i for i, s in enumerate(segments) if s.kind == "image"]
        for lo in range(0, len(where), self.batch_size):
            idx = where[lo:lo + self.batch_size]
            x = np.zeros((self.batch_size, self.spec.size, self.spec.size, self.spec.channels), np.float32)
            for j, i in enumerate(idx):
                x[j] = self.spec(np.asarray(segments[i].image))
            out[idx] = np.asarray(self._forward(self._state, x))[:len(idx)]
        return out


class OnlineFeatures:
    """A teacher used directly in the pipeline (cheap teachers: scene_graph, pixel)."""

    def __init__(self, teacher):
        self.teacher, self.name, self.dim = teacher, teacher.name, teacher.dim

    def features(self, sample: Sample) -> np.ndarray:
        return self.teacher.embed(sample.segments)


__all__ = [
    "StaleCacheError", "params_digest", "SceneGraphTeacher", "PixelTeacher", "MiniLMTeacher",
    "VisionTeacher", "OnlineFeatures", "TeacherCache", "build_cache", "ensure_cache",
]
