"""Metrics on hand-built inputs: R@K (ties, several relevant candidates), hard-negative
accuracy, POPE metrics, answer normalisation and yes/no parsing (against the official POPE
script's reading)."""
import numpy as np
import pytest

from mllm_jax.eval.answer import normalize_answer
from mllm_jax.eval.pope import parse_yes_no, pope_metrics
from mllm_jax.eval.retrieval import (hard_negative_accuracy, hard_negative_accuracy_from_scores, ranks,
                                     recall_at_k)
from mllm_jax.eval.vqa import exact_match


def test_recall_at_k_hand_built():
    # query 0: target 0 is best (rank 0); query 1: target 2 is beaten by 0 and 1 (rank 2);
    # query 2: target 1 is beaten by 2 only (rank 1); query 3: target 3 ranks last (rank 3)
    sim = np.array([[0.9, 0.1, 0.2, 0.3],
                    [0.8, 0.7, 0.5, 0.1],
                    [0.1, 0.5, 0.6, 0.2],
                    [0.4, 0.3, 0.2, 0.1]])
    t = np.array([0, 2, 1, 3])
    assert ranks(sim, t).tolist() == [0, 2, 1, 3]
    assert recall_at_k(sim, t, ks=(1, 2, 3, 4)) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}


def test_recall_ties_count_against_the_query():
    sim = np.ones((3, 3))
    assert recall_at_k(sim, np.arange(3), ks=(1, 3)) == {1: 0.0, 3: 1.0}   # a constant scorer is not perfect
    sim = np.array([[0.5, 0.5, 0.1]])
    assert ranks(sim, [0]).tolist() == [1]


def test_recall_with_several_relevant_candidates():
    sim = np.array([[0.1, 0.9, 0.8, 0.2],
                    [0.7, 0.6, 0.9, 0.5]])
    rel = np.array([[True, False, True, False],     # best relevant = 0.8, beaten by 0.9 -> rank 1
                    [False, True, True, False]])    # best relevant = 0.9 -> rank 0
    assert ranks(sim, relevant=rel).tolist() == [1, 0]
    assert recall_at_k(sim, relevant=rel, ks=(1, 2)) == {1: 0.5, 2: 1.0}


def test_recall_input_errors():
    with pytest.raises(ValueError, match="exactly one"):
        ranks(np.eye(2))
    with pytest.raises(ValueError, match="no relevant"):
        ranks(np.eye(2), relevant=np.array([[True, False], [False, False]]))
    with pytest.raises(ValueError, match=r"targets must be int\[2\]"):
        ranks(np.eye(2), [0, 2])
    with pytest.raises(ValueError, match="non-finite"):
        ranks(np.array([[np.nan, 0.0]]), [0])


def test_hard_negative_accuracy_from_scores():
    pos = [0.9, 0.2, 0.5, 0.7, 0.3]
    neg = [0.1, 0.3, 0.5, 0.6, 0.9]            # right, wrong, tie (wrong), right, wrong
    cats = ["swap_att", "swap_att", "add_obj", "add_obj", "replace_rel"]
    assert hard_negative_accuracy_from_scores(pos, neg, cats) == {
        "overall": 0.4, "swap_att": 0.5, "add_obj": 0.5, "replace_rel": 0.0}


class _TableEmbedder:
    """An embedder whose "embedding" is the sample id and whose similarity is a hand-written table."""

    def __init__(self, table):
        self.table = table

    def encode(self, samples):
        return [s.id for s in samples]

    def similarity(self, a, b):
        return np.array([[self.table.get((x, y), 0.0) for y in b] for x in a])


def test_hard_negative_accuracy_shares_images_and_positives():
    from mllm_jax.data.schema import Sample, text_segment
    from mllm_jax.data.synthetic_sets import HardNegativeItem
    s = lambda i: Sample(i, (text_segment(i),))  # noqa: E731
    img1, img2, pos1, pos2 = s("img1"), s("img2"), s("pos1"), s("pos2")
    items = [HardNegativeItem(img1, pos1, s("n1a"), "swap_att"), HardNegativeItem(img1, pos1, s("n1b"), "add_obj"),
             HardNegativeItem(img2, pos2, s("n2a"), "swap_att")]
    table = {("img1", "pos1"): 0.5, ("img1", "n1a"): 0.4, ("img1", "n1b"): 0.6,
             ("img2", "pos2"): 0.3, ("img2", "n2a"): 0.1, ("img2", "pos1"): 0.9}
    assert hard_negative_accuracy(_TableEmbedder(table), items) == {"overall": 2 / 3, "swap_att": 1.0, "add_obj": 0.0}


