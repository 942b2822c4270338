"""Captioning scores: our wrapper == pycocoevalcap's scorers called directly on the same
tokenised strings; a BLEU-4 computed by hand; the tokenizer; scene-world references."""
import itertools

import pytest

pytest.importorskip("pycocoevalcap")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402

from mllm_jax.data.synthetic_sets import caption_set  # noqa: E402
from mllm_jax.eval.caption import caption_scores, short_caption_references, simple_tokenize  # noqa: E402

REFS = [["A red circle and a blue square.", "a blue square and a red circle"],
        ["There are two objects.", "two objects: a cross and a diamond"],
        ["a small green triangle at the top left"],
        ["The yellow diamond is left of the pink cross."]]
HYPS = ["a red circle and a blue square", "there are three objects", "a green triangle on the left",
        "the pink cross is left of the yellow diamond"]


def test_simple_tokenize():
    assert simple_tokenize("A red circle, and a Blue square.") == "a red circle and a blue square"
    assert simple_tokenize("two objects:  a cross\tand a diamond!") == "two objects a cross and a diamond"
    assert simple_tokenize("...") == ""


def test_wrapper_equals_pycocoevalcap_on_the_same_tokens():
    ours = caption_scores(REFS, HYPS)
    gts = {i: [simple_tokenize(r) for r in refs] for i, refs in enumerate(REFS)}
    res = {i: [simple_tokenize(h)] for i, h in enumerate(HYPS)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    assert [ours[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert ours["rougeL"] == pytest.approx(rouge, abs=1e-12)
    assert ours["cider"] == pytest.approx(cider, abs=1e-12)
    assert 0 < ours["bleu4"] < ours["bleu1"] < 1 and ours["cider"] > 0


def test_bleu4_by_hand():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (same length: no brevity penalty)
    # clipped n-gram precisions: 5/6, 3/5, 2/4, 1/3 -> BLEU-4 = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4)
    s = caption_scores([["The cat sat on a mat."]], ["the cat sat on the mat"])
    assert s["bleu1"] == pytest.approx(5 / 6, abs=1e-6)
    assert s["bleu2"] == pytest.approx((5 / 6 * 3 / 5) ** 0.5, abs=1e-6)
    assert s["bleu4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    same = caption_scores([["a red circle and a blue square"]], ["A red circle and a blue square."])
    assert same["bleu4"] == pytest.approx(1.0, abs=1e-6) and same["rougeL"] == pytest.approx(1.0)


def test_caption_input_errors():
    with pytest.raises(ValueError, match="2 reference lists but 1"):
        caption_scores([["a"], ["b"]], ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores([[]], ["a"])


def test_short_caption_references_cover_the_sampled_caption(world):
    for s in caption_set(world, "test", 12):
        refs = short_caption_references(s)
        assert s.meta["answer"] in refs
        assert len(refs) == len(set(refs)) == len(list(itertools.permutations(s.scene.objects)))


def test_short_caption_references_of_five_and_six_object_scenes():
    """All 5! / 6! orderings (a cap of 24 left out the drawn caption of most such scenes), and a
    perfect captioner scores 1 on BLEU-4 and ROUGE-L."""
    from mllm_jax.config import SceneConfig
    from mllm_jax.data.synthetic import SceneWorld
    samples = caption_set(SceneWorld(SceneConfig(min_objects=5, max_objects=6)), "test", 12)
    refs = [short_caption_references(s) for s in samples]
    for s, r in zip(samples, refs):
        assert len(r) == len(set(r)) == len(list(itertools.permutations(s.scene.objects))) >= 120
        assert s.meta["answer"] in r
    scores = caption_scores(refs, [s.meta["answer"] for s in samples])
    assert scores["bleu4"] == pytest.approx(1.0) and scores["rougeL"] == pytest.approx(1.0)
