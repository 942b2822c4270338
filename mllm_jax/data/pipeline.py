"""The grain pipeline: seeded shuffle, per-process shards, encoding, bucketed padding, workers,
and an iterator whose state is checkpointed and restored exactly.

    it = make_iterator(data_cfg, model_cfg)          # DataIterator
    batch = next(it)                                 # numpy dict (CONTRACTS.md "Batches")
    state = it.get_state()                           # small JSON-serialisable dict
    it2 = make_iterator(data_cfg, model_cfg); it2.set_state(state)   # continues identically

Per epoch ``e`` the pipeline is

    range(len(source)) -> shuffle(seed, e) -> [process_index::process_count]
      -> map(EncodeTransform)       decode + validate + tokenise + preprocess images + teachers
      -> PadBatchDataset            B valid examples, padded to the smallest bucket that fits
      -> mp_prefetch(workers)       (if DataConfig.worker_count > 0)

so every batch has one of ``len(seq_buckets)`` shapes (no recompiles after warm-up). Bad
records become skip markers (``bad_input="skip"``) that the batcher counts by reason; the
iterator logs a summary at the end of each epoch and raises ``TooManySkipsError`` when more
than ``max_skip_fraction`` of an epoch was skipped. With ``bad_input="error"`` the first bad
record raises its ``DataError`` (naming the record and field).

Batch keys (B = batch_size, T = bucket length, M = max_images, S = max_slices):

    input_ids int32[B,T], attention_mask int32[B,T], labels int32[B,T], loss_mask int32[B,T],
    positions int32[B,T], slice_ids int32[B,T], pixel_values float32[B,M,H,W,C],
    image_mask bool[B,M], slice_is_image bool[B,S], slice_mask bool[B,S], sample_index int32[B],
    teacher_<name> float32[B,S,D]

Rows with ``sample_index == -1`` are padding (only in an epoch's last batch when
``drop_remainder=False``). The ``vladva`` task yields ``{"image": batch, "text": batch}``.
"""
from __future__ import annotations

import dataclasses
import logging
import pickle
from typing import Any, Callable, Optional, Sequence

import grain
import numpy as np

from mllm_jax.config import DataConfig, MLLMConfig, VisionConfig
from mllm_jax.data.batching import (Limits, PadBatchDataset, _Collate, blank_like, collate,  # noqa: F401
                                    pad_seq_lengths, pad_to_length, seq_lengths)
from mllm_jax.data.schema import REASONS, DataError, Sample, validate_sample
from mllm_jax.data.tokenize import TextTokenizer, encode_sample

log = logging.getLogger("mllm_jax.data")


