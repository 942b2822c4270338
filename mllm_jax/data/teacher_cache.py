"""The teacher feature cache: a tensorstore zarr of per-slice rows, keyed by sample id
(``teachers.py`` has the teachers; it re-exports every name here).

A cache folder holds ``meta.json`` (the teacher's fingerprint, the source's fingerprint, the
row width), ``index.json`` (per sample: offset, row count, content hash) and
``features.zarr``. Opening a cache that does not match raises ``StaleCacheError`` and
``ensure_cache`` rebuilds it, so a stale cache is never silently used; builds are atomic and
serialised by a file lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from mllm_jax.data.schema import DataError, Sample, content_hash, validate_sample

log = logging.getLogger("mllm_jax.data")
CACHE_FORMAT = 1


# the source fingerprint that ensure_cache checks covers the records, not the image files they
# name: a changed image is caught per sample (content hash), and only deleting the cache rebuilds it
_REBUILD = ("the source changed after the cache was built (e.g. an image file was replaced); delete "
            "this cache folder and start again: it is rebuilt at the start of the run")


class StaleCacheError(RuntimeError):
    """A teacher cache does not match the teacher, the data source or a sample."""


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


__all__ = ["CACHE_FORMAT", "StaleCacheError", "TeacherCache", "build_cache", "ensure_cache"]
