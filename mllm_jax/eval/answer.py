"""Answers from the model, two ways: greedy generation, or the log-likelihood of candidates.

    ans = Answerer(model, encoder)
    texts = ans.generate(samples, max_new_tokens=8)          # list[str], one per sample
    scores = ans.score(samples, [["yes", "no"]] * len(samples))   # list[float32[C]]

``generate`` renders each sample's prompt (its conversation without the trailing answer, plus
the assistant header) and decodes greedily through ``MLLM.generate`` until the end of the
assistant turn (``<|im_end|>``) or the tokenizer's EOS. ``score`` renders the full conversation
once per candidate answer (the candidate in place of the sample's last assistant turn), exactly
as training renders it, and sums the log probabilities of the tokens training puts the loss on
(the answer and its ``<|im_end|>``).

``normalize_answer`` is the exact-match normalisation: lowercase, punctuation to spaces,
articles (a, an, the) dropped, number words to digits (the official VQA script's map:
"two" == "2", "none" == "zero" == "0"), whitespace collapsed.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.data.schema import Sample
from mllm_jax.eval.encode import BatchEncoder

_PUNCT = re.compile(r"[^\w\s]")
_ARTICLES = frozenset(("a", "an", "the"))
# the official VQA evaluation's manualMap (vqaEval.py): number words compare equal to digits
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalize_answer(text: str) -> str:
    """``"The Red, circle!"`` -> ``"red circle"``; ``"Two."`` -> ``"2"``."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def with_answer(sample: Sample, answer: str) -> Sample:
    """The conversation with ``answer`` as its last assistant turn."""
    segs = list(sample.segments)
    if not segs or segs[-1].role != "assistant" or segs[-1].kind != "text":
        raise ValueError(f"sample {sample.id}: the last segment is not an assistant text turn; "
                         "candidate scoring needs one to replace")
    segs[-1] = dataclasses.replace(segs[-1], text=answer)
    return dataclasses.replace(sample, segments=tuple(segs))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _target_logprob(graphdef, state, batch):
    """Sum over ``loss_mask`` of ``log p(labels)``: ``float32[B]``."""
    model = nnx.merge(graphdef, state)
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], positions=batch["positions"],
                pixel_values=batch["pixel_values"], image_mask=batch["image_mask"])
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
    return jnp.sum(tok * batch["loss_mask"], axis=1)


class Answerer:
    """Generation and candidate scoring for one ``MLLM`` (state split once here)."""

    def __init__(self, model, encoder: BatchEncoder):
        self.model, self.encoder = model, encoder
        tok = encoder.tokenizer
        # the end of an assistant turn and the tokenizer's own end of document (its EOS: "</s>",
        # "<|endoftext|>", ...), as training renders them
        self.stop_tokens = tok.stop_ids()
        self.graphdef, self.state = nnx.split(model)

    def generate(self, samples: Sequence[Sample], max_new_tokens: int) -> list[str]:
        """Greedy answers (special tokens removed, stripped), one per sample."""
        out = [""] * len(samples)
        tok = self.encoder.tokenizer
        for rows, batch in self.encoder.batches(samples, for_generation=True):
            g = self.model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                    pixel_values=batch["pixel_values"], image_mask=batch["image_mask"],
                                    max_new_tokens=max_new_tokens, stop_tokens=self.stop_tokens,
                                    pad_token_id=tok.pad_id)
            tokens, lengths = np.asarray(g.tokens), np.asarray(g.lengths)
            for r, i in enumerate(rows):
                out[i] = tok.decode(tokens[r, :lengths[r]], skip_special_tokens=True).strip()
        return out

    def score(self, samples: Sequence[Sample], candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """``log p(candidate | prompt)`` for every candidate of every sample: ``float32[C_i]`` each."""
        if len(candidates) != len(samples):
            raise ValueError(f"score: {len(samples)} samples but {len(candidates)} candidate lists")
        flat, owner = [], []
        for i, (s, cands) in enumerate(zip(samples, candidates)):
            flat += [with_answer(s, c) for c in cands]
            owner += [i] * len(cands)
        scores = np.zeros(len(flat), np.float32)
        keys = ("input_ids", "attention_mask", "positions", "pixel_values", "image_mask", "labels", "loss_mask")
        for rows, batch in self.encoder.batches(flat):
            s = _target_logprob(self.graphdef, self.state, {k: batch[k] for k in keys})
            scores[rows] = np.asarray(s)[:len(rows)]
        bounds = np.cumsum([0] + [len(c) for c in candidates])
        return [scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def choose(self, samples: Sequence[Sample], candidates: Sequence[Sequence[str]]) -> list[str]:
        """The most likely candidate of each sample (first one on ties)."""
        return [c[int(np.argmax(s))] for c, s in zip(candidates, self.score(samples, candidates))]


__all__ = ["normalize_answer", "with_answer", "Answerer"]
