"""Retrieval metrics: R@K from a similarity matrix, image<->text retrieval, fine-grained
hard-negative accuracy, interleaved (VIST-like) and composed retrieval.

Ranks are pessimistic about ties: a query's rank is the number of *non-relevant* candidates
scoring at least as high as its best relevant one, so a constant similarity gets R@1 = 0
(unless every candidate is relevant), never 1. A query may have several relevant candidates
(``relevant: bool[Q, C]``), e.g. two scenes with the same objects share a short caption.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import numpy as np

from mllm_jax.data.schema import Sample

DEFAULT_KS = (1, 5)


def _nonempty(metric: str, **inputs) -> None:
    """A metric over no items is undefined: say which input of ``metric`` was empty."""
    empty = [name for name, x in inputs.items() if len(x) == 0]
    if empty:
        need = "at least one of each" if len(inputs) > 1 else "at least one"
        raise ValueError(f"{metric}: no {' and no '.join(empty)}; the metric needs {need}")


def _relevance(num_queries: int, num_candidates: int, targets=None, relevant=None) -> np.ndarray:
    if (targets is None) == (relevant is None):
        raise ValueError("pass exactly one of targets (int[Q]) or relevant (bool[Q, C])")
    if relevant is not None:
        rel = np.asarray(relevant, bool)
        if rel.shape != (num_queries, num_candidates):
            raise ValueError(f"relevant has shape {rel.shape}, expected {(num_queries, num_candidates)}")
    else:
        t = np.asarray(targets, np.int64)
        if t.shape != (num_queries,) or (t < 0).any() or (t >= num_candidates).any():
            raise ValueError(f"targets must be int[{num_queries}] in [0, {num_candidates}), got shape {t.shape}")
        rel = np.zeros((num_queries, num_candidates), bool)
        rel[np.arange(num_queries), t] = True
    empty = np.flatnonzero(~rel.any(1))
    if empty.size:
        raise ValueError(f"queries {empty[:8].tolist()} have no relevant candidate")
    return rel


def ranks(sim: np.ndarray, targets=None, *, relevant=None) -> np.ndarray:
    """0-based rank of each query's best relevant candidate: ``int[Q]``.

    ``sim: float[Q, C]``; ``targets: int[Q]`` (one relevant candidate each) or
    ``relevant: bool[Q, C]``. Ties with non-relevant candidates count against the query."""
    sim = np.asarray(sim, np.float64)
    if sim.ndim != 2:
        raise ValueError(f"sim must be [Q, C], got shape {sim.shape}")
    if sim.shape[1] == 0:
        raise ValueError(f"ranks: no candidates (sim has shape {sim.shape}); each query needs at least one")
    rel = _relevance(*sim.shape, targets, relevant)
    if not np.isfinite(sim).all():
        raise ValueError(f"sim has {int((~np.isfinite(sim)).sum())} non-finite entries")
    best = np.where(rel, sim, -np.inf).max(1, keepdims=True)
    return ((sim >= best) & ~rel).sum(1)


def recall_at_k(sim: np.ndarray, targets=None, *, relevant=None, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """``{k: fraction of queries whose best relevant candidate ranks in the top k}``."""
    r = ranks(sim, targets, relevant=relevant)
    if not r.size:
        raise ValueError(f"recall_at_k: no queries (sim has shape {np.shape(sim)}); R@k needs at least one")
    return {int(k): float((r < k).mean()) for k in ks}


def retrieve(embedder, queries: Sequence[Sample], candidates: Sequence[Sample], targets=None, *,
             relevant=None, ks: Sequence[int] = DEFAULT_KS, prefix: str = "") -> dict[str, float]:
    """Embeds both sides with ``embedder`` and returns ``{f"{prefix}r{k}": R@k}``."""
    _nonempty("retrieve", queries=queries, candidates=candidates)
    sim = embedder.similarity(embedder.encode(queries), embedder.encode(candidates))
    return {f"{prefix}r{k}": v for k, v in recall_at_k(sim, targets, relevant=relevant, ks=ks).items()}


# ---- image <-> text ----------------------------------------------------------------------------

def caption_relevance(images: Sequence[Sample], texts: Sequence[Sample]) -> np.ndarray:
    """``relevant[i, j]``: text ``j`` is a complete, true description of image ``i`` (its graph
    holds on scene ``i`` and names as many objects): two scenes with the same kinds share
    their short captions. Needs the scene world's graphs (``sample.scene``/``segment.scene``)."""
    from mllm_jax.data.synthetic_tasks import graph_holds
    graphs = [t.segments[0].scene for t in texts]
    if any(g is None for g in graphs) or any(s.scene is None for s in images):
        raise ValueError("caption_relevance needs scene graphs on the images and caption segments "
                         "(scene-world samples); pass targets= instead")
    return np.array([[len(g.objects) == len(img.scene.objects) and graph_holds(img.scene, g) for g in graphs]
                     for img in images], bool)