def test_pope_metrics_hand_made():
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    preds = ["yes", "no", "yes", "yes", "no", None, "no", None]
    # tp = 2 (rows 0, 2); fp = 2 (row 3: "yes" to a "no" probe; row 5: unparsed on a "no" probe);
    # gold yes = 4 (rows 0, 1, 2, 7); right = rows 0, 2, 4, 6
    m = pope_metrics(preds, labels)
    assert m["acc"] == pytest.approx(4 / 8)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(0.5)
    assert m["yes_ratio"] == pytest.approx(3 / 8)
    assert m["unparsed"] == pytest.approx(2 / 8)
    none_yes = pope_metrics(["no", "no"], ["yes", "no"])
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["acc"] == 0.5
    with pytest.raises(ValueError, match="labels must be 'yes' / 'no', got 'maybe'"):
        pope_metrics(["yes", "no"], ["yes", "maybe"])


def test_pope_unparsed_answers_never_raise_f1():
    """A model that says "yes" to every present object and something unreadable to every absent
    one has not answered the "no" probes: F1 = 1 (precision 1) credited it as if it had said "no".
    Unparsed on a "no" probe is a false positive: precision 4 / 8, recall 4 / 4, F1 = 2/3."""
    labels = ["yes"] * 4 + ["no"] * 4
    m = pope_metrics(["yes"] * 4 + [None] * 4, labels)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == 1.0
    assert m["f1"] == pytest.approx(2 / 3) and m["acc"] == 0.5 and m["unparsed"] == 0.5
    # it scores exactly as answering "yes" everywhere does
    yes = pope_metrics(["yes"] * 8, labels)
    assert (yes["precision"], yes["recall"], yes["f1"]) == (m["precision"], m["recall"], m["f1"])
    # and never above answering "no" to the absent objects
    assert pope_metrics(["yes"] * 4 + ["no"] * 4, labels)["f1"] == 1.0 > m["f1"]


def test_answer_normalisation_and_exact_match():
    assert normalize_answer("The Red, circle!") == "red circle"
    assert normalize_answer("  top-left.  ") == "top left"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("") == ""
    assert exact_match(["Red.", "two", "the top left"], ["red", "three", "top left"]).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="2 predictions but 1"):
        exact_match(["a", "b"], ["a"])


def test_number_words_equal_digits_as_in_the_official_vqa_script():
    """vqaEval.py maps number words to digits ("none" and "zero" to "0") before comparing: a
    model answering "2" to "two" is right."""
    assert exact_match(["2", "0", "None", "Two.", "10", "one"],
                       ["two", "zero", "zero", "2", "ten", "1"]).tolist() == [True] * 6
    assert exact_match(["3", "two", "twenty"], ["two", "three", "20"]).tolist() == [False] * 3
    assert normalize_answer("The two red circles") == "2 red circles"
    assert parse_yes_no("No, none.") == "no"


