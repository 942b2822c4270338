"""Lists of ``Sample``s -> fixed-shape model batches, encoded exactly as in training.

    enc = BatchEncoder(tokenizer, model_cfg, data_cfg, batch_size=32)
    for rows, batch in enc.batches(samples, for_generation=True):
        ...   # batch: CONTRACTS.md "Batches" dict; rows: int[n] indices into `samples`

Every sample goes through the data pipeline's own ``EncodeTransform.encode`` (validation,
tokenizer, chat template, pre-expanded image tokens, image preprocessing) and ``collate``
(padding), so evaluation sees the bytes training sees. Shapes are bucketed so a jitted
function compiles once per bucket: the batch size is fixed, the length is one of
``data_cfg.seq_buckets`` (extended by doubling up to the decoder's ``max_position_embeddings``,
so that a long eval item is never dropped: padding does not change what the model computes)
and the image axis ``M`` is 0 (no images: ``pixel_values`` is None), or a power of two up to
``data_cfg.max_images``. Samples are grouped by bucket (sorted by
length inside it); rows past the last real one repeat row 0 (a real prompt, so generation
never sees an empty row) and are not returned in ``rows``.

Views: ``document_view`` (plain document, the form of Sugar's pair/story samples) and
``prompt_view`` (a user turn ending with the E5-V / VladVA summary prompt, as the ``vladva``
training task renders it).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import numpy as np

from mllm_jax.config import DataConfig, MLLMConfig
from mllm_jax.data.pipeline import EncodeTransform, ImageSpec, Limits, collate
from mllm_jax.data.schema import Sample, text_segment
from mllm_jax.data.synthetic_sets import summary_prompt
from mllm_jax.data.tokenize import TextTokenizer


def _content(sample: Sample) -> tuple:
    """The sample's segments without assistant turns (the answer is never part of an embedding)."""
    return tuple(s for s in sample.segments if s.role != "assistant")


def document_view(sample: Sample) -> Sample:
    """The sample as a plain document (roles dropped, assistant turns removed)."""
    segs = tuple(dataclasses.replace(s, role=None) for s in _content(sample))
    return dataclasses.replace(sample, segments=segs)


def prompt_view(sample: Sample, soft_prompts: int = 0) -> Sample:
    """The sample as one user turn ending with the summary prompt: the image prompt when the
    sample shows an image, the sentence prompt otherwise (the ``vladva`` task's two views);
    ``soft_prompts`` learned slots instead when the model was trained with them."""
    segs = [dataclasses.replace(s, role="user") for s in _content(sample)]
    prompt = summary_prompt(any(s.is_image for s in segs), soft_prompts)
    return dataclasses.replace(sample, segments=tuple(segs) + (text_segment(prompt, "user"),))


def length_buckets(seq_buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    """``seq_buckets`` followed by doublings of the largest one that stay ``<= max_length``."""
    out = list(seq_buckets)
    while out[-1] * 2 <= max_length:
        out.append(out[-1] * 2)
    return tuple(out)


def image_buckets(max_images: int) -> tuple[int, ...]:
    """``(1, 2, 4, ..., max_images)``: the image-axis sizes a batch may take."""
    out, m = [], 1
    while m < max_images:
        out.append(m)
        m *= 2
    return tuple(out) + ((max_images,) if max_images else ())


class BatchEncoder:
    """Encodes and pads samples for a model with config ``model_cfg`` (see the module docstring).

    ``data_cfg`` gives the tokenizer limits (``seq_buckets``, ``max_images``, ``max_slices``)
    and the default batch size."""

    def __init__(self, tokenizer: TextTokenizer, model_cfg: MLLMConfig, data_cfg: DataConfig, *,
                 batch_size: Optional[int] = None):
        if tokenizer.image_id != model_cfg.image_token_id:
            raise ValueError(f"tokenizer {tokenizer.source}: <image> has id {tokenizer.image_id} but "
                             f"model.image_token_id={model_cfg.image_token_id}; set them equal")
        self.tokenizer, self.model_cfg, self.data_cfg = tokenizer, model_cfg, data_cfg
        self.batch_size = int(batch_size or data_cfg.batch_size)
        buckets = length_buckets(data_cfg.seq_buckets, model_cfg.decoder.max_position_embeddings)
        self.limits = Limits(buckets, data_cfg.max_images, data_cfg.max_slices)
        self.spec = ImageSpec.from_vision(model_cfg.vision)
        self.m_buckets = image_buckets(data_cfg.max_images)

    def transform(self, samples: Sequence[Sample], for_generation: bool = False) -> EncodeTransform:
        """The training pipeline's transform over ``samples`` (bad input raises, naming the sample)."""
        return EncodeTransform(samples, self.tokenizer, self.model_cfg.tokens_per_image, self.spec,
                               self.limits, bad_input="error", doc_loss=self.data_cfg.doc_loss,
                               for_generation=for_generation)

    def examples(self, samples: Sequence[Sample], *, for_generation: bool = False) -> list[dict]:
        """Unpadded example dicts (``collate``'s input), one per sample, in order.
        ``for_generation``: conversations lose their trailing answer and end with the
        assistant header (the generation prompt)."""
        t = self.transform(samples, for_generation)
        return [t.encode(s, i) for i, s in enumerate(samples)]

    def bucket(self, example: dict) -> tuple[int, int]:
        """``(M, T)`` of the batch an example goes into (M = 0: no images)."""
        n_img, length = len(example["pixel_values"]), len(example["input_ids"])
        m = next(b for b in self.m_buckets if b >= n_img) if n_img else 0
        return m, next(b for b in self.limits.seq_buckets if b >= length)

    def collate(self, examples: list[dict], m: int) -> dict[str, np.ndarray]:
        """Pads ``examples`` (<= batch_size) to one batch with ``m`` image rows; missing rows
        repeat the first example. ``pixel_values``/``image_mask`` are None when ``m == 0``."""
        rows = list(examples) + [examples[0]] * (self.batch_size - len(examples))
        lim = dataclasses.replace(self.limits, max_images=max(m, 1))
        batch = collate(rows, self.batch_size, lim, (self.spec.size, self.spec.size, self.spec.channels),
                        self.tokenizer.pad_id, {})
        if m == 0:
            batch["pixel_values"] = batch["image_mask"] = None
        return batch

    def batches(self, samples: Sequence[Sample], *, for_generation: bool = False
                ) -> Iterator[tuple[np.ndarray, dict]]:
        """``(rows int[n], batch)`` covering every sample once, grouped by bucket."""
        exs = self.examples(samples, for_generation=for_generation)
        keys = [self.bucket(e) for e in exs]
        order = sorted(range(len(exs)), key=lambda i: (keys[i], len(exs[i]["input_ids"])))
        groups: dict[tuple[int, int], list[int]] = {}
        for i in order:
            groups.setdefault(keys[i], []).append(i)
        for (m, _), idx in groups.items():
            for lo in range(0, len(idx), self.batch_size):
                rows = np.asarray(idx[lo:lo + self.batch_size])
                yield rows, self.collate([exs[i] for i in rows], m)


__all__ = ["BatchEncoder", "document_view", "prompt_view", "length_buckets", "image_buckets"]