class TooManySkipsError(RuntimeError):
    """More than ``max_skip_fraction`` of the records of an epoch were bad."""


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """How images are prepared for a vision tower (from its ``VisionConfig``).

    ``shortest_edge=None`` (configs that do not set ``vision.resize_shortest_edge``, e.g. the
    scene world's towers, SigLIP's): the whole image is stretched to ``size x size`` with PIL's ``resample``
    filter (bilinear by default), scaled by 1/255 and normalised with ``mean`` / ``std``.

    ``shortest_edge=n`` (towers, LLaVAs and teachers loaded from a folder whose
    ``preprocessor_config.json`` says so): exactly what transformers' ``CLIPImageProcessor`` / ``BitImageProcessor`` do with their
    PIL backend (``CLIPImageProcessorPil`` / ``BitImageProcessorPil``): PIL resize (``resample``)
    of the shorter edge to ``n`` and the longer to ``int(n * long / short)``
    (``get_resize_output_image_size``), the central ``size x size`` crop at
    ``((h - size) // 2, (w - size) // 2)``, zero-padded (centred, the odd pixel after) where the
    resized image is smaller than the crop (``center_crop``), then ``float32(x * (1/255))``
    computed in float64 (``rescale``) and the float32 ``(x - mean) / std``.
    """
    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shortest_edge: Optional[int] = None
    resample: str = "bilinear"

    @classmethod
    def from_vision(cls, v: VisionConfig) -> "ImageSpec":
        return cls(v.image_size, v.num_channels, tuple(v.image_mean), tuple(v.image_std),
                   v.resize_shortest_edge, v.resample)

    def _resize(self, img: np.ndarray, h: int, w: int) -> np.ndarray:
        from PIL import Image
        mode = "L" if img.shape[-1] == 1 else "RGB"
        im = Image.fromarray(img[..., 0] if mode == "L" else img, mode)
        flt = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[self.resample]
        return np.asarray(im.resize((w, h), flt)).reshape(h, w, -1)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        """``uint8[h, w, c]`` -> ``float32[size, size, channels]``: resized (stretched, or shortest
        edge + centre crop), scaled by 1/255 and normalised."""
        if img.shape[-1] != self.channels:
            img = np.repeat(img, self.channels, -1) if img.shape[-1] == 1 else \
                np.round(img.mean(-1, keepdims=True)).astype(np.uint8)
        if self.shortest_edge is None:
            if img.shape[0] != self.size or img.shape[1] != self.size:
                img = self._resize(img, self.size, self.size)
            x = img.astype(np.float32) * np.float32(1 / 255)
        else:
            h, w = img.shape[:2]
            n = self.shortest_edge
            h, w = (int(n * h / w), n) if w <= h else (n, int(n * w / h))
            img = center_crop(self._resize(img, h, w), self.size)
            x = (img.astype(np.float64) * (1 / 255)).astype(np.float32)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The central ``size x size`` of ``[h, w, c]``, as transformers' ``image_transforms.center_crop``:
    offsets ``(h - size) // 2``, ``(w - size) // 2``; an image smaller than the crop is first
    zero-padded to at least ``size`` on each side, ``ceil((new - old) / 2)`` before it."""
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    if top >= 0 and left >= 0:
        return img[top:top + size, left:left + size]
    nh, nw = max(size, h), max(size, w)
    pt, pl = -(-(nh - h) // 2), -(-(nw - w) // 2)
    out = np.zeros((nh, nw) + img.shape[2:], img.dtype)
    out[pt:pt + h, pl:pl + w] = img
    top, left = top + pt, left + pl
    return out[max(0, top):min(nh, top + size), max(0, left):min(nw, left + size)]


class EncodeTransform:
    """Index -> encoded example dict (or a skip marker). Module-level and picklable, so grain
    worker processes can run it."""

    def __init__(self, source, tokenizer: TextTokenizer, tokens_per_image: int, image_spec: ImageSpec,
                 limits: Limits, *, teachers: Sequence = (), bad_input: str = "skip",
                 doc_loss: bool = True, for_generation: bool = False):
        self.source, self.tok, self.tpi, self.spec, self.limits = source, tokenizer, tokens_per_image, image_spec, limits
        self.teachers, self.bad_input, self.doc_loss, self.for_generation = tuple(teachers), bad_input, doc_loss, for_generation

    def __call__(self, index: int):
        index = int(index)
        try:
            raw = self.source[index]
            if isinstance(raw, dict):
                return {k: self.encode(v, index) for k, v in raw.items()}
            return self.encode(raw, index)
        except DataError as e:
            if self.bad_input == "error":
                raise
            return {"_skip": REASONS.index(e.reason), "_message": str(e)}

    def encode(self, sample: Sample, index: int) -> dict:
        """One sample -> its unpadded example dict (``collate``'s input); raises ``DataError``.
        Public so that evaluation encodes samples exactly as training does."""
        full = validate_sample(sample)
        sample = full.prompt_only() if self.for_generation and full.is_chat else full
        lim = self.limits
        if sample.num_images > lim.max_images:
            raise DataError("too_many_images", sample.id, "segments",
                            f"{sample.num_images} images > data.max_images={lim.max_images}")
        if len(sample.segments) > lim.max_slices:
            raise DataError("too_many_slices", sample.id, "segments",
                            f"{len(sample.segments)} segments > data.max_slices={lim.max_slices}")
        enc = encode_sample(sample, self.tok, self.tpi, doc_loss=self.doc_loss,
                            add_generation_prompt=True if sample is not full else None)
        if len(enc.input_ids) > lim.seq_buckets[-1]:
            raise DataError("too_long", sample.id, "segments",
                            f"{len(enc.input_ids)} tokens > the largest bucket {lim.seq_buckets[-1]} "
                            "(raise data.seq_buckets or shorten the record)")
        pixels = np.stack([self.spec(im) for im in enc.images]) if enc.images else \
            np.zeros((0, self.spec.size, self.spec.size, self.spec.channels), np.float32)
        ex = {"input_ids": enc.input_ids, "target": enc.target, "slice_ids": enc.slice_ids,
              "slice_is_image": enc.slice_is_image, "pixel_values": pixels, "sample_index": index}
        for t in self.teachers:         # computed (or cached) on the full sample, one row per segment
            f = np.asarray(t.features(full), np.float32)
            if f.shape != (len(full.segments), t.dim):
                raise ValueError(f"teacher {t.name}: features for {full.id} have shape {f.shape}, "
                                 f"expected ({len(full.segments)}, {t.dim}) (one row per segment)")
            ex[f"teacher_{t.name}"] = f[:len(sample.segments)]
        return ex


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def shard_indices(n: int, process_index: int, process_count: int, drop_remainder: bool) -> slice:
    """The slice of a (shuffled) index range read by one process: strided, disjoint; with
    ``drop_remainder`` every process gets exactly ``n // process_count`` (same number of steps)."""
    stop = (n // process_count) * process_count if drop_remainder else n
    return slice(process_index, stop, process_count)


def build_dataset(transform: EncodeTransform, num_records: int, collate_fn: Callable, *, batch_size: int,
                  seed: int, epoch: int, shuffle: bool, shard: tuple[int, int], even_shards: bool,
                  workers: int = 0, worker_buffer_size: int = 2):
    """One epoch of the pipeline as a grain ``IterDataset``."""
    ds = grain.MapDataset.range(num_records)
    if shuffle:
        ds = ds.shuffle(seed=epoch_seed(seed, epoch))
    if shard[1] > 1:
        ds = ds[shard_indices(num_records, shard[0], shard[1], even_shards)]
    ds = ds.map(transform)
    if workers == 0:
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        return PadBatchDataset(it, batch_size, collate_fn)
    # Workers encode runs of ``batch_size`` consecutive examples (grain hands worker w every
    # workers-th run: one transfer per run, not per example) and the batches are formed here from
    # the examples in index order: the same batches for any worker count. (Batching inside the
    # workers made batch w hold examples w, w+W, ...: paired views never shared a batch.)
    it = ds.batch(batch_size, batch_fn=_pack_run).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=worker_buffer_size))
    return PadBatchDataset(_Unbatch(it), batch_size, collate_fn)


