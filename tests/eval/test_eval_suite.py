"""Answers (generation and candidate log-likelihoods) against the model called directly on one
unpadded sample; RAG prompts; an end-to-end run of the suite on a tiny random MLLM."""
import functools
import time

import jax
import numpy as np
import pytest
from flax import nnx

from mllm_jax.config import EmbedConfig
from mllm_jax.data.synthetic_sets import pope_set, rag_set, vqa_set
from mllm_jax.data.tokenize import IM_END, encode_sample
from mllm_jax.data.pipeline import ImageSpec
from mllm_jax.eval.answer import Answerer, with_answer
from mllm_jax.eval.encode import BatchEncoder
from mllm_jax.eval.rag import rag_prompt
from mllm_jax.eval.suite import KEYS, TASKS, run_suite
from tests.eval.common import DATA_CFG, MODEL_CFG


def _prompt_inputs(tok, sample):
    """ids ``int32[1, L]`` and image kwargs of a sample's generation prompt, built directly."""
    enc = encode_sample(sample.prompt_only(), tok, MODEL_CFG.tokens_per_image, add_generation_prompt=True)
    spec = ImageSpec.from_vision(MODEL_CFG.vision)
    pix = np.stack([spec(im) for im in enc.images])[None]
    return enc.input_ids[None], dict(pixel_values=pix, image_mask=np.ones(pix.shape[:2], bool))


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids, kw):
    return nnx.merge(graphdef, state)(ids, **kw).logits


def test_candidate_scores_equal_the_log_likelihood_by_hand(model, tok, world):
    samples = vqa_set(world, "test", 2)
    cands = [["red", "top left", "two"], ["yes", "no"]]
    got = Answerer(model, BatchEncoder(tok, MODEL_CFG, DATA_CFG)).score(samples, cands)
    graphdef, state = nnx.split(model)
    for s, cs, g in zip(samples, cands, got):
        ids, kw = _prompt_inputs(tok, s)
        for c, score in zip(cs, g):
            answer = list(tok.encode(c)) + [tok.token_id(IM_END)]
            full = np.concatenate([ids, np.asarray(answer, np.int32)[None]], axis=1)
            logits = np.asarray(_logits(graphdef, state, full, kw)[0], np.float64)
            m = logits.max(-1, keepdims=True)
            logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
            p0 = ids.shape[1] - 1                            # the position that predicts the first answer token
            want = sum(logp[p0 + j, t] for j, t in enumerate(answer))
            assert score == pytest.approx(want, abs=2e-3), (s.id, c)


def test_generation_equals_the_model_on_one_unpadded_prompt(model, tok, world):
    samples = pope_set(world, "test", 2, "random") + vqa_set(world, "test", 1)
    ans = Answerer(model, BatchEncoder(tok, MODEL_CFG, DATA_CFG))
    got = ans.generate(samples, max_new_tokens=5)
    for s, text in zip(samples, got):
        ids, kw = _prompt_inputs(tok, s)
        out = model.generate(ids, max_new_tokens=5, stop_tokens=ans.stop_tokens, pad_token_id=tok.pad_id, **kw)
        want = tok.decode(np.asarray(out.tokens)[0, :int(out.lengths[0])], skip_special_tokens=True).strip()
        assert text == want, s.id


def test_with_answer_and_rag_prompt(world):
    memory, questions = rag_set(world, "test", 2)
    q = questions[0]
    assert with_answer(q, "zuba").segments[-1].text == "zuba"
    with pytest.raises(ValueError, match="assistant"):
        with_answer(q.prompt_only(), "x")
    p = rag_prompt(q, memory[q.meta["memory_index"]])
    assert [s.kind for s in p.segments] == ["image", "text", "image", "text", "text"]
    assert [s.role for s in p.segments] == ["user"] * 4 + ["assistant"]
    assert p.segments[1].text == memory[q.meta["memory_index"]].segments[1].text
    assert rag_prompt(q, None) is q


