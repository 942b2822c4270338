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

Each teacher has a ``fingerprint()`` (model id + config hash + weights digest). A cache
records the fingerprint, the source's fingerprint, and a content hash per sample; opening a
cache that does not match raises ``StaleCacheError`` and ``ensure_cache`` rebuilds it, so a
stale cache is never silently used.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from mllm_jax.data.schema import DataError, Sample, Segment, content_hash, validate_sample

log = logging.getLogger("mllm_jax.data")
CACHE_FORMAT = 1


# the source fingerprint that ensure_cache checks covers the records, not the image files they
# name: a changed image is caught per sample (content hash), and only deleting the cache rebuilds it
_REBUILD = ("the source changed after the cache was built (e.g. an image file was replaced); delete "
            "this cache folder and start again: it is rebuilt at the start of the run")


class StaleCacheError(RuntimeError):
    """A teacher cache does not match the teacher, the data source or a sample."""


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


# ---- the cache ------------------------------------------------------------------------------------

def _zarr_spec(path: Path) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path / "features.zarr")}}


class TeacherCache:
    """Read side of a cache folder: ``meta.json``, ``index.json`` and ``features.zarr``
    (``float32[rows, D]``, the rows of sample ``k`` at ``offsets[k]:offsets[k]+counts[k]``).
    ``features(sample)`` checks the sample's content hash. Picklable (reopens lazily)."""

    def __init__(self, path: str | Path, *, fingerprint: Optional[str] = None, source: Optional[str] = None,
                 preload_bytes: int = 256 << 20):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise StaleCacheError(f"{self.path}: no meta.json (missing or interrupted build)")
        self.meta = json.loads(meta_file.read_text())
        self._meta_id = _file_id(meta_file)
        if self.meta.get("format") != CACHE_FORMAT:
            raise StaleCacheError(f"{self.path}: cache format {self.meta.get('format')} != {CACHE_FORMAT}")
        if fingerprint is not None and self.meta["fingerprint"] != fingerprint:
            raise StaleCacheError(f"{self.path}: built by teacher {self.meta['fingerprint']!r}, "
                                  f"but the teacher is now {fingerprint!r}")
        if source is not None and self.meta.get("source") != source:
            raise StaleCacheError(f"{self.path}: built for source {self.meta.get('source')!r}, "
                                  f"but the source is now {source!r}")
        self.name, self.dim = self.meta["teacher"], int(self.meta["dim"])
        self.preload_bytes = preload_bytes
        self._index = None
        self._store = None
        self._array = None

    def _check_unchanged(self):
        """The folder is still the cache this object opened: a build by another run replaces it
        whole (``build_cache``), and its index and rows must not be read against this meta."""
        try:
            same = _file_id(self.path / "meta.json") == self._meta_id
        except FileNotFoundError:
            same = False
        if not same:
            raise StaleCacheError(f"{self.path}: the cache was rebuilt or removed (by another run?) after this run "
                                  "opened it; runs with different teachers or sources need their own cache folders")

    def _load(self):
        self._check_unchanged()
        idx = json.loads((self.path / "index.json").read_text())
        self._index = {i: (o, c, h) for i, o, c, h in zip(idx["ids"], idx["offsets"], idx["counts"], idx["hashes"])}
        import tensorstore as ts
        self._store = ts.open(_zarr_spec(self.path), read=True).result()
        if self._store.shape[0] * self.dim * 4 <= self.preload_bytes:
            self._array = self._store.read().result()

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    def features(self, sample: Sample) -> np.ndarray:
        """``float32[len(sample.segments), D]`` for a validated sample."""
        if self._index is None:
            self._load()
        try:
            off, n, h = self._index[sample.id]
        except KeyError:
            raise StaleCacheError(f"{self.path}: sample {sample.id!r} is not in the {self.name} cache; "
                                  f"{_REBUILD}") from None
        if h != content_hash(sample) or n != len(sample.segments):
            raise StaleCacheError(f"{self.path}: sample {sample.id!r} changed since the {self.name} cache was "
                                  f"built (content hash differs); {_REBUILD}")
        if self._array is not None:
            return self._array[off:off + n]
        self._check_unchanged()       # rows read from disk now: one stat per sample
        return self._store[off:off + n].read().result()

    def __getstate__(self):
        return {**self.__dict__, "_index": None, "_store": None, "_array": None}