def image_text_retrieval(embedder, images: Sequence[Sample], texts: Sequence[Sample], *,
                         relevant: Optional[np.ndarray] = None, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``i2t_r{k}`` and ``t2i_r{k}``; ``relevant: bool[N_img, N_txt]`` defaults to the diagonal."""
    _nonempty("image_text_retrieval", images=images, texts=texts)
    sim = embedder.similarity(embedder.encode(images), embedder.encode(texts))
    rel = np.eye(len(images), len(texts), dtype=bool) if relevant is None else np.asarray(relevant, bool)
    out = {f"i2t_r{k}": v for k, v in recall_at_k(sim, relevant=rel, ks=ks).items()}
    out.update({f"t2i_r{k}": v for k, v in recall_at_k(sim.T, relevant=rel.T, ks=ks).items()})
    return out


# ---- interleaved and composed: candidates that show the same content ------------------------------

def content_relevance(candidates: Sequence[Sample], targets) -> np.ndarray:
    """``relevant[q, j]``: candidate ``j`` shows what candidate ``targets[q]`` shows: the same
    segments (kinds in order) with the same scene graphs (a render of the same scene, a text of
    the same graph). Two stories that end in the same scene, or two edits that give the same
    scene, are then equally right answers instead of one hit and one ranked miss (a perfect model
    lost R@1 on every such query: 6% of the composed queries at n = 300). Needs the scene world's
    graphs on every segment."""
    def key(smp):
        segs = [g for g in smp.segments if g.role != "assistant"]
        if any(g.scene is None for g in segs):
            raise ValueError(f"content_relevance: candidate {smp.id} has a segment without a scene graph "
                             "(scene-world samples only); pass targets= instead")
        return tuple((g.kind, g.scene) for g in segs)
    t = np.asarray(targets, np.int64)
    if t.ndim != 1 or (t < 0).any() or (t >= len(candidates)).any():
        raise ValueError(f"targets must be int[Q] in [0, {len(candidates)}), got {t.shape}")
    keys = [key(c) for c in candidates]
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    code = np.array([ids[k] for k in keys])
    return code[None, :] == code[t][:, None]


# ---- fine-grained hard negatives ---------------------------------------------------------------

def hard_negative_accuracy_from_scores(positive: np.ndarray, negative: np.ndarray,
                                       categories: Sequence[str]) -> dict[str, float]:
    """An item is right when its image is strictly closer to the true caption than to the false
    one. ``positive``, ``negative: float[N]``; returns ``{"overall": .., <category>: ..}``
    (overall = over all items)."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if pos.shape != neg.shape or pos.shape != (len(categories),):
        raise ValueError(f"positive {pos.shape}, negative {neg.shape} and {len(categories)} categories disagree")
    if not len(categories):
        raise ValueError("hard_negative_accuracy: no items (0 positive / negative scores); accuracy needs at least one")
    right = pos > neg
    by = defaultdict(list)
    for c, r in zip(categories, right):
        by[c].append(r)
    return {"overall": float(right.mean()),
            **{c: float(np.mean(v)) for c, v in by.items()}}


def hard_negative_accuracy(embedder, items) -> dict[str, float]:
    """SugarCrepe-style accuracy over ``synthetic_sets.hard_negative_set`` items (each: image,
    positive, negative, category), per category and overall. Shared images/positives are
    embedded once."""
    _nonempty("hard_negative_accuracy", items=items)

    def unique(samples):
        ids, keep = {}, []
        for s in samples:
            if s.id not in ids:
                ids[s.id] = len(keep)
                keep.append(s)
        return ids, keep
    img_ids, imgs = unique([it.image for it in items])
    txt_ids, txts = unique([it.positive for it in items] + [it.negative for it in items])
    sim = embedder.similarity(embedder.encode(imgs), embedder.encode(txts))
    i = np.array([img_ids[it.image.id] for it in items])
    pos = sim[i, [txt_ids[it.positive.id] for it in items]]
    neg = sim[i, [txt_ids[it.negative.id] for it in items]]
    return hard_negative_accuracy_from_scores(pos, neg, [it.category for it in items])


__all__ = ["DEFAULT_KS", "ranks", "recall_at_k", "retrieve", "caption_relevance", "image_text_retrieval",
           "content_relevance", "hard_negative_accuracy_from_scores", "hard_negative_accuracy"]