def _pack_run(examples: list) -> np.ndarray:
    """A run of encoded examples as one byte array: grain moves each numpy array of an element
    through its own shared-memory block, and a run of a few dozen small arrays per example cost
    more than the encoding (2 workers: 660-770 samples/s vs 1,700 when one collated batch
    crossed). Serialised between this pipeline's own processes only, never stored."""
    return np.frombuffer(pickle.dumps(examples, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)


class _Unbatch(grain.IterDataset):
    """The examples of the parent's packed runs (``_pack_run``), in order; its state is the
    parent's state before the current run and the position in it (a batch may end inside a run)."""

    def __iter__(self):
        return _UnbatchIterator(self._parent.__iter__())


class _UnbatchIterator(grain.DatasetIterator):
    def __init__(self, parent):
        super().__init__(parent)
        self._before, self._items, self._pos = parent.get_state(), [], 0

    def _next_run(self) -> list:
        return pickle.loads(next(self._parent))

    def __next__(self):
        while self._pos >= len(self._items):
            before = self._parent.get_state()
            self._items = self._next_run()
            self._before, self._pos = before, 0
        self._pos += 1
        return self._items[self._pos - 1]

    def get_state(self):
        return {"parent": self._before, "pos": self._pos}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._before, self._items, self._pos = state["parent"], [], 0
        if state["pos"]:
            self._items, self._pos = self._next_run(), state["pos"]


class DataIterator:
    """Epochs over a per-epoch grain pipeline, with skip accounting and exact resume.

    ``get_state()`` -> ``{"epoch", "grain", "kept", "dropped", "skipped", "batches", "messages",
    "workers", "signature"}`` (JSON); ``set_state`` rebuilds that epoch's pipeline and moves grain's iterator
    to the saved point. ``signature`` (``make_iterator``: the number of records, batch size, seed,
    shuffle, drop_remainder) says what the position is a position in: a state saved under another
    one is refused, since it would resume at a point of another order.
    ``summaries`` lists one dict per finished epoch: kept, skipped by reason."""

    def __init__(self, build: Callable[[int], Any], *, num_epochs: Optional[int], batch_size: int,
                 drop_remainder: bool, max_skip_fraction: float, check_after: int = 1000, workers: int = 0,
                 pad_id: int = 0, signature: Optional[dict] = None):
        self._build, self.num_epochs, self.batch_size, self.workers = build, num_epochs, batch_size, workers
        self.signature = dict(signature) if signature is not None else None
        self.pad_id = pad_id
        self.drop_remainder, self.max_skip_fraction, self.check_after = drop_remainder, max_skip_fraction, check_after
        self.epoch, self._it, self._pending_state = 0, None, None
        self.kept, self.dropped, self.skipped = 0, 0, np.zeros(len(REASONS), np.int64)
        self.summaries: list[dict] = []
        self._messages: list[str] = []
        self._batches_this_epoch = 0

    def __iter__(self):
        return self

    def _open(self):
        self._it = iter(self._build(self.epoch))
        if self._pending_state is not None:
            self._it.set_state(self._pending_state)
            self._pending_state = None

    def __next__(self) -> dict:
        while True:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                raise StopIteration
            if self._it is None:
                self._open()
            try:
                batch = next(self._it)
            except StopIteration:
                self._end_epoch()
                continue
            valid = int(batch.pop("_valid"))
            self.skipped += np.asarray(batch.pop("_skipped"))
            self._messages += list(batch.pop("_messages"))[:max(0, 8 - len(self._messages))]
            if valid < self.batch_size and self.drop_remainder:
                self.dropped += valid          # the incomplete last batch of the epoch
            else:
                self.kept += valid
            self._check(final=False)
            if valid == 0 or (valid < self.batch_size and self.drop_remainder):
                continue
            self._batches_this_epoch += 1
            return batch

    def _check(self, final: bool):
        total = self.kept + self.dropped + int(self.skipped.sum())
        if total == 0 or (not final and total < self.check_after):
            return
        frac = float(self.skipped.sum()) / total
        if frac > self.max_skip_fraction:
            raise TooManySkipsError(
                f"data epoch {self.epoch}: {int(self.skipped.sum())} of {total} records skipped ({frac:.1%} > "
                f"max_skip_fraction={self.max_skip_fraction}): {self._reasons()}; first: {self._messages[:3]}")

    def _reasons(self) -> dict[str, int]:
        return {r: int(n) for r, n in zip(REASONS, self.skipped) if n}

    def _end_epoch(self):
        summary = {"epoch": self.epoch, "kept": self.kept, "dropped_remainder": self.dropped,
                   "skipped": int(self.skipped.sum()), "by_reason": self._reasons(), "examples": self._messages[:3]}
        self.summaries.append(summary)
        log.info("data epoch %d: %d records kept, %d skipped %s", self.epoch, self.kept, summary["skipped"],
                 summary["by_reason"] or "")
        if summary["skipped"]:
            log.warning("data epoch %d skipped records, e.g. %s", self.epoch, "; ".join(summary["examples"]))
        self._check(final=True)
        if self._batches_this_epoch == 0:
            raise RuntimeError(f"data epoch {self.epoch} produced no batches ({summary}); the source is empty "
                               "or smaller than one batch with drop_remainder=True")
        self.close()
        self.epoch += 1
        self.kept, self.dropped, self.skipped = 0, 0, np.zeros(len(REASONS), np.int64)
        self._messages, self._batches_this_epoch = [], 0

    # processes of a multi-process run pick their buckets alone; before their rows become one
    # global array they agree on the longest (distributed.next_step_on_every_process)
    def seq_lengths(self, batch: dict) -> dict[str, int]:
        return seq_lengths(batch)

    def pad_seq_lengths(self, batch: dict, lengths: dict[str, int]) -> dict:
        return pad_seq_lengths(batch, lengths, self.pad_id)

    def blank_like(self, batch: dict) -> dict:
        """Padding rows only: what a process whose eval data ended feeds while others go on."""
        return blank_like(batch, self.pad_id)

    def get_state(self) -> dict:
        grain_state = self._it.get_state() if self._it is not None else self._pending_state
        return {"epoch": self.epoch, "grain": grain_state, "kept": self.kept, "dropped": self.dropped,
                "skipped": [int(x) for x in self.skipped], "batches": self._batches_this_epoch,
                "messages": list(self._messages), "workers": self.workers, "signature": self.signature}

    def set_state(self, state: dict) -> None:
        was = state.get("signature")
        if was is not None and self.signature is not None and was != self.signature:
            changed = ", ".join(f"{k} {was.get(k)!r} -> {self.signature.get(k)!r}"
                                for k in sorted(set(was) | set(self.signature)) if was.get(k) != self.signature.get(k))
            raise ValueError(f"data iterator state was saved for other data ({changed}): its position would "
                             f"resume at a point of another order. Resume with the settings it was saved with, "
                             f"or set train.checkpoint.restore_data=false to start the data from its beginning")
        saved = state.get("workers")
        if saved is not None and saved != self.workers:
            # grain's iterator state holds one position per worker process (or one in-process
            # position): it cannot move between worker counts, though the batches are the same
            raise ValueError(f"data iterator state was saved with data.worker_count={saved}, this "
                             f"iterator has worker_count={self.workers}: resume with "
                             f"data.worker_count={saved}")
        self.close()
        self.epoch, self.kept, self.dropped = int(state["epoch"]), int(state["kept"]), int(state.get("dropped", 0))
        self.skipped = np.asarray(state["skipped"], np.int64)
        self._batches_this_epoch = int(state.get("batches", 0))
        self._messages = [str(m) for m in state.get("messages", [])]    # the skips' examples (summary, errors)
        self._pending_state = state["grain"]

    def close(self):
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


def _views_of(source) -> Optional[tuple[str, ...]]:
    """View names when the source yields dicts of samples (e.g. the vladva task), else None."""
    if hasattr(source, "views"):
        return source.views
    for i in range(min(len(source), 8)):
        try:
            item = source[i]
        except DataError:
            continue
        return tuple(item) if isinstance(item, dict) else None
    return None


def make_iterator(cfg: DataConfig, model: MLLMConfig, *, source=None, tokenizer: Optional[TextTokenizer] = None,
                  teachers: Optional[Sequence] = None, shard: Optional[tuple[int, int]] = None,
                  for_generation: bool = False) -> DataIterator:
    """The training/eval iterator for ``cfg`` feeding a model with config ``model``.

    ``source`` (any object with ``__len__``/``__getitem__`` returning ``Sample``s, e.g. a list
    of eval samples) overrides ``cfg.source``; ``teachers`` (objects with ``name``, ``dim``,
    ``features(sample)``) override ``cfg.teachers``; ``shard`` = (index, count) overrides
    ``jax.process_index()/process_count()``."""
    from mllm_jax.data.sources import open_source, open_teachers
    if tokenizer is None:
        if cfg.tokenizer is None:
            raise ValueError("data.tokenizer is not set: train one with mllm_jax.data.tokenize.train_tokenizer "
                             "(or `python -m mllm_jax.data.tokenize --out DIR`) and set data.tokenizer=DIR")
        tokenizer = TextTokenizer.from_dir(cfg.tokenizer)
    n_ids = max(tokenizer.tok.get_vocab(with_added_tokens=True).values()) + 1
    if n_ids > model.decoder.vocab_size:   # the embedding lookup would give NaN rows for the ids above
        raise ValueError(f"tokenizer {tokenizer.source}: its ids go up to {n_ids - 1} but the model's "
                         f"embedding has model.decoder.vocab_size={model.decoder.vocab_size} rows; set "
                         f"model.decoder.vocab_size >= {n_ids} or use a tokenizer made for this model")
    if tokenizer.image_id != model.image_token_id:
        raise ValueError(f"tokenizer {tokenizer.source}: <image> has id {tokenizer.image_id} but "
                         f"model.image_token_id={model.image_token_id}; set them equal")
    if cfg.soft_prompts:
        from mllm_jax.data.tokenize import SOFT
        if cfg.soft_prompts != model.num_soft_prompts:
            raise ValueError(f"data.soft_prompts={cfg.soft_prompts} but model.num_soft_prompts="
                             f"{model.num_soft_prompts}; set them equal")
        if tokenizer.tok.token_to_id(SOFT) != model.soft_prompt_token_id:
            raise ValueError(f"tokenizer {tokenizer.source}: {SOFT} has id {tokenizer.tok.token_to_id(SOFT)} "
                             f"but model.soft_prompt_token_id={model.soft_prompt_token_id}; set them equal")
    source = open_source(cfg) if source is None else source
    teachers = open_teachers(cfg, model, source) if teachers is None else list(teachers)
    if shard is None:
        import jax
        shard = (jax.process_index(), jax.process_count()) if cfg.shard_by_process else (0, 1)
    limits = Limits(tuple(cfg.seq_buckets), cfg.max_images, cfg.max_slices)
    spec = ImageSpec.from_vision(model.vision)
    transform = EncodeTransform(source, tokenizer, model.tokens_per_image, spec, limits, teachers=teachers,
                                bad_input=cfg.bad_input, doc_loss=cfg.doc_loss, for_generation=for_generation)
    views = _views_of(source)
    collate_fn = _Collate(cfg.batch_size, limits, (spec.size, spec.size, spec.channels), tokenizer.pad_id,
                          {t.name: t.dim for t in teachers}, views)

    def build(epoch: int):
        return build_dataset(transform, len(source), collate_fn, batch_size=cfg.batch_size, seed=cfg.seed,
                             epoch=epoch, shuffle=cfg.shuffle, shard=shard, even_shards=cfg.drop_remainder,
                             workers=cfg.worker_count, worker_buffer_size=cfg.worker_buffer_size)

    signature = {"records": len(source), "batch_size": cfg.batch_size, "seed": cfg.seed, "shuffle": cfg.shuffle,
                 "drop_remainder": cfg.drop_remainder}
    return DataIterator(build, num_epochs=cfg.num_epochs, batch_size=cfg.batch_size,
                        drop_remainder=cfg.drop_remainder, max_skip_fraction=cfg.max_skip_fraction,
                        workers=cfg.worker_count, pad_id=tokenizer.pad_id, signature=signature)


__all__ = [
    "TooManySkipsError", "ImageSpec", "Limits", "EncodeTransform", "collate", "pad_to_length", "seq_lengths",
    "pad_seq_lengths", "blank_like", "PadBatchDataset",
    "epoch_seed", "shard_indices", "build_dataset", "DataIterator", "make_iterator",
]
