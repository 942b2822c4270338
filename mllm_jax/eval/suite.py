"""The evaluation suite the demo runs on each trained arm (scene world, test split).

    res = run_suite(model, tokenizer, data_cfg, model_cfg, EmbedConfig(alignment="gak"), n=200)
    res["vqa_acc"], res["pope_f1"], res["i2t_r1"], res["t2i_r1"], res["hardneg_acc"], res["interleaved_r1"]
    res["details"]     # every number behind them, per task, with modes, sizes and seconds

Tasks (``n`` is roughly the number of items per task):

===============  ===========================================================  ==================
task             what                                                         headline key
===============  ===========================================================  ==================
vqa              exact match on ``vqa_set(n)`` (generate or loglik)            vqa_acc
pope             F1 over ``pope_set`` x 3 strategies (n probes in all)        pope_f1
retrieval        image<->text R@1/5 on ``retrieval_set(n)`` (short captions)   i2t_r1, t2i_r1
hardneg          SugarCrepe-style accuracy, ~n/6 items per category           hardneg_acc
interleaved      VIST-like story -> last image R@1/5 among n                  interleaved_r1
interleaved2     story start -> story rest R@1/5 among n                      (details)
composed         [image, edit] -> edited image among 2n (n distractors refs)  (details)
rag              own-retrieval / oracle / no-retrieval answer accuracy        (details)
caption          BLEU-4 / ROUGE-L / CIDEr (needs pycocoevalcap)                (details)
===============  ===========================================================  ==================

In interleaved, interleaved2 and composed a candidate that shows the same scenes as the target
(``retrieval.content_relevance``) counts as a hit too. A headline key whose task was not run is
None. Every headline value is a fraction in [0, 1].
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

from mllm_jax.config import DataConfig, EmbedConfig, MLLMConfig, to_dict
from mllm_jax.data import synthetic_sets as sets
from mllm_jax.data.synthetic import SceneWorld
from mllm_jax.data.synthetic_tasks import POPE_STRATEGIES
from mllm_jax.eval import caption, pope, rag, retrieval, vqa
from mllm_jax.eval.answer import Answerer
from mllm_jax.eval.embed import Embedder
from mllm_jax.eval.encode import BatchEncoder

log = logging.getLogger("mllm_jax.eval")

KEYS = ("vqa_acc", "pope_f1", "i2t_r1", "t2i_r1", "hardneg_acc", "interleaved_r1")
TASKS = ("vqa", "pope", "retrieval", "hardneg", "interleaved", "interleaved2", "composed", "rag", "caption")
DEFAULT_TASKS = ("vqa", "pope", "retrieval", "hardneg", "interleaved")
EMBEDDING_TASKS = ("retrieval", "hardneg", "interleaved", "interleaved2", "composed")


def _task_fns(world: SceneWorld, split: str, n: int, data_cfg: DataConfig, mode: str, get):
    """``task -> () -> (details dict, {headline key: value})``; ``get(name)`` builds the
    answerer / embedder lazily."""
    k = max(1, n // 6)

    def run_vqa():
        d = vqa.evaluate_vqa(get("answerer"), sets.vqa_set(world, split, n), mode=mode,
                             max_objects=data_cfg.scene.max_objects)
        return d, {"vqa_acc": d["acc"]}

    def run_pope():
        probes = {s: sets.pope_set(world, split, k, s) for s in POPE_STRATEGIES}
        d = pope.evaluate_pope(get("answerer"), probes, mode=mode)
        return d, {"pope_f1": d["overall"]["f1"]}

    def run_retrieval():
        images, texts = sets.retrieval_set(world, split, n)
        d = retrieval.image_text_retrieval(get("embedder"), images, texts,
                                           relevant=retrieval.caption_relevance(images, texts))
        return d, {"i2t_r1": d["i2t_r1"], "t2i_r1": d["t2i_r1"]}

    def run_hardneg():
        d = retrieval.hard_negative_accuracy(get("embedder"), sets.hard_negative_set(world, split, k))
        return d, {"hardneg_acc": d["overall"]}

    def by_content(queries, candidates, targets):
        # a candidate showing the same scenes as the target is as right as the target
        return retrieval.retrieve(get("embedder"), queries, candidates,
                                  relevant=retrieval.content_relevance(candidates, targets))

    def run_interleaved():
        d = by_content(*sets.interleaved_retrieval_set(world, split, n))
        return d, {"interleaved_r1": d["r1"]}

    def run_interleaved2():
        return by_content(*sets.interleaved_to_interleaved_set(world, split, n)), {}

    def run_composed():
        return by_content(*sets.composed_retrieval_set(world, split, n)), {}

    def run_rag():
        memory, questions = sets.rag_set(world, split, n)
        return rag.evaluate_rag(get("answerer"), get("embedder"), memory, questions), {}

    def run_caption():
        return caption.evaluate_captions(get("answerer"), sets.caption_set(world, split, n)), {}

    return {"vqa": run_vqa, "pope": run_pope, "retrieval": run_retrieval, "hardneg": run_hardneg,
            "interleaved": run_interleaved, "interleaved2": run_interleaved2, "composed": run_composed,
            "rag": run_rag, "caption": run_caption}


def run_suite(model, tokenizer, data_cfg: DataConfig, model_cfg: MLLMConfig,
              embed_cfg: EmbedConfig = EmbedConfig(), *, n: int = 200, tasks: Sequence[str] = DEFAULT_TASKS,
              split: str = "test", mode: str = "generate", batch_size: int = 32, embedder=None,
              progress: bool = True, budget_s: Optional[float] = 60.0) -> dict:
    """Evaluates ``model`` (an ``MLLM``) on the scene world of ``data_cfg.scene``, split ``split``.

    ``tokenizer``: the ``TextTokenizer`` the model was trained with; ``data_cfg``: its data
    config (buckets and limits; the eval batch size is ``batch_size``); ``embed_cfg``: how a
    sample becomes an embedding (``eval/embed.py``); ``mode``: ``generate`` | ``loglik`` for
    VQA and POPE; ``embedder``: replaces the model's embedder (e.g. ``SceneGraphOracle``;
    ``model`` may then be None for embedding-only tasks). ``budget_s``: a warning is logged
    when the suite takes longer (nothing is skipped).

    Returns ``{key: float | None for key in KEYS}`` plus ``"details"``: per task its metrics
    and seconds, and the settings (``n``, ``split``, ``mode``, ``embed``)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"run_suite tasks {unknown}: unknown; known: {TASKS}")
    if mode not in vqa.MODES:
        raise ValueError(f"run_suite mode {mode!r}: expected one of {vqa.MODES}")
    if data_cfg.source != "scene":
        raise ValueError(f"run_suite evaluates on the scene world; data_cfg.source is {data_cfg.source!r}")
    if model is None and (embedder is None or any(t not in EMBEDDING_TASKS for t in tasks)):
        raise ValueError(f"run_suite: model=None works only with embedder= and tasks among {EMBEDDING_TASKS}")
    world = SceneWorld(data_cfg.scene)
    encoder = BatchEncoder(tokenizer, model_cfg, data_cfg, batch_size=batch_size) if model is not None else None
    built: dict = {}

    def get(name):
        if name not in built:
            built[name] = Answerer(model, encoder) if name == "answerer" else \
                embedder if embedder is not None else Embedder(model, encoder, embed_cfg)
        return built[name]

    fns = _task_fns(world, split, n, data_cfg, mode, get)
    out: dict = {k: None for k in KEYS}
    details: dict = {"n": n, "split": split, "mode": {"vqa": mode, "pope": mode, "rag": "generate",
                                                      "caption": "generate"},
                     "embed": to_dict(embedder.cfg if embedder is not None else embed_cfg), "time_s": {}}
    from tqdm.auto import tqdm
    start = time.perf_counter()
    bar = tqdm(list(tasks), desc="eval", disable=not progress, dynamic_ncols=True)
    for task in bar:
        bar.set_postfix_str(task)
        t0 = time.perf_counter()
        d, head = fns[task]()
        details[task] = d
        details["time_s"][task] = round(time.perf_counter() - t0, 3)
        out.update(head)
        log.info("eval %s (%.1fs): %s", task, details["time_s"][task], head or d)
    bar.close()
    total = time.perf_counter() - start
    details["time_s"]["total"] = round(total, 3)
    if budget_s is not None and total > budget_s:
        log.warning("eval suite took %.1fs > budget %.1fs (per task: %s); lower n or batch_size",
                    total, budget_s, details["time_s"])
    out["details"] = details
    return out


__all__ = ["KEYS", "TASKS", "DEFAULT_TASKS", "EMBEDDING_TASKS", "run_suite"]
