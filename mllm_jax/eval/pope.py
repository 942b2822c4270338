"""POPE object-hallucination probes: accuracy, precision, recall, F1 and yes-ratio of yes/no
answers, per negative-sampling strategy (random, popular, adversarial) and overall.

``mode="generate"``: the greedy answer is read as the official POPE script reads it
(RUCAIBox/POPE ``evaluate.py``, LLaVA's ``eval_pope.py``): only its first sentence counts, and
a negation in it makes it "no" wherever it stands ("Yes, there is not" -> "no"). Unlike the
official script, which calls everything else "yes", the answer must then say ``yes`` to be
"yes"; one with neither is *unparsed* (``parse_yes_no`` returns None) and wrong everywhere (the
fraction is reported): for accuracy, and for precision/recall it is the wrong answer to the
probe (a false positive on a "no" probe, a false negative on a "yes" probe), so an answer that
cannot be read never raises F1.
``mode="loglik"``: ``yes`` if ``log p(yes) >= log p(no)`` (always parsed).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from mllm_jax.data.schema import Sample
from mllm_jax.eval.answer import Answerer, normalize_answer

MODES = ("generate", "loglik")
MAX_NEW_TOKENS = 4
NEGATIONS = frozenset(("no", "not", "cannot"))
# a contraction's negation ("isn't", "doesn't", "can't", typographic apostrophe too), looked for
# before normalize_answer turns the apostrophe into a space
_NT = re.compile(r"n['\u2019]t\b")


def parse_yes_no(text: str) -> Optional[str]:
    """The first sentence (the text up to the first ``.``, as the official POPE script keeps)
    decides: a negation in it -> ``"no"``, else the word ``yes`` in it -> ``"yes"``, else
    None (unparsed). Negations are whole words, any case: ``no``, ``not``, ``cannot`` and
    ``n't`` contractions ("isn't", "don't"). The official script counts only ``No``, ``not`` and
    ``no`` (so "Not really" and "There isn't" are "yes" there) and calls every other answer "yes".

    ``"Yes, there is a dog."`` -> ``"yes"``; ``"There is no dog."`` -> ``"no"``;
    ``"Yes there is not"`` -> ``"no"``; ``"A cat. No dog."`` -> None; ``"Blue."`` -> None."""
    first = text.split(".", 1)[0]
    words = normalize_answer(first).split()
    if NEGATIONS.intersection(words) or _NT.search(first.lower()):
        return "no"
    return "yes" if "yes" in words else None


def pope_metrics(predictions: Sequence[Optional[str]], labels: Sequence[str]) -> dict[str, float]:
    """``predictions``: ``"yes" | "no" | None`` (unparsed); ``labels``: ``"yes" | "no"``.
    "yes" is the positive class. An unparsed answer is wrong: a false positive on a "no" probe
    (else a model answering "yes" to present objects and anything but "no" to absent ones would
    get F1 = 1), a false negative on a "yes" probe. Precision is 0 when there is no (false)
    positive at all; ``yes_ratio`` is the fraction of "yes" answers."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("pope_metrics: no probes (predictions and labels are empty); POPE needs at least one")
    bad = sorted({repr(lab) for lab in labels if lab not in ("yes", "no")})
    if bad:
        raise ValueError(f"pope_metrics: labels must be 'yes' / 'no', got {', '.join(bad)}")
    pred = np.array([p == "yes" for p in predictions])
    gold = np.array([lab == "yes" for lab in labels])
    right = np.array([p == lab for p, lab in zip(predictions, labels)])
    unparsed = np.array([p not in ("yes", "no") for p in predictions])
    tp = int((pred & gold).sum())
    fp = int((pred & ~gold).sum() + (unparsed & ~gold).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / gold.sum() if gold.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"acc": float(right.mean()), "precision": float(precision), "recall": float(recall), "f1": float(f1),
            "yes_ratio": float(pred.mean()), "unparsed": float(unparsed.mean())}


def evaluate_pope(answerer: Answerer, sets: dict[str, Sequence[Sample]], *, mode: str = "generate",
                  max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """``sets``: strategy -> probes (``synthetic_sets.pope_set``). Returns the metrics per
    strategy, ``overall`` (all probes pooled) and the ``mode``."""
    if mode not in MODES:
        raise ValueError(f"pope mode {mode!r}: expected one of {MODES}")
    names = list(sets)
    empty = [n for n in names if not len(sets[n])]
    if not names or empty:
        raise ValueError(f"evaluate_pope: no probes for strategies {empty}" if empty else
                         "evaluate_pope: no strategies (sets is empty)")
    samples = [s for n in names for s in sets[n]]
    if mode == "generate":
        preds = [parse_yes_no(t) for t in answerer.generate(samples, max_new_tokens)]
    else:
        preds = answerer.choose(samples, [("yes", "no")] * len(samples))
    labels = [s.meta["answer"] for s in samples]
    out, lo = {"mode": mode}, 0
    for n in names:
        hi = lo + len(sets[n])
        out[n] = pope_metrics(preds[lo:hi], labels[lo:hi])
        lo = hi
    out["overall"] = pope_metrics(preds, labels)
    return out


__all__ = ["MODES", "parse_yes_no", "pope_metrics", "evaluate_pope"]