def _file_id(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _samples(source) -> Iterable[Optional[Sample]]:
    """The source's samples (each view of a dict item); None for a record that cannot be read
    (a ``DataError``: the pipeline skips it too)."""
    for i in range(len(source)):
        try:
            item = source[i]
        except DataError as e:
            log.debug("teacher cache: skipping %s", e)
            yield None
            continue
        for s in (item.values() if isinstance(item, dict) else (item,)):
            yield s


@contextlib.contextmanager
def _build_lock(path: Path):
    """An exclusive lock on ``<path>.lock`` (next to the cache folder) while a process checks or
    builds the cache: runs started together on one cache folder build it once (the others wait,
    then open it), and none deletes a folder another is writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("teacher cache %s: waiting for another process that is building it", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_cache(teacher, source, path: str | Path, *, chunk: int = 256, source_fingerprint: Optional[str] = None) -> TeacherCache:
    """Computes ``teacher`` on every sample of ``source`` (records that fail validation are left
    out: the pipeline skips them too) and writes the cache atomically: into a temporary folder
    next to ``path`` (meta.json last), which then replaces ``path``. A build that fails leaves
    ``path`` as it was; one that is killed leaves a ``.<name>.building-*`` folder (or, killed
    while replacing an older cache, that cache as ``.<name>.old-*``) that the next build removes.
    Concurrent builds of one ``path`` should hold ``_build_lock`` (as ``ensure_cache`` does)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{path.name}.building-*", f".{path.name}.old-*"):
        for stale in path.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _write_cache(teacher, source, tmp, chunk=chunk, source_fingerprint=source_fingerprint)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    cache = TeacherCache(path)
    log.info("teacher cache %s: %d samples, %d rows (%d invalid records left out)", path,
             cache.meta["num_samples"], cache.meta["num_rows"], cache.meta["skipped_invalid"])
    return cache


def _write_cache(teacher, source, path: Path, *, chunk: int, source_fingerprint: Optional[str]) -> None:
    import tensorstore as ts
    path.mkdir(parents=True)
    ids, offsets, counts, hashes = [], [], [], []
    store, total = None, 0
    pending: list[Sample] = []

    def run():
        nonlocal store, total
        segs = [s for smp in pending for s in smp.segments]
        feats = np.asarray(teacher.embed(segs), np.float32)
        if feats.shape != (len(segs), teacher.dim):
            raise ValueError(f"teacher {teacher.name}: embed returned {feats.shape}, expected ({len(segs)}, {teacher.dim})")
        for smp in pending:
            ids.append(smp.id), offsets.append(total), counts.append(len(smp.segments)), hashes.append(content_hash(smp))
            total += len(smp.segments)
        if store is None:
            store = ts.open({**_zarr_spec(path), "create": True, "metadata": {
                "dtype": "<f4", "shape": [0, teacher.dim], "chunks": [4096, teacher.dim]}}).result()
        store = store.resize(exclusive_max=[total, teacher.dim]).result()
        store[total - len(feats):total].write(feats).result()
        pending.clear()

    skipped = 0
    for smp in _samples(source):
        if smp is None:
            skipped += 1
            continue
        try:
            pending.append(validate_sample(smp))
        except DataError:
            skipped += 1
            continue
        if len(pending) >= chunk:
            run()
    if pending:
        run()
    if store is None:
        ts.open({**_zarr_spec(path), "create": True, "metadata": {"dtype": "<f4", "shape": [0, teacher.dim]}}).result()
    if len(set(ids)) != len(ids):
        raise ValueError(f"build_cache: the source has duplicate sample ids (e.g. {_first_dup(ids)!r}); ids key the cache")
    (path / "index.json").write_text(json.dumps({"ids": ids, "offsets": offsets, "counts": counts, "hashes": hashes}))
    meta = {"format": CACHE_FORMAT, "teacher": teacher.name, "fingerprint": teacher.fingerprint(),
            "dim": teacher.dim, "source": source_fingerprint, "num_samples": len(ids), "num_rows": total,
            "skipped_invalid": skipped}
    tmp = path / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path / "meta.json")


def _first_dup(ids):
    seen = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)


def ensure_cache(teacher, source, path: str | Path) -> TeacherCache:
    """Opens the cache at ``path`` if it was built by this teacher for this source, else
    rebuilds it (logging why). Sources with a ``fingerprint()`` method are checked by it."""
    fp = source.fingerprint() if hasattr(source, "fingerprint") else None
    path = Path(path)
    with _build_lock(path):
        try:
            return TeacherCache(path, fingerprint=teacher.fingerprint(), source=fp)
        except StaleCacheError as e:
            log.warning("rebuilding teacher cache: %s", e)
        return build_cache(teacher, source, path, source_fingerprint=fp)


__all__ = [
    "StaleCacheError", "params_digest", "SceneGraphTeacher", "PixelTeacher", "MiniLMTeacher",
    "VisionTeacher", "OnlineFeatures", "TeacherCache", "build_cache", "ensure_cache",
]
