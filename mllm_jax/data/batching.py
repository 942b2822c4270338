"""Batching of encoded examples (``pipeline.py``): padding to the smallest sequence bucket that
fits, the padding rows of an epoch's last batch, and the sequence-length helpers that let
processes agree on one shape (``train/distributed.py``). Re-exported by ``pipeline``."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import grain
import numpy as np

from mllm_jax.data.schema import REASONS


@dataclasses.dataclass(frozen=True)
class Limits:
    seq_buckets: tuple[int, ...]
    max_images: int
    max_slices: int


def _skip_mark(ex: dict) -> Optional[dict]:
    if "_skip" in ex:
        return ex
    if "input_ids" not in ex:          # views: skipped if any view is
        return next((v for v in ex.values() if "_skip" in v), None)
    return None


def collate(examples: list[dict], batch_size: int, limits: Limits, image_shape: tuple[int, int, int],
            pad_id: int, teacher_dims: dict[str, int]) -> dict[str, np.ndarray]:
    """Pads ``examples`` (<= batch_size) into one batch (see the module docstring)."""
    B, M, S = batch_size, limits.max_images, limits.max_slices
    longest = max((len(e["input_ids"]) for e in examples), default=1)
    T = next(b for b in limits.seq_buckets if b >= longest)
    out = {
        "input_ids": np.full((B, T), pad_id, np.int32), "attention_mask": np.zeros((B, T), np.int32),
        "labels": np.full((B, T), pad_id, np.int32), "loss_mask": np.zeros((B, T), np.int32),
        "positions": np.zeros((B, T), np.int32), "slice_ids": np.zeros((B, T), np.int32),
        "pixel_values": np.zeros((B, M) + tuple(image_shape), np.float32),
        "image_mask": np.zeros((B, M), bool), "slice_is_image": np.zeros((B, S), bool),
        "slice_mask": np.zeros((B, S), bool), "sample_index": np.full((B,), -1, np.int32),
    }
    for name, d in teacher_dims.items():
        out[f"teacher_{name}"] = np.zeros((B, S, d), np.float32)
    for b, e in enumerate(examples):
        ids = e["input_ids"]
        L = len(ids)
        out["input_ids"][b, :L] = ids
        out["attention_mask"][b, :L] = 1
        out["labels"][b, :L - 1] = ids[1:]
        out["loss_mask"][b, :L - 1] = e["target"][1:]
        out["positions"][b, :L] = np.arange(L)
        out["positions"][b, L:] = L - 1               # = cumsum(attention_mask) - 1, the model's default
        out["slice_ids"][b, :L] = e["slice_ids"]
        n = len(e["pixel_values"])
        out["pixel_values"][b, :n] = e["pixel_values"]
        out["image_mask"][b, :n] = True
        s = len(e["slice_is_image"])
        out["slice_is_image"][b, :s] = e["slice_is_image"]
        out["slice_mask"][b, :s] = True
        out["sample_index"][b] = e["sample_index"]
        for name in teacher_dims:
            out[f"teacher_{name}"][b, :s] = e[f"teacher_{name}"]
    return out


# the [B, T] fields and how collate fills the columns past a row's end (None: the pad id;
# "edge": the row's last value, = L - 1 for positions)
_SEQ_FIELDS = {"input_ids": None, "labels": None, "attention_mask": 0, "loss_mask": 0, "slice_ids": 0,
               "positions": "edge"}


def pad_to_length(batch: dict, length: int, pad_id: int) -> dict:
    """``batch`` (``collate``'s output) with its sequence fields padded to ``length`` columns:
    equal to collating the same examples at bucket ``length``."""
    t = batch["input_ids"].shape[1]
    if length == t:
        return batch
    if length < t:
        raise ValueError(f"cannot pad a batch of sequence length {t} to {length}")
    out = dict(batch)
    widths = ((0, 0), (0, length - t))
    for k, fill in _SEQ_FIELDS.items():
        if k in batch:
            x = np.asarray(batch[k])
            out[k] = (np.pad(x, widths, mode="edge") if fill == "edge"
                      else np.pad(x, widths, constant_values=pad_id if fill is None else fill))
    return out


def _map_collated(fn: Callable[[dict, str], dict], batch: dict, path: str = "") -> dict:
    """``batch`` with each collated batch inside it (a dict holding ``input_ids``) replaced by
    ``fn(it, path)``: ``""`` for a plain batch, the view or stream names (``"image"``,
    ``"stream/text"``) for nested ones."""
    if "input_ids" in batch:
        return fn(batch, path)
    return {k: _map_collated(fn, v, f"{path}/{k}" if path else str(k)) if isinstance(v, dict) else v
            for k, v in batch.items()}


def seq_lengths(batch: dict) -> dict[str, int]:
    """``{path: T}`` of each collated batch inside ``batch`` (paths as ``_map_collated``)."""
    out = {}

    def record(b, path):
        out[path] = int(np.shape(b["input_ids"])[1])
        return b
    _map_collated(record, batch)
    return out


def pad_seq_lengths(batch: dict, lengths: dict[str, int], pad_id: int) -> dict:
    """Pads each collated batch inside ``batch`` to ``lengths[path]`` (paths as ``seq_lengths``)."""
    return _map_collated(lambda b, path: pad_to_length(b, lengths.get(path, np.shape(b["input_ids"])[1]), pad_id),
                         batch)


def blank_like(batch: dict, pad_id: int) -> dict:
    """Padding rows only, in ``batch``'s shapes (each collated batch inside it): what ``collate``
    gives for no examples. Every loss and metric gives them zero weight."""
    def blank(b, _):
        return {k: np.full_like(v, pad_id) if k in ("input_ids", "labels") else
                np.full_like(v, -1) if k == "sample_index" else np.zeros_like(v) for k, v in b.items()}
    return _map_collated(blank, batch)


class PadBatchDataset(grain.IterDataset):
    """Collects ``batch_size`` valid examples (counting skip markers by reason) and pads them
    with ``collate_fn``. The last, partial batch of the stream is padded with empty rows.
    Extra top-level keys, popped by ``DataIterator``: ``_valid`` (real rows), ``_skipped``
    (int64[len(REASONS)]), ``_messages`` (the first skip messages)."""

    def __init__(self, parent, batch_size: int, collate_fn: Callable):
        super().__init__(parent)
        self.batch_size, self.collate_fn = batch_size, collate_fn

    def __iter__(self):
        return _PadBatchIterator(self._parent.__iter__(), self.batch_size, self.collate_fn)


class _PadBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size, collate_fn):
        super().__init__(parent)
        self.batch_size, self.collate_fn = batch_size, collate_fn

    def __next__(self):
        got, skipped, messages = [], np.zeros(len(REASONS), np.int64), []
        while len(got) < self.batch_size:
            try:
                ex = next(self._parent)
            except StopIteration:
                break
            mark = _skip_mark(ex)
            if mark is not None:
                skipped[mark["_skip"]] += 1
                if len(messages) < 4:
                    messages.append(mark["_message"])
                continue
            got.append(ex)
        if not got and not skipped.any():
            raise StopIteration
        batch = self.collate_fn(got)
        batch.update(_valid=len(got), _skipped=skipped, _messages=messages)
        return batch

    def get_state(self):          # nothing is buffered between batches
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class _Collate:
    """Picklable collate for plain or view (dict of samples) examples."""

    def __init__(self, batch_size, limits, image_shape, pad_id, teacher_dims, views: Optional[tuple] = None):
        self.args = (batch_size, limits, image_shape, pad_id, teacher_dims)
        self.views = views

    def __call__(self, examples):
        if self.views:
            return {v: collate([e[v] for e in examples], *self.args) for v in self.views}
        return collate(examples, *self.args)
