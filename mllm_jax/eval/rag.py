"""Retrieval-augmented answering within one model (Sugar's RAG): the model embeds the question
and every memory entry, takes its top-1 entry, and answers conditioned on it.

The conditioned prompt is the ``rag_qa`` training task's layout: one user turn
``[entry image, entry text, image, question]``, then the answer. Three numbers, all greedy
exact match: ``acc`` (the model's own retrieval), ``oracle_acc`` (the right entry),
``none_acc`` (no entry: the made-up names cannot be read off the pixels, so this is the floor),
plus ``retrieval_r1`` (how often the model's top-1 entry is the right one).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from mllm_jax.data.schema import Sample
from mllm_jax.eval.retrieval import recall_at_k
from mllm_jax.eval.vqa import exact_match

MAX_NEW_TOKENS = 8


def rag_prompt(question: Sample, entry: Optional[Sample]) -> Sample:
    """``question`` (user [image, question] -> answer) with ``entry``'s segments prepended to its
    user turn (``entry=None``: the question alone)."""
    if entry is None:
        return question
    mem = tuple(dataclasses.replace(s, role="user") for s in entry.segments)
    return dataclasses.replace(question, id=f"{question.id}+{entry.id}", segments=mem + question.segments)


def evaluate_rag(answerer, embedder, memory: Sequence[Sample], questions: Sequence[Sample], *,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """``memory``, ``questions`` from ``synthetic_sets.rag_set`` (``meta["memory_index"]`` is the
    right entry, ``meta["answer"]`` the answer)."""
    if not questions or not memory:
        raise ValueError(f"evaluate_rag: {len(questions)} questions and {len(memory)} memory entries; "
                         "RAG accuracy needs at least one of each")
    sim = embedder.similarity(embedder.encode(questions), embedder.encode(memory))
    top1 = sim.argmax(1)
    gold = np.array([q.meta["memory_index"] for q in questions])
    refs = [q.meta["answer"] for q in questions]

    def acc(entries):
        prompts = [rag_prompt(q, e) for q, e in zip(questions, entries)]
        return float(exact_match(answerer.generate(prompts, max_new_tokens), refs).mean())

    return {"acc": acc([memory[i] for i in top1]), "oracle_acc": acc([memory[i] for i in gold]),
            "none_acc": acc([None] * len(questions)), "retrieval_r1": recall_at_k(sim, gold, ks=(1,))[1],
            "mode": "generate", "n": len(questions)}


__all__ = ["rag_prompt", "evaluate_rag"]
