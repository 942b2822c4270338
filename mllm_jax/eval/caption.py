"""Captioning: BLEU-1..4, ROUGE-L and CIDEr through pycocoevalcap's pure-Python scorers (its
``Cider`` is the COCO toolkit's CIDEr, i.e. CIDEr-D: clipped counts, length penalty, x10).

pycocoevalcap's PTB tokenizer runs Java; we do not. Both references and hypotheses go through
``simple_tokenize`` instead (lowercase, every character that is not a letter, digit or space
becomes a space, whitespace collapsed), so scores are comparable across our runs but not
digit-for-digit with numbers from the official Java pipeline. pycocoevalcap is imported lazily
(it is a test dependency, not a runtime one): without it ``caption_scores`` raises an
ImportError saying how to install it, and the rest of the suite still runs.

BLEU is corpus-level (pycocoevalcap's ``closest`` reference length), ROUGE-L the mean over
samples (beta 1.2), CIDEr the corpus mean (its range is [0, 10], not [0, 1]).
"""
from __future__ import annotations

import itertools
import re
from typing import Optional, Sequence

from mllm_jax.data import synthetic as W
from mllm_jax.data.schema import Sample

_NON_WORD = re.compile(r"[^a-z0-9\s]")
MAX_NEW_TOKENS = 32


def simple_tokenize(text: str) -> str:
    """``"A red circle, and a Blue square."`` -> ``"a red circle and a blue square"``."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def _scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:
        raise ImportError(f"captioning metrics need pycocoevalcap ({e}); `pip install pycocoevalcap==1.2` "
                          "(it is in requirements-test.txt), or leave 'caption' out of the suite's tasks") from None
    return Bleu, Rouge, Cider


def caption_scores(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> dict[str, float]:
    """``references[i]``: one or more reference captions of item ``i``; ``hypotheses[i]``: the
    generated caption. Returns ``bleu1..bleu4``, ``rougeL``, ``cider``."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference lists but {len(hypotheses)} hypotheses (need one each)")
    if not hypotheses:
        raise ValueError("caption_scores: no items (0 hypotheses and 0 reference lists); captioning metrics "
                         "need at least one")
    if any(len(r) == 0 for r in references):
        raise ValueError("every item needs at least one reference caption")
    Bleu, Rouge, Cider = _scorers()
    gts = {i: [simple_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [simple_tokenize(h)] for i, h in enumerate(hypotheses)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}, "rougeL": float(rouge), "cider": float(cider)}


def short_caption_references(sample: Sample, limit: Optional[int] = None) -> list[str]:
    """Every ordering of the objects of a ``caption_set`` sample's scene in the short-caption
    phrasing (the data layer draws one ordering at random; all are equally right): up to 6! = 720
    (``limit`` caps them; the sample's own caption is always one). A cap of 24 orderings, all
    starting with the first object, missed the drawn caption of most 5- and 6-object scenes."""
    objs = sample.scene.objects
    refs = [W.listing([W.with_article(o.phrase()) for o in perm])
            for perm in itertools.islice(itertools.permutations(objs), limit)]
    answer = (sample.meta or {}).get("answer")
    if answer is not None and answer not in refs:
        refs.insert(0, answer)
    return refs


def evaluate_captions(answerer, samples: Sequence[Sample], *, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Greedy captions of ``synthetic_sets.caption_set`` samples (short captions) scored against
    all object orderings."""
    if not samples:
        raise ValueError("evaluate_captions: no samples; captioning metrics need at least one")
    hyps = answerer.generate(samples, max_new_tokens)
    refs = [short_caption_references(s) for s in samples]
    return {**caption_scores(refs, hyps), "n": len(samples), "tokenizer": "simple (lowercase, no punctuation)",
            "examples": list(zip([s.meta["answer"] for s in samples], hyps))[:5]}


__all__ = ["simple_tokenize", "caption_scores", "short_caption_references", "evaluate_captions"]
