"""Samples from the scene world: training tasks (a grain data source) and evaluation sets.

Training tasks (``TASKS``), each ``(world, split, index) -> Sample`` (or a dict of views):

=================  ========  ===============================================================
task               kind      segments
=================  ========  ===============================================================
caption_short      chat      user [image, "Describe the image briefly."] -> short caption
caption_long       chat      user [image, "Describe the image in detail."] -> long caption
vqa                chat      user [image, question] -> short answer
pope               chat      user [image, "Is there a ... in the image?"] -> yes / no
multi_image_qa     chat      user [image x 2..4, question] -> answer (a story's images)
rag_qa             chat      user [memory image, memory text, image, question] -> made-up name
pair               document  [image, short caption]            (Sugar: a 2-slice sequence)
image              document  [image]                           (one slice, as retrieval embeds it)
caption            document  [short caption]                   (one slice)
story              document  [text, image, text, image, ...]   (interleaved, 2..4 images)
vladva             views     {"image": user [image, summary prompt],
                              "text":  user [short caption, summary prompt]}
=================  ========  ===============================================================

Evaluation sets (``*_set``) are plain functions returning lists of samples (and arrays of
targets) on any split; ``test_comp`` gives the held-out colour-shape combinations.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from mllm_jax.config import SceneConfig
from mllm_jax.data import synthetic as W
from mllm_jax.data import synthetic_tasks as T
from mllm_jax.data.schema import Sample, Segment, image_segment, text_segment

PROMPT_SHORT = "Describe the image briefly."
PROMPT_LONG = "Describe the image in detail."
PROMPT_IMAGE_SUMMARY = "Summary above image in one word:"      # E5-V / VladVA summary prompts
PROMPT_TEXT_SUMMARY = "Summary above sentence in one word:"


def summary_prompt(image: bool, soft_prompts: int = 0) -> str:
    """The E5-V summary prompt for an image or a sentence view, or (VladVA) ``soft_prompts``
    learned slots instead of the hand-written text."""
    from mllm_jax.data.tokenize import SOFT
    if soft_prompts:
        return SOFT * soft_prompts
    return PROMPT_IMAGE_SUMMARY if image else PROMPT_TEXT_SUMMARY


class _Ctx:
    """What a task needs for one index: world, split, index, a fresh generator and rendering."""

    def __init__(self, world: W.SceneWorld, split: str, index: int, task: str, render: bool = True,
                 soft_prompts: int = 0, scene_index: Optional[int] = None):
        self.world, self.split, self.index, self.task, self.render_images = world, split, index, task, render
        self.scene_index = index if scene_index is None else scene_index
        self.soft_prompts = soft_prompts
        self.rng = world.rng(split, index, task)
        self.allowed = world.allowed_kinds(split)
        self._n = 0

    @property
    def id(self) -> str:
        return f"scene/{self.split}/{self.task}/{self.index}"

    def scene(self) -> W.Scene:
        return self.world.scene(self.split, self.scene_index)

    def image(self, scene: W.Scene, role: Optional[str] = None) -> Segment:
        self._n += 1
        img = None
        if self.render_images:
            img = self.world.render(scene, self.world.rng(self.split, self.index, f"{self.task}/image{self._n}"))
        return image_segment(img, role=role, scene=scene)

    def sample(self, segments, scene=None, **meta) -> Sample:
        return Sample(self.id, tuple(segments), source="scene", scene=scene, meta=meta)


def _chat(c: _Ctx, user: list[Segment], answer: str, scene, answer_graph=None, **meta) -> Sample:
    user = [dataclasses.replace(s, role="user") for s in user]
    return c.sample(user + [text_segment(answer, "assistant", answer_graph)], scene, answer=answer, **meta)


def task_caption_short(c: _Ctx) -> Sample:
    s = c.scene()
    return _chat(c, [c.image(s), text_segment(PROMPT_SHORT)], W.short_caption(s, c.rng), s, W.caption_graph(s))


def task_caption_long(c: _Ctx) -> Sample:
    s = c.scene()
    return _chat(c, [c.image(s), text_segment(PROMPT_LONG)], W.long_caption(s, c.rng), s, s)


def task_vqa(c: _Ctx, qtype: Optional[str] = None) -> Sample:
    s = c.scene()
    qa = T.vqa(s, c.rng, c.allowed, qtype)
    return _chat(c, [c.image(s), text_segment(qa.question, scene=qa.graph)], qa.answer, s, qtype=qa.qtype)


def task_pope(c: _Ctx, strategy: Optional[str] = None, positive: Optional[bool] = None) -> Sample:
    s = c.scene()
    strategy = strategy or T.POPE_STRATEGIES[int(c.rng.integers(3))]
    positive = bool(c.rng.random() < 0.5) if positive is None else positive
    if positive:
        kinds = s.kinds()
        kind = kinds[int(c.rng.integers(len(kinds)))]
    else:
        kind = T.pope_negative(s, c.rng, strategy, c.allowed, c.world.popularity)
    q = text_segment(T.pope_question(kind), scene=W.Scene((W.Obj(kind // 5, kind % 5),), ()))
    return _chat(c, [c.image(s), q], "yes" if positive else "no", s, strategy=strategy, kind=kind)


def _story(c: _Ctx) -> tuple[W.Scene, list[T.Edit]]:
    lo, hi = c.world.cfg.story_images
    s = c.scene()
    return s, T.story(s, c.rng, int(c.rng.integers(lo, hi + 1)), c.allowed, c.world.cfg.max_objects)


def task_multi_image_qa(c: _Ctx) -> Sample:
    s0, edits = _story(c)
    scenes = [s0] + [e.after for e in edits]
    if len(scenes) < 2:
        scenes.append(c.world.sample_scene(c.rng, c.split))
    qa = T.multi_image_qa(scenes, c.rng, c.allowed)
    return _chat(c, [c.image(s) for s in scenes] + [text_segment(qa.question)], qa.answer, None,
                 qtype=qa.qtype, scenes=scenes)


def task_rag_qa(c: _Ctx) -> Sample:
    s = c.scene()
    qa, kind = T.rag_question(s, c.rng)
    mem = memory_entry(c.world, kind, render=c.render_images)
    user = [dataclasses.replace(seg, role=None) for seg in mem.segments] + [c.image(s), text_segment(qa.question)]
    return _chat(c, user, qa.answer, s, memory_kind=kind)


def disc_caption(s: W.Scene, rng: np.random.Generator) -> Segment:
    """The caption of the discriminative tasks (pair, caption, vladva), one of two styles at
    random: the listing of every object ("a red circle and a blue square"), or, for scenes with
    two or more objects, one object pair with sizes and their relation ("a small red circle
    left of a large blue square"). Each carries its partial scene graph."""
    if len(s.objects) >= 2 and rng.random() < 0.5:
        text, graph = T.relation_caption(s, rng)
        return text_segment(text, scene=graph)
    return text_segment(W.short_caption(s, rng), scene=W.caption_graph(s))


def task_pair(c: _Ctx) -> Sample:
    s = c.scene()
    return c.sample([c.image(s), disc_caption(s, c.rng)], s)


def task_image(c: _Ctx) -> Sample:
    """A one-slice document: an image alone (as retrieval embeds images)."""
    s = c.scene()
    return c.sample([c.image(s)], s)


def task_caption(c: _Ctx) -> Sample:
    """A one-slice document: a caption alone (``disc_caption``; as retrieval embeds captions)."""
    s = c.scene()
    return c.sample([disc_caption(s, c.rng)], s)


def story_segments(c: _Ctx, s0: W.Scene, edits: list[T.Edit]) -> list[Segment]:
    segs = [text_segment(W.short_caption(s0, c.rng).capitalize() + ".", scene=W.caption_graph(s0)), c.image(s0)]
    for e in edits:
        segs += [text_segment(f"Then {e.text}.", scene=e.graph), c.image(e.after)]
    return segs


def task_story(c: _Ctx) -> Sample:
    s0, edits = _story(c)
    return c.sample(story_segments(c, s0, edits), None, edits=[e.etype for e in edits])


def task_vladva(c: _Ctx) -> dict[str, Sample]:
    s = c.scene()
    cap = dataclasses.replace(disc_caption(s, c.rng), role="user")
    img = Sample(c.id + "/image", (c.image(s, "user"), text_segment(summary_prompt(True, c.soft_prompts), "user")),
                 "scene", s)
    txt = Sample(c.id + "/text", (cap,
                                  text_segment(summary_prompt(False, c.soft_prompts), "user")), "scene", s)
    return {"image": img, "text": txt}


TASKS: dict[str, Callable[[_Ctx], object]] = {
    "caption_short": task_caption_short, "caption_long": task_caption_long, "vqa": task_vqa,
    "pope": task_pope, "multi_image_qa": task_multi_image_qa, "rag_qa": task_rag_qa,
    "pair": task_pair, "story": task_story, "image": task_image, "caption": task_caption,
    "vladva": task_vladva,
}


class SceneSource:
    """A grain random-access source over one split: index ``i`` gives task ``table[i % L]``
    (``L`` = sum of integer weights) on scene ``i`` (``paired_views``: on scene ``i - i % 2``, so
    indices ``2k`` and ``2k+1`` are two views of one scene, each with its own rendering and
    wording). Picklable; deterministic per index."""

    def __init__(self, cfg: SceneConfig, split: str, tasks: dict[str, int], size: Optional[int] = None,
                 render: bool = True, soft_prompts: int = 0, paired_views: bool = False):
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"scene tasks {unknown}: unknown; known tasks: {sorted(TASKS)}")
        views = [t for t in tasks if t == "vladva"]
        if views and len(tasks) > 1:
            raise ValueError("the 'vladva' task yields two views per sample and cannot be mixed with other "
                             "tasks in one pipeline; build a separate pipeline for it")
        self.cfg, self.split, self.tasks, self.render = cfg, split, dict(tasks), render
        self.soft_prompts, self.paired_views = soft_prompts, bool(paired_views)
        self.size = cfg.split_size(split) if size is None else size
        self.table = tuple(t for t, w in tasks.items() for _ in range(int(w)))
        if not self.table:
            raise ValueError("scene tasks: all weights are zero")
        self._world: Optional[W.SceneWorld] = None

    @property
    def world(self) -> W.SceneWorld:
        if self._world is None:
            self._world = W.SceneWorld(self.cfg)
        return self._world

    def __len__(self) -> int:
        return self.size

    @property
    def views(self) -> Optional[tuple[str, ...]]:
        return ("image", "text") if "vladva" in self.tasks else None

    def __getitem__(self, index: int):
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"scene source {self.split}: index {index} out of range [0, {self.size})")
        task = self.table[index % len(self.table)]
        scene = index - index % 2 if self.paired_views else index
        return TASKS[task](_Ctx(self.world, self.split, index, task, self.render, self.soft_prompts, scene))

    def fingerprint(self) -> str:
        from mllm_jax.config import config_hash
        soft = f":soft{self.soft_prompts}" if self.soft_prompts else ""
        paired = ":paired" if self.paired_views else ""
        # the tasks in table order: index i is task table[i % len(table)], so the order matters
        return (f"scene:v{W.WORLD_VERSION}:{config_hash(self.cfg)}:{self.split}:{list(self.tasks.items())}:"
                f"{self.size}{soft}{paired}")

    def __getstate__(self):
        return {**self.__dict__, "_world": None}


