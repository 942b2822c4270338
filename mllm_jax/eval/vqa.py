"""VQA exact-match accuracy, by generation or by scoring the closed answer vocabulary.

    evaluate_vqa(answerer, vqa_set(world, "test", 200), mode="generate", max_objects=4)
    -> {"acc": .., "by_type": {"colour": .., ...}, "mode": "generate", "n": 200}

``mode="generate"``: greedy answer, normalised (``answer.normalize_answer``), compared with the
normalised reference. ``mode="loglik"``: the most likely answer among the closed vocabulary of
the question's type (``answer_vocabulary``), which cannot produce an off-vocabulary string, so
its accuracy is an upper bound on what the weights know, not a generation metric.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from mllm_jax.data import synthetic as W
from mllm_jax.data.schema import Sample
from mllm_jax.eval.answer import Answerer, normalize_answer

MODES = ("generate", "loglik")
MAX_NEW_TOKENS = 8


def answer_vocabulary(max_objects: int = 4) -> dict[str, tuple[str, ...]]:
    """The scene world's closed answer set per VQA question type (``synthetic_tasks.VQA_TYPES``)."""
    yes_no = ("yes", "no")
    return {"colour": W.COLOURS, "shape": W.SHAPES, "count": W.NUMBERS[:max_objects + 1], "position": W.CELLS,
            "size": W.SIZES, "exist": yes_no, "relation": yes_no}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """``bool[N]``: normalised prediction == normalised reference."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return np.array([normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)], bool)


def evaluate_vqa(answerer: Answerer, samples: Sequence[Sample], *, mode: str = "generate",
                 max_objects: int = 4, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Accuracy overall and per question type (``sample.meta["qtype"]``)."""
    if mode not in MODES:
        raise ValueError(f"vqa mode {mode!r}: expected one of {MODES}")
    if not samples:
        raise ValueError("evaluate_vqa: no samples; VQA accuracy needs at least one question")
    refs = [s.meta["answer"] for s in samples]
    if mode == "generate":
        preds = answerer.generate(samples, max_new_tokens)
    else:
        vocab = answer_vocabulary(max_objects)
        missing = sorted({s.meta.get("qtype") for s in samples} - set(vocab))
        if missing:
            raise ValueError(f"vqa loglik mode: no closed answer set for question types {missing}")
        preds = answerer.choose(samples, [vocab[s.meta["qtype"]] for s in samples])
    right = exact_match(preds, refs)
    by = defaultdict(list)
    for s, r in zip(samples, right):
        by[s.meta.get("qtype", "?")].append(r)
    return {"acc": float(right.mean()), "by_type": {k: float(np.mean(v)) for k, v in sorted(by.items())},
            "mode": mode, "n": len(samples), "examples": list(zip(refs, preds))[:5]}


__all__ = ["MODES", "answer_vocabulary", "exact_match", "evaluate_vqa"]
