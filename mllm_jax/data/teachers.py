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
* ``MiniLMTeacher`` (``minilm``): any BERT sentence encoder (all-MiniLM-L6-v2, or BGE, the
  paper's text teacher) run by our BERT (``models/text_encoder.py``), pooled as the folder's
  sentence-transformers files say (``modules.json`` + ``1_Pooling/config.json``: MiniLM the
  mean over tokens, BGE the CLS token; ``max`` too; mean when the folder has no such files;
  other modes are refused), then L2-normalised, exactly as sentence-transformers does. Image
  segments: zero.
* ``VisionTeacher`` (``vision``): any of our vision towers (``models/vision.py``: CLIP, SigLIP,
  DINOv2), the pooled output L2-normalised (DINOv2: the final LayerNorm's CLS token, Sugar's
  image feature). Text segments: zero.
* ``ClipTeacher`` (``clip``): a CLIP model (``models/clip.py``, an HF ``CLIPModel`` folder):
  images -> L2-normalised ``get_image_features``, texts -> L2-normalised
  ``get_text_features``, one shared space (``projection_dim``). It is the paper's image-text
  kernel, the role ``scene_graph`` plays on the scene world: set
  ``objective.structure.shared_teacher=clip``.

Each model teacher has a ``fingerprint()`` (model id + config hash + weights digest; the text
teachers add their tokenizer's digest, the length they truncate to and their pooling). The cache
(``teacher_cache.py``, re-exported here) records the fingerprint, the source's fingerprint, and
a content hash per sample; opening a cache that does not match raises ``StaleCacheError`` and
``ensure_cache`` rebuilds it, so a stale cache is never silently used.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

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
        return "pixel:v1:" + _digest(self.grid, self.proj_dim, self.bins, self.seed)

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


def _tokenizer_digest(tokenizer) -> str:
    """A ``tokenizers.Tokenizer`` or a transformers tokenizer, hashed with its settings."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    text = backend.to_str() if hasattr(backend, "to_str") else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _digest(text)


class _TextBatches:
    """``embed_texts`` for the text teachers: each distinct text encoded once and remembered,
    batches padded to fixed (batch, length) buckets so the forward compiles once per length.
    Subclasses set ``dim``, ``max_length``, ``batch_size``, ``memo_size``, ``_pad_id``,
    ``_state``, ``_text_forward(state, ids, mask)`` and ``_token_ids(texts)``."""
    LENGTHS = (16, 32, 64, 128, 256, 512)

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
        out = np.zeros((len(texts), self.dim), np.float32)
        encs = self._token_ids(list(texts))
        for lo in range(0, len(texts), self.batch_size):
            chunk = encs[lo:lo + self.batch_size]
            longest = max(len(e) for e in chunk)
            L = min(next((b for b in self.LENGTHS if b >= longest), self.max_length), self.max_length)
            ids = np.full((self.batch_size, L), self._pad_id, np.int32)
            mask = np.zeros((self.batch_size, L), np.int32)
            for i, e in enumerate(chunk):
                ids[i, :len(e)] = e
                mask[i, :len(e)] = 1
            out[lo:lo + len(chunk)] = np.asarray(self._text_forward(self._state, ids, mask))[:len(chunk)]
        return out


SENTENCE_POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                     "pooling_mode_max_tokens": "max"}
_ST_MODULES_OK = ("Transformer", "Pooling", "Normalize")   # sentence-transformers modules we reproduce


def sentence_pooling(path: str | Path) -> str:
    """The pooling a sentence-transformers folder declares: ``mean`` | ``cls`` | ``max``.

    Read from ``modules.json`` (its Pooling module's folder, usually ``1_Pooling``) and that
    folder's ``config.json`` (``pooling_mode_cls_token`` / ``pooling_mode_mean_tokens`` /
    ``pooling_mode_max_tokens``: exactly one true), or from ``1_Pooling/config.json`` without a
    ``modules.json``; ``mean`` when the folder has neither (a plain BERT folder). Other modes
    (weighted mean, mean/sqrt(len), last token, several at once) and modules after the pooling
    other than ``Normalize`` (e.g. a ``Dense`` projection) raise ``ValueError`` naming the file."""
    path = Path(path)
    pool_dir = path / "1_Pooling"
    modules_file = path / "modules.json"
    if modules_file.exists():
        try:
            modules = json.loads(modules_file.read_text())
        except ValueError as e:
            raise ValueError(f"{modules_file}: not valid JSON ({e})") from None
        kinds = [(m.get("type", "").rsplit(".", 1)[-1], m) for m in modules]
        other = [f"{m.get('path')!r} ({m.get('type')})" for k, m in kinds if k not in _ST_MODULES_OK]
        if other:
            raise ValueError(f"{modules_file}: modules {', '.join(other)} are not supported (this teacher runs "
                             f"{'/'.join(_ST_MODULES_OK)} only, so its embeddings would not be the model's)")
        pooling = [m for k, m in kinds if k == "Pooling"]
        if not pooling:
            return "mean"
        pool_dir = path / pooling[0].get("path", "1_Pooling")
    cfg_file = pool_dir / "config.json"
    if not cfg_file.exists():
        if modules_file.exists():
            raise FileNotFoundError(f"{cfg_file}: not found ({modules_file} lists a Pooling module there)")
        return "mean"
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    on = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
    modes = [SENTENCE_POOLINGS.get(k) for k in on]
    if len(on) != 1 or None in modes:
        raise ValueError(f"{cfg_file}: pooling modes {on or 'none'} are not supported; expected exactly one of "
                         f"{sorted(SENTENCE_POOLINGS)}")
    return modes[0]


def pool_tokens(hidden, mask, pooling: str):
    """sentence-transformers' pooling of ``hidden: float[B, T, D]`` under ``mask: int[B, T]``:
    ``mean`` (masked mean), ``cls`` (the first token), ``max`` (masked max; padding at -1e9)."""
    import jax.numpy as jnp
    from mllm_jax.models.pooling import mean_pool
    if pooling == "mean":
        return mean_pool(hidden, mask)
    if pooling == "cls":
        return hidden[:, 0].astype(jnp.float32)
    if pooling == "max":
        return jnp.max(jnp.where(mask.astype(bool)[..., None], hidden.astype(jnp.float32), -1e9), axis=1)
    raise ValueError(f"sentence pooling {pooling!r}: expected one of {sorted(SENTENCE_POOLINGS.values())}")


class MiniLMTeacher(_TextBatches):
    """Sentence embeddings of text segments from a BERT ``TextEncoder`` (our JAX model), pooled
    as ``pooling`` says (``mean`` | ``cls`` | ``max``; ``from_pretrained`` reads the folder's).
    Texts are truncated to ``max_length`` tokens, at most the model's ``max_position_embeddings``."""
    name = "minilm"

    def __init__(self, model, tokenizer, model_id: str, *, max_length: int = 256, batch_size: int = 64,
                 memo_size: int = 500_000, pooling: str = "mean", lower_case: bool = False):
        import jax
        from flax import nnx
        from mllm_jax.config import config_hash
        if pooling not in SENTENCE_POOLINGS.values():
            raise ValueError(f"MiniLMTeacher: pooling {pooling!r}; expected one of {sorted(SENTENCE_POOLINGS.values())}")
        # at most the model's positions (a longer text would make the encoder raise mid-cache-build)
        max_length = min(max_length, model.config.max_position_embeddings)
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.memo_size = memo_size        # distinct texts remembered by embed_texts
        self.pooling, self.dim, self._pad_id = pooling, model.config.hidden_size, 0
        self.lower_case = lower_case      # sentence-transformers' do_lower_case: texts lowercased first
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.no_padding()
        self._fp = (f"minilm:{model_id}:{config_hash(model.config)}:{params_digest(model)}:len={max_length}"
                    f":pool={pooling}:tok={_tokenizer_digest(tokenizer)}" + (":lower" if lower_case else ""))
        graphdef, state = nnx.split(model)

        def forward(state, ids, mask):
            out = nnx.merge(graphdef, state)(ids, mask, jax.numpy.zeros_like(ids))
            return _l2n(pool_tokens(out.last_hidden_state, mask, pooling))

        self._state, self._text_forward = state, jax.jit(forward)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw) -> "MiniLMTeacher":
        """A BERT sentence-encoder folder (config.json, model.safetensors, tokenizer.json; e.g.
        all-MiniLM-L6-v2, bge-base-en-v1.5): the pooling from its sentence-transformers files
        (``sentence_pooling``) and, unless given, ``max_length`` as sentence-transformers sets it:
        its ``sentence_bert_config.json``'s ``max_seq_length`` (at most the model's positions), or
        without one the model's positions capped by ``tokenizer_config.json``'s
        ``model_max_length`` (``Transformer``'s ``min(max_position_embeddings,
        tokenizer.model_max_length)``), and
        ``lower_case`` from its ``do_lower_case`` (sentence-transformers lowercases the texts
        before its tokenizer sees them)."""
        from tokenizers import Tokenizer
        from mllm_jax.convert.hf import load_pretrained
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path}/tokenizer.json not found; expected a sentence-transformers folder "
                                    "such as all-MiniLM-L6-v2 (`make assets`)")
        kw.setdefault("pooling", sentence_pooling(path))
        model = load_pretrained(path)
        st_file = path / "sentence_bert_config.json"
        st = json.loads(st_file.read_text()) if st_file.exists() else {}
        if "max_length" not in kw:
            positions = model.config.max_position_embeddings
            if st.get("max_seq_length"):
                kw["max_length"] = min(int(st["max_seq_length"]), positions)
            else:
                tc_file = path / "tokenizer_config.json"
                tc = json.loads(tc_file.read_text()) if tc_file.exists() else {}
                limit = tc.get("model_max_length")
                kw["max_length"] = positions if limit is None else min(positions, int(limit))
        kw.setdefault("lower_case", bool(st.get("do_lower_case", False)))
        return cls(model, Tokenizer.from_file(str(path / "tokenizer.json")), path.name, **kw)

    def fingerprint(self) -> str:
        return self._fp

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        if self.lower_case:
            texts = [t.lower() for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def embed(self, segments: Sequence[Segment]) -> np.ndarray:
        out = np.zeros((len(segments), self.dim), np.float32)
        where = [i for i, s in enumerate(segments) if s.kind == "text"]
        if where:
            out[where] = self.embed_texts([segments[i].text for i in where])
        return out


def _embed_images(segments: Sequence[Segment], out: np.ndarray, spec, batch_size: int, forward) -> None:
    """Fills ``out``'s rows of the image segments with ``forward(float32[batch_size, H, W, C])``
    (images prepared by ``spec``, in fixed-size batches: one compiled shape)."""
    where = [i for i, s in enumerate(segments) if s.kind == "image"]
    for lo in range(0, len(where), batch_size):
        idx = where[lo:lo + batch_size]
        x = np.zeros((batch_size, spec.size, spec.size, spec.channels), np.float32)
        for j, i in enumerate(idx):
            x[j] = spec(np.asarray(segments[i].image))
        out[idx] = np.asarray(forward(x))[:len(idx)]


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
        _embed_images(segments, out, self.spec, self.batch_size, lambda x: self._forward(self._state, x))
        return out


class OnlineFeatures:
    """A teacher used directly in the pipeline (cheap teachers: scene_graph, pixel)."""

    def __init__(self, teacher):
        self.teacher, self.name, self.dim = teacher, teacher.name, teacher.dim

    def features(self, sample: Sample) -> np.ndarray:
        return self.teacher.embed(sample.segments)


# ---- CLIP's shared image-text space ---------------------------------------------------------------

class ClipTeacher(_TextBatches):
    """CLIP's one image-text space (``models/clip.py``): image segments -> L2-normalised
    ``get_image_features`` (``visual_projection`` of the vision tower's pooled output), text
    segments -> L2-normalised ``get_text_features`` (``text_projection`` of the text tower's
    end-token state); ``dim`` = ``projection_dim``. Images are prepared as ``VisionTeacher``
    prepares them (``ImageSpec`` of the vision config: as the folder's ``preprocessor_config.json``
    says, shorter edge + centre crop as transformers' CLIPImageProcessor does, or without that
    file a stretch to the tower's size; CLIP's mean and std); texts are tokenised by the folder's tokenizer (transformers, local files only),
    truncated to the text tower's positions with the end token kept."""
    name = "clip"

    def __init__(self, model, tokenizer, model_id: str = "clip", *, max_length: Optional[int] = None,
                 batch_size: int = 64, memo_size: int = 500_000):
        import jax
        from flax import nnx
        from mllm_jax.config import config_hash
        from mllm_jax.data.pipeline import ImageSpec
        cfg = model.config
        positions = cfg.text.max_position_embeddings
        self.tokenizer, self.batch_size, self.memo_size = tokenizer, batch_size, memo_size
        self.max_length = min(max_length or positions, positions)
        self.spec, self.dim = ImageSpec.from_vision(cfg.vision), cfg.projection_dim
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_id = cfg.text.pad_token_id if pad is None else pad
        self._fp = (f"clip:{model_id}:{config_hash(cfg)}:{params_digest(model)}:len={self.max_length}"
                    f":tok={_tokenizer_digest(tokenizer)}")
        graphdef, state = nnx.split(model)

        def images(state, pixels):
            return _l2n(nnx.merge(graphdef, state).get_image_features(pixels))

        def texts(state, ids, mask):
            return _l2n(nnx.merge(graphdef, state).get_text_features(ids, mask))

        self._state, self._image_forward, self._text_forward = state, jax.jit(images), jax.jit(texts)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw) -> "ClipTeacher":
        """A Hugging Face ``CLIPModel`` folder (config.json with vision_config + text_config +
        projection_dim, safetensors, tokenizer files), e.g. openai/clip-vit-large-patch14."""
        from transformers import AutoTokenizer
        from mllm_jax.config import ConfigError
        from mllm_jax.convert.hf import load_pretrained
        from mllm_jax.models.clip import ClipModel
        path = Path(path)
        model = load_pretrained(path)
        if not isinstance(model, ClipModel):
            raise ConfigError(f"{path} holds a {type(model).__name__}, not a CLIPModel (model_type 'clip': a "
                              "vision tower, a text tower and their projections)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{path}: cannot load the CLIP tokenizer from the folder's tokenizer files "
                                    f"(tokenizer.json, or vocab.json + merges.txt): {e}") from e
        return cls(model, tokenizer, path.name, **kw)

    def fingerprint(self) -> str:
        return self._fp

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def embed(self, segments: Sequence[Segment]) -> np.ndarray:
        out = np.zeros((len(segments), self.dim), np.float32)
        text = [i for i, s in enumerate(segments) if s.kind == "text"]
        if text:
            out[text] = self.embed_texts([segments[i].text for i in text])
        _embed_images(segments, out, self.spec, self.batch_size, lambda x: self._image_forward(self._state, x))
        return out


__all__ = [
    "StaleCacheError", "params_digest", "SceneGraphTeacher", "PixelTeacher", "MiniLMTeacher",
    "VisionTeacher", "ClipTeacher", "OnlineFeatures", "TeacherCache", "build_cache", "ensure_cache",
    "sentence_pooling", "pool_tokens", "SENTENCE_POOLINGS",
]