def test_run_suite_end_to_end_on_a_tiny_random_model(model, tok):
    pytest.importorskip("pycocoevalcap")
    t0 = time.perf_counter()
    res = run_suite(model, tok, DATA_CFG, MODEL_CFG, EmbedConfig(method="prompt"), n=12, tasks=TASKS,
                    batch_size=8, progress=False, budget_s=None)
    elapsed = time.perf_counter() - t0
    assert set(res) == set(KEYS) | {"details"}
    for k in KEYS:
        assert isinstance(res[k], float) and 0.0 <= res[k] <= 1.0, (k, res[k])
    d = res["details"]
    assert set(d["time_s"]) == set(TASKS) | {"total"} and d["mode"]["vqa"] == "generate"
    assert set(d["pope"]) == {"mode", "random", "popular", "adversarial", "overall"}
    assert set(d["hardneg"]) - {"overall"} <= {"replace_att", "replace_obj", "replace_rel", "swap_att",
                                               "swap_obj", "add_obj"}
    for k in ("acc", "oracle_acc", "none_acc", "retrieval_r1"):
        assert 0.0 <= d["rag"][k] <= 1.0
    assert {"bleu4", "rougeL", "cider"} <= set(d["caption"]) and d["composed"]["r1"] <= d["composed"]["r5"]
    assert elapsed < 60, f"the suite took {elapsed:.1f}s on n=12"


def test_run_suite_loglik_mode_and_skipped_tasks(model, tok):
    res = run_suite(model, tok, DATA_CFG, MODEL_CFG, n=12, tasks=("vqa", "pope"), mode="loglik",
                    batch_size=8, progress=False)
    assert res["i2t_r1"] is None and res["interleaved_r1"] is None
    assert 0.0 <= res["vqa_acc"] <= 1.0 and 0.0 <= res["pope_f1"] <= 1.0
    assert res["details"]["pope"]["overall"]["unparsed"] == 0.0          # loglik always answers yes or no
    assert res["details"]["vqa"]["mode"] == "loglik"
    with pytest.raises(ValueError, match="unknown"):
        run_suite(model, tok, DATA_CFG, MODEL_CFG, tasks=("vqa", "nope"))
    with pytest.raises(ValueError, match="model=None"):
        run_suite(None, tok, DATA_CFG, MODEL_CFG, tasks=("vqa",))


def test_generation_stops_at_the_turn_end_and_the_tokenizers_own_eos(model, tok):
    """A vocabulary whose end of document is ``<|endoftext|>`` (GPT-2 / Qwen style): generation
    stops there and at ``<|im_end|>``, not at a ``</s>`` that is ordinary text to it."""
    from tokenizers import AddedToken, Tokenizer

    from mllm_jax.data.tokenize import TextTokenizer
    raw = Tokenizer.from_str(tok.tok.to_str())
    raw.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    qwen_like = TextTokenizer(raw, eos_token="<|endoftext|>", bos_token=None)
    ans = Answerer(model, BatchEncoder(qwen_like, MODEL_CFG, DATA_CFG))
    assert set(ans.stop_tokens) == {qwen_like.token_id(IM_END), qwen_like.token_id("<|endoftext|>")}


class _ContentEmbedder:
    """A perfect, render-blind embedder for the story / composed tasks: a candidate is what it
    shows (its segments' scene graphs); a query is what its own target shows."""
    cfg = EmbedConfig()

    def __init__(self, world, n):
        from mllm_jax.data.synthetic_sets import (composed_retrieval_set, interleaved_retrieval_set,
                                                  interleaved_to_interleaved_set)
        self.key = {}
        for fn in (interleaved_retrieval_set, interleaved_to_interleaved_set, composed_retrieval_set):
            _, cands, _ = fn(world, "test", n)
            self.key.update({c.id: tuple((g.kind, g.scene) for g in c.segments) for c in cands})
        self.codes = {}

    def encode(self, samples):
        keys = [self.key[s.id.replace("/query", "/target")] for s in samples]
        return np.array([self.codes.setdefault(k, len(self.codes)) for k in keys])

    def similarity(self, a, b):
        return (a[:, None] == b[None, :]).astype(np.float32)


def test_story_and_composed_retrieval_count_same_content_candidates_as_hits(world):
    """At n = 300 two stories end in the same scene and some edits give the same scene as another
    item's: with only the item's own candidate relevant, a perfect model had interleaved R@1 < 1
    (0.987) and composed R@1 = 0.94 (tied equal candidates rank each other down)."""
    res = run_suite(None, None, DATA_CFG, MODEL_CFG, n=300, tasks=("interleaved", "interleaved2", "composed"),
                    embedder=_ContentEmbedder(world, 300), progress=False, budget_s=None)
    assert res["interleaved_r1"] == 1.0
    for task in ("interleaved", "interleaved2", "composed"):
        assert res["details"][task] == {"r1": 1.0, "r5": 1.0}, task