def _official_pope(text: str) -> str:
    """The official POPE reading (RUCAIBox/POPE evaluate.py, LLaVA's eval_pope.py), rewritten:
    first sentence, commas removed, split on spaces; "no" if a word is 'No', 'not' or 'no'."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


POPE_ANSWERS = {
    "Yes, there is a dog.": "yes",
    "There is no dog in the image.": "no",
    "I think yes.": "yes",
    "No.": "no",
    "no": "no",
    "NO!": "no",
    "No, none.": "no",
    "Yes there is not": "no",                      # official: a negation anywhere wins
    "Yes, there is not a dog.": "no",
    "The image shows a cat. No dog.": None,        # the first sentence has neither
    "Yes. There is no dog.": "yes",                # only the first sentence counts
    "Blue.": None,
    "": None,
    "There isn't a dog.": "no",                    # n't contractions negate (not in the official list)
    "There isn\u2019t a dog.": "no",
    "It doesn't appear so.": "no",
    "I cannot see a dog.": "no",
    "Not really.": "no",                           # any case (official: only 'No', 'not', 'no')
    "Nothing there.": None,                        # whole words: 'nothing', 'snow', 'yesterday' are not no / yes
    "Snow, yesterday.": None,
}


@pytest.mark.parametrize("text,expected", list(POPE_ANSWERS.items()))
def test_parse_yes_no_reads_the_first_sentence(text, expected):
    assert parse_yes_no(text) == expected


def test_parse_yes_no_agrees_with_the_official_script_where_it_reads_an_answer():
    """Where the official script says "no", so do we; where we say "yes", so does it. We differ
    only in negations it misses ("isn't", "Not") and in leaving answers with neither unparsed
    (None), which it calls "yes"."""
    for text in POPE_ANSWERS:
        ours, official = parse_yes_no(text), _official_pope(text)
        if official == "no":
            assert ours == "no", text
        if ours == "yes":
            assert official == "yes", text


def test_content_relevance_counts_a_candidate_showing_the_same_scene_as_a_hit():
    """Candidates 0 and 2 are two renders of one scene: a model that cannot tell them apart must
    not lose R@1 on either query (with the target alone relevant it got 1/3 at best)."""
    from mllm_jax.data.schema import Sample, image_segment, text_segment
    from mllm_jax.data.synthetic import Obj, Scene
    from mllm_jax.eval.retrieval import content_relevance
    a, b = Scene((Obj(0, 0, 1, 4),)), Scene((Obj(1, 2, 0, 3),))
    img = lambda i, s: Sample(f"c{i}", (image_segment(np.zeros((4, 4, 3), np.uint8), scene=s),))  # noqa: E731
    cands = [img(0, a), img(1, b), img(2, a),
             Sample("c3", (text_segment("x", scene=a),)),                              # a text, not an image
             Sample("c4", (image_segment(np.zeros((4, 4, 3), np.uint8), scene=a), text_segment("y", scene=b)))]
    rel = content_relevance(cands, [0, 1, 2])
    assert rel.tolist() == [[True, False, True, False, False],
                            [False, True, False, False, False],
                            [True, False, True, False, False]]
    # the two renders of `a` score 0.9 and 0.8 for query 0 and the other way round for query 2
    sim = np.array([[0.9, 0.1, 0.8, 0.2, 0.3],
                    [0.1, 0.7, 0.2, 0.6, 0.5],
                    [0.9, 0.1, 0.8, 0.2, 0.3]])
    assert recall_at_k(sim, [0, 1, 2], ks=(1,)) == {1: 2 / 3}          # query 2's target ranks second
    assert recall_at_k(sim, relevant=rel, ks=(1,)) == {1: 1.0}
    with pytest.raises(ValueError, match="without a scene graph"):
        content_relevance([Sample("t", (text_segment("z"),))], [0])


def _empty_input_cases():
    from mllm_jax.data.schema import Sample, text_segment
    from mllm_jax.eval.caption import caption_scores, evaluate_captions
    from mllm_jax.eval.pope import evaluate_pope
    from mllm_jax.eval.rag import evaluate_rag
    from mllm_jax.eval.retrieval import image_text_retrieval, retrieve
    from mllm_jax.eval.vqa import evaluate_vqa
    s = lambda i: Sample(i, (text_segment(i),))  # noqa: E731
    emb = _TableEmbedder({})
    # the model (answerer / embedder None) is never reached: the empty input is refused first
    return {
        "recall_at_k no queries": (lambda: recall_at_k(np.zeros((0, 3)), []), r"recall_at_k: no queries"),
        "recall_at_k no queries (relevant)": (lambda: recall_at_k(np.zeros((0, 3)), relevant=np.zeros((0, 3), bool)),
                                              r"recall_at_k: no queries"),
        "recall_at_k no candidates": (lambda: recall_at_k(np.zeros((2, 0)), [0, 0]), r"ranks: no candidates"),
        "retrieve no queries": (lambda: retrieve(emb, [], [s("c")], [], ks=(1,)), r"retrieve: no queries"),
        "retrieve no candidates": (lambda: retrieve(emb, [s("q")], [], [0], ks=(1,)), r"retrieve: no candidates"),
        "image_text_retrieval": (lambda: image_text_retrieval(emb, [], []),
                                 r"image_text_retrieval: no images and no texts"),
        "hard_negative_accuracy_from_scores": (lambda: hard_negative_accuracy_from_scores([], [], []),
                                               r"hard_negative_accuracy: no items"),
        "hard_negative_accuracy": (lambda: hard_negative_accuracy(emb, []), r"hard_negative_accuracy: no items"),
        "evaluate_vqa": (lambda: evaluate_vqa(None, []), r"evaluate_vqa: no samples"),
        "pope_metrics": (lambda: pope_metrics([], []), r"pope_metrics: no probes"),
        "evaluate_pope no strategies": (lambda: evaluate_pope(None, {}), r"evaluate_pope: no strategies"),
        "evaluate_pope empty strategy": (lambda: evaluate_pope(None, {"random": [s("p")], "popular": []}),
                                         r"evaluate_pope: no probes for strategies \['popular'\]"),
        "caption_scores": (lambda: caption_scores([], []), r"caption_scores: no items"),
        "evaluate_captions": (lambda: evaluate_captions(None, []), r"evaluate_captions: no samples"),
        "evaluate_rag no questions": (lambda: evaluate_rag(None, None, [s("m")], []), r"evaluate_rag: 0 questions"),
        "evaluate_rag no memory": (lambda: evaluate_rag(None, None, [], [s("q")]), r"and 0 memory entries"),
    }


@pytest.mark.parametrize("case", list(_empty_input_cases()))
def test_every_metric_refuses_empty_input(case):
    """A metric over no items is undefined: each raises a ValueError naming itself and the empty
    input (VQA accuracy and R@k returned NaN, the mean of an empty array)."""
    fn, match = _empty_input_cases()[case]
    with pytest.raises(ValueError, match=match):
        fn()