def scene_corpus(cfg: SceneConfig, num_samples: int = 4000) -> list[str]:
    """Texts of every task on the train and test_comp splits (for training a tokenizer; a world
    without held-out kinds has no test_comp split, and train then names every kind)."""
    texts = []
    for split in ("train", "test_comp") if cfg.held_out else ("train",):
        src = SceneSource(cfg, split, {t: 1 for t in TASKS if t != "vladva"}, size=num_samples, render=False)
        for i in range(num_samples // 2):
            texts += [s.text for s in src[i].segments if s.kind == "text"]
    texts += [T.memory_text(k) for k in range(W.NUM_KINDS)]
    texts += [PROMPT_IMAGE_SUMMARY, PROMPT_TEXT_SUMMARY]
    return texts


# ---- evaluation sets --------------------------------------------------------------------------

def memory_entry(world: W.SceneWorld, kind: int, render: bool = True) -> Sample:
    """RAG memory entry for one kind: [image of a single large centred object, its name]."""
    obj = W.Obj(kind // len(W.SHAPES), kind % len(W.SHAPES), 1, 4)
    scene = W.Scene((obj,))
    img = world.render(scene, world.rng("memory", kind, "image")) if render else None
    return Sample(f"scene/memory/{kind}", (image_segment(img, scene=scene),
                                           text_segment(T.memory_text(kind), scene=scene)), "scene", scene,
                  {"kind": kind, "name": T.KIND_NAMES[kind]})


def rag_memory(world: W.SceneWorld) -> list[Sample]:
    return [memory_entry(world, k) for k in range(W.NUM_KINDS)]


def rag_set(world: W.SceneWorld, split: str, n: int) -> tuple[list[Sample], list[Sample]]:
    """(memory, questions): each question is user [image, question] with ``meta["answer"]``
    and ``meta["memory_index"]`` (its entry in ``memory``)."""
    qs = []
    for i in range(n):
        c = _Ctx(world, split, i, "rag_eval")
        s = c.scene()
        qa, kind = T.rag_question(s, c.rng)
        qs.append(_chat(c, [c.image(s), text_segment(qa.question)], qa.answer, s, memory_index=kind))
    return rag_memory(world), qs


def vqa_set(world: W.SceneWorld, split: str, n: int, qtype: Optional[str] = None) -> list[Sample]:
    return [task_vqa(_Ctx(world, split, i, "vqa_eval"), qtype) for i in range(n)]


def caption_set(world: W.SceneWorld, split: str, n: int, long: bool = False) -> list[Sample]:
    fn = task_caption_long if long else task_caption_short
    return [fn(_Ctx(world, split, i, "caption_eval")) for i in range(n)]


def pope_set(world: W.SceneWorld, split: str, n: int, strategy: str) -> list[Sample]:
    """``2n`` probes: for each of ``n`` images one present (yes) and one absent (no) kind."""
    if strategy not in T.POPE_STRATEGIES:
        raise ValueError(f"pope strategy {strategy!r}: expected one of {T.POPE_STRATEGIES}")
    out = []
    for i in range(n):
        for pos in (True, False):
            c = _Ctx(world, split, i, f"pope_{strategy}")
            smp = task_pope(c, strategy, pos)
            out.append(dataclasses.replace(smp, id=f"{smp.id}/{'yes' if pos else 'no'}"))
    return out


def retrieval_set(world: W.SceneWorld, split: str, n: int, long: bool = False) -> tuple[list[Sample], list[Sample]]:
    """(images, captions): caption ``i`` describes image ``i`` (documents with one segment)."""
    images, texts = [], []
    for i in range(n):
        c = _Ctx(world, split, i, "retrieval")
        s = c.scene()
        cap = W.long_caption(s, c.rng) if long else W.short_caption(s, c.rng)
        images.append(Sample(c.id + "/image", (c.image(s),), "scene", s))
        texts.append(Sample(c.id + "/text", (text_segment(cap, scene=s if long else W.caption_graph(s)),), "scene", s))
    return images, texts


@dataclasses.dataclass(frozen=True)
class HardNegativeItem:
    image: Sample          # [image]
    positive: Sample       # [true caption]
    negative: Sample       # [false caption]
    category: str


def hard_negative_set(world: W.SceneWorld, split: str, n: int,
                      categories=T.HARD_NEGATIVE_CATEGORIES) -> list[HardNegativeItem]:
    """Up to ``n`` items per category (from scenes with >= 2 objects; a category that does not
    apply to a scene is skipped for it)."""
    out = {c: [] for c in categories}
    i = 0
    while any(len(v) < n for v in out.values()) and i < 50 * n:
        c = _Ctx(world, split, i, "hardneg")
        s = c.scene()
        i += 1
        if len(s.objects) < 2:
            continue
        hn = T.hard_negatives(s, c.rng, world.allowed_kinds(split))
        img = Sample(c.id + "/image", (c.image(s),), "scene", s)
        pos = Sample(c.id + "/pos", (text_segment(hn.positive, scene=hn.positive_graph),), "scene", s)
        for cat, (text, g) in hn.negatives.items():
            if cat in out and len(out[cat]) < n:
                neg = Sample(f"{c.id}/{cat}", (text_segment(text, scene=g),), "scene", s, {"category": cat})
                out[cat].append(HardNegativeItem(img, pos, neg, cat))
    return [item for cat in categories for item in out[cat]]


def _story_set(world, split, n, task):
    for i in range(n):
        c = _Ctx(world, split, i, task)
        s0, edits = _story(c)
        if not edits:
            edits = T.story(s0, c.rng, 2, c.allowed, world.cfg.max_objects)
        yield c, s0, edits


def interleaved_retrieval_set(world: W.SceneWorld, split: str, n: int) -> tuple[list[Sample], list[Sample], np.ndarray]:
    """VIST-like: query = a story without its last image (texts and earlier images), candidates =
    every story's last image; returns (queries, candidates, int[n] target index)."""
    queries, cands = [], []
    for c, s0, edits in _story_set(world, split, n, "interleaved"):
        segs = story_segments(c, s0, edits)
        queries.append(Sample(c.id + "/query", tuple(segs[:-1]), "scene"))
        cands.append(Sample(c.id + "/target", (segs[-1],), "scene", edits[-1].after))
    return queries, cands, np.arange(n)


def interleaved_to_interleaved_set(world: W.SceneWorld, split: str, n: int) -> tuple[list[Sample], list[Sample], np.ndarray]:
    """Query = the first (text, image) steps of a story, candidate = the remaining steps."""
    queries, cands = [], []
    for c, s0, edits in _story_set(world, split, n, "interleaved2"):
        segs = story_segments(c, s0, edits)
        cut = 2 * ((len(segs) // 2 + 1) // 2)
        queries.append(Sample(c.id + "/query", tuple(segs[:cut]), "scene"))
        cands.append(Sample(c.id + "/target", tuple(segs[cut:]), "scene"))
    return queries, cands, np.arange(n)


def composed_retrieval_set(world: W.SceneWorld, split: str, n: int) -> tuple[list[Sample], list[Sample], np.ndarray]:
    """Query = [reference image, edit text]; candidates = the ``n`` edited images followed by the
    ``n`` reference images (hard distractors); target of query ``i`` is candidate ``i``."""
    queries, targets, refs = [], [], []
    for i in range(n):
        c = _Ctx(world, split, i, "composed")
        s = c.scene()
        e = T.random_edit(s, c.rng, c.allowed, world.cfg.max_objects)
        ref = c.image(s)
        queries.append(Sample(c.id + "/query", (ref, text_segment(e.text, scene=e.graph)), "scene", s,
                              {"edit": e.etype}))
        targets.append(Sample(c.id + "/target", (c.image(e.after),), "scene", e.after))
        refs.append(Sample(c.id + "/reference", (ref,), "scene", s))
    return queries, targets + refs, np.arange(n)


__all__ = [
    "PROMPT_SHORT", "PROMPT_LONG", "PROMPT_IMAGE_SUMMARY", "PROMPT_TEXT_SUMMARY", "TASKS",
    "SceneSource", "scene_corpus", "memory_entry", "rag_memory", "rag_set", "vqa_set",
    "caption_set", "pope_set", "retrieval_set", "HardNegativeItem", "hard_negative_set",
    "interleaved_retrieval_set", "interleaved_to_interleaved_set", "composed_retrieval_set",
]
