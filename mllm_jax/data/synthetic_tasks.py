"""Questions, probes, hard negatives, edits and facts over scene graphs (pure text + truth).

Every generator takes a scene (``synthetic.Scene``), a numpy ``Generator`` and the kinds the
split may mention, and returns text with its exact answer; none of them renders pixels.

* ``vqa``: colour / shape / count / position / size / existence / relation questions.
* ``pope_negative``: an absent kind chosen ``random``-ly, by ``popular``-ity (the world's kind
  prior) or ``adversarial``-ly (recombining the colours and shapes present, the binding error).
* ``hard_negatives``: a true two-object caption ("a large red circle left of a small blue
  square") and SugarCrepe-style false variants: replace_att, replace_obj, replace_rel,
  swap_att, swap_obj, add_obj — each checked false against the scene graph.
* ``random_edit`` / ``story``: a chain of scenes, each one edit (recolour, move, add, remove,
  resize) away from the previous one, with the edit described in text.
* ``multi_image_qa``: questions over several scenes.
* ``KIND_NAMES`` / ``rag_question``: made-up names per colour-shape kind (facts no pixel shows).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional, Sequence

import numpy as np

from mllm_jax.data.synthetic import (
    CELLS, CELL_PHRASES, COLOURS, CONVERSE, NUM_KINDS, NUMBERS, ORDINALS, PLURALS, RELATIONS,
    SHAPES, SIZES, Obj, Scene, holds, kind_name, relation_between, with_article)

POPE_STRATEGIES = ("random", "popular", "adversarial")
HARD_NEGATIVE_CATEGORIES = ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj", "add_obj")
VQA_TYPES = ("colour", "shape", "count", "position", "size", "exist", "relation")
EDIT_TYPES = ("recolour", "move", "add", "remove", "resize")


@dataclasses.dataclass(frozen=True)
class QA:
    question: str
    answer: str
    qtype: str
    graph: Optional[Scene] = None      # what the question mentions (for teachers)


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


# ---- single-image VQA ------------------------------------------------------------------------

def vqa(scene: Scene, rng: np.random.Generator, allowed: Sequence[int], qtype: Optional[str] = None) -> QA:
    """One question with its short answer. ``qtype`` is drawn among those that apply."""
    objs = scene.objects
    shape_count = np.bincount([o.shape for o in objs], minlength=len(SHAPES))
    colour_count = np.bincount([o.colour for o in objs], minlength=len(COLOURS))
    if qtype is None:
        types = ["count", "position", "size", "exist"]
        if any(shape_count[o.shape] == 1 for o in objs):
            types.append("colour")
        if any(colour_count[o.colour] == 1 for o in objs):
            types.append("shape")
        if len(objs) >= 2:
            types.append("relation")
        qtype = _pick(rng, types)
    if qtype == "colour":
        o = _pick(rng, [o for o in objs if shape_count[o.shape] == 1])
        return QA(f"What color is the {SHAPES[o.shape]}?", COLOURS[o.colour], qtype, Scene((Obj(-1, o.shape),), ()))
    if qtype == "shape":
        o = _pick(rng, [o for o in objs if colour_count[o.colour] == 1])
        return QA(f"What shape is the {COLOURS[o.colour]} object?", SHAPES[o.shape], qtype)
    if qtype == "count":
        which = int(rng.integers(3))
        if which == 0:
            return QA("How many objects are there?", NUMBERS[len(objs)], qtype)
        if which == 1:
            s = int(rng.integers(len(SHAPES)))
            return QA(f"How many {PLURALS[s]} are there?", NUMBERS[shape_count[s]], qtype)
        c = int(rng.integers(len(COLOURS)))
        return QA(f"How many {COLOURS[c]} objects are there?", NUMBERS[colour_count[c]], qtype)
    if qtype == "position":
        o = _pick(rng, objs)
        return QA(f"Where is the {o.phrase()}?", CELLS[o.cell], qtype, Scene((Obj(o.colour, o.shape),), ()))
    if qtype == "size":
        o = _pick(rng, objs)
        return QA(f"Is the {o.phrase()} small or large?", SIZES[o.size], qtype, Scene((Obj(o.colour, o.shape),), ()))
    if qtype == "exist":
        present = set(scene.kinds())
        if rng.random() < 0.5:
            k, ans = _pick(rng, sorted(present)), "yes"
        else:
            k, ans = _pick(rng, [k for k in allowed if k not in present]), "no"
        return QA(f"Is there {with_article(kind_name(k))}?", ans, qtype)
    if qtype == "relation":
        i, j = rng.choice(len(objs), 2, replace=False)
        a, b = objs[int(i)], objs[int(j)]
        true = [r for r in range(4) if holds(a, r, b)]
        if true and rng.random() < 0.5:
            r = _pick(rng, true)
        else:
            r = _pick(rng, [r for r in range(4) if r not in true])
        g = Scene((Obj(a.colour, a.shape), Obj(b.colour, b.shape)), ((0, r, 1),))
        return QA(f"Is the {a.phrase()} {RELATIONS[r]} the {b.phrase()}?", "yes" if holds(a, r, b) else "no", qtype, g)
    raise ValueError(f"vqa: unknown question type {qtype!r}; expected one of {VQA_TYPES}")


# ---- POPE ------------------------------------------------------------------------------------

def pope_question(kind: int) -> str:
    return f"Is there {with_article(kind_name(kind))} in the image?"


def pope_negative(scene: Scene, rng: np.random.Generator, strategy: str, allowed: Sequence[int],
                  popularity: Sequence[int]) -> int:
    """An absent kind: uniform (``random``), the most popular absent one (``popular``), or one
    recombining a present colour with a present shape (``adversarial``; falls back to sharing
    one attribute with a present object)."""
    present = set(scene.kinds())
    absent = [k for k in allowed if k not in present]
    if strategy == "random":
        return _pick(rng, absent)
    if strategy == "popular":
        ranked = [k for k in popularity if k in set(absent)]
        return _pick(rng, ranked[:3])
    if strategy == "adversarial":
        colours = {o.colour for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        swap = [k for k in absent if k // len(SHAPES) in colours and k % len(SHAPES) in shapes]
        share = [k for k in absent if k // len(SHAPES) in colours or k % len(SHAPES) in shapes]
        return _pick(rng, swap or share or absent)
    raise ValueError(f"pope strategy {strategy!r}: expected one of {POPE_STRATEGIES}")


# ---- captions as graphs, and their truth ------------------------------------------------------

def graph_holds(scene: Scene, graph: Scene) -> bool:
    """Is there an injective match of the graph's objects (specified attributes only) onto
    the scene's objects under which every stated relation holds?"""
    def fits(g: Obj, o: Obj) -> bool:
        return all(gv < 0 or gv == ov for gv, ov in zip(dataclasses.astuple(g), dataclasses.astuple(o)))
    objs = scene.objects
    for perm in itertools.permutations(range(len(objs)), len(graph.objects)):
        if all(fits(g, objs[p]) for g, p in zip(graph.objects, perm)) and all(
                holds(objs[perm[i]], r, objs[perm[j]]) for i, r, j in graph.all_relations()):
            return True
    return False


def describe(graph: Scene) -> str:
    """Text of a caption graph: "a large red circle left of a small blue square[ and a green cross]"."""
    objs = graph.objects
    words = [with_article(o.phrase(size=True)) for o in objs]
    if graph.relations:
        (i, r, j), = graph.relations
        head = f"{words[i]} {RELATIONS[r]} {words[j]}"
        rest = [w for k, w in enumerate(words) if k not in (i, j)]
    else:
        head, rest = words[0], words[1:]
    return " and ".join([head] + rest)


@dataclasses.dataclass(frozen=True)
class HardNegatives:
    positive: str
    positive_graph: Scene
    negatives: dict            # category -> (text, graph); categories that do not apply are absent


def pair_graph(scene: Scene, rng: np.random.Generator) -> Scene:
    """A true partial graph of ``scene``: two random objects (size, colour, shape) and their
    relation, or its one object."""
    objs = scene.objects
    if len(objs) >= 2:
        i, j = (int(x) for x in rng.choice(len(objs), 2, replace=False))
        a, b = objs[i], objs[j]
        return Scene((Obj(a.colour, a.shape, a.size), Obj(b.colour, b.shape, b.size)), ((0, relation_between(a, b), 1),))
    a = objs[0]
    return Scene((Obj(a.colour, a.shape, a.size),), ())


def relation_caption(scene: Scene, rng: np.random.Generator) -> tuple[str, Scene]:
    """"a small red circle left of a large blue square" (``pair_graph``) and its graph."""
    g = pair_graph(scene, rng)
    return describe(g), g


def hard_negatives(scene: Scene, rng: np.random.Generator, allowed: Sequence[int]) -> HardNegatives:
    """A true caption of one object pair (``pair_graph``) and its SugarCrepe-style false variants."""
    pos = pair_graph(scene, rng)
    allowed_set = set(allowed)
    out = {}

    def accept(cat: str, g: Scene) -> bool:
        ok = all(o.kind in allowed_set for o in g.objects) and not graph_holds(scene, g)
        if ok:
            out[cat] = (describe(g), g)
        return ok

    def with_obj(g: Scene, k: int, **kw) -> Scene:
        objs2 = list(g.objects)
        objs2[k] = dataclasses.replace(objs2[k], **kw)
        return dataclasses.replace(g, objects=tuple(objs2))

    n = len(pos.objects)
    # replace an attribute (colour, or size) of one object
    opts = [(k, "colour", c) for k in range(n) for c in range(len(COLOURS)) if c != pos.objects[k].colour]
    opts += [(k, "size", 1 - pos.objects[k].size) for k in range(n)]
    for t in rng.permutation(len(opts)):
        k, field, v = opts[t]
        if accept("replace_att", with_obj(pos, k, **{field: v})):
            break
    opts = [(k, s) for k in range(n) for s in range(len(SHAPES)) if s != pos.objects[k].shape]
    for t in rng.permutation(len(opts)):
        k, s = opts[t]
        if accept("replace_obj", with_obj(pos, k, shape=s)):
            break
    if n == 2:
        (i0, r, j0), = pos.relations
        accept("replace_rel", dataclasses.replace(pos, relations=((i0, CONVERSE[r], j0),)))
        p, q = pos.objects
        if p.colour != q.colour:
            accept("swap_att", Scene((dataclasses.replace(p, colour=q.colour), dataclasses.replace(q, colour=p.colour)), pos.relations))
        if p.shape != q.shape:
            accept("swap_obj", Scene((dataclasses.replace(p, shape=q.shape), dataclasses.replace(q, shape=p.shape)), pos.relations))
    present = set(scene.kinds())
    absent = [k for k in allowed if k not in present]
    k = _pick(rng, absent)
    accept("add_obj", Scene(pos.objects + (Obj(k // len(SHAPES), k % len(SHAPES)),), pos.relations))
    return HardNegatives(describe(pos), pos, out)


# ---- edits and stories ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Edit:
    etype: str
    text: str                 # "the red circle turns blue" (lower case, no period)
    before: Scene
    after: Scene
    graph: Scene              # the mentioned object in its new state (for teachers)


def random_edit(scene: Scene, rng: np.random.Generator, allowed: Sequence[int], max_objects: int) -> Edit:
    objs = list(scene.objects)
    present = set(scene.kinds())
    free = [c for c in range(9) if c not in {o.cell for o in objs}]
    types = ["recolour", "move", "resize"] + (["add"] if len(objs) < max_objects and free else [])
    types += ["remove"] if len(objs) > 1 else []
    etype = _pick(rng, types)
    if etype == "add":
        k = _pick(rng, [k for k in allowed if k not in present])
        o = Obj(k // len(SHAPES), k % len(SHAPES), int(rng.integers(2)), _pick(rng, free))
        return Edit(etype, f"{with_article(o.phrase(size=True))} appears {CELL_PHRASES[o.cell]}", scene,
                    Scene(tuple(objs + [o])), Scene((o,)))
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if etype == "remove":
        return Edit(etype, f"the {o.phrase()} disappears", scene, Scene(tuple(objs[:i] + objs[i + 1:])),
                    Scene((Obj(o.colour, o.shape),), ()))
    if etype == "recolour":
        colours = [c for c in range(len(COLOURS)) if c != o.colour
                   and (c * len(SHAPES) + o.shape) in set(allowed) and (c * len(SHAPES) + o.shape) not in present]
        if not colours:
            etype = "resize"
        else:
            new = dataclasses.replace(o, colour=_pick(rng, colours))
            text = f"the {o.phrase()} turns {COLOURS[new.colour]}"
    if etype == "move":
        if not free:
            etype = "resize"
        else:
            new = dataclasses.replace(o, cell=_pick(rng, free))
            text = f"the {o.phrase()} moves to the {CELLS[new.cell]}"
    if etype == "resize":
        new = dataclasses.replace(o, size=1 - o.size)
        text = f"the {o.phrase()} {'grows' if new.size == 1 else 'shrinks'}"
    objs[i] = new
    graph = Scene((Obj(new.colour, new.shape, new.size if etype == "resize" else -1,
                       new.cell if etype == "move" else -1),), ())
    return Edit(etype, text, scene, Scene(tuple(objs)), graph)


def story(scene: Scene, rng: np.random.Generator, num_images: int, allowed: Sequence[int],
          max_objects: int) -> list[Edit]:
    """``num_images - 1`` consecutive edits starting from ``scene``."""
    edits = []
    for _ in range(num_images - 1):
        e = random_edit(scene, rng, allowed, max_objects)
        edits.append(e)
        scene = e.after
    return edits


# ---- multi-image questions ---------------------------------------------------------------------

def multi_image_qa(scenes: Sequence[Scene], rng: np.random.Generator, allowed: Sequence[int]) -> QA:
    """"In how many images is there ...", "Which image shows ...", "Which image has the most objects?"."""
    n = len(scenes)
    counts = [len(s.objects) for s in scenes]
    per_kind = {k: [i for i, s in enumerate(scenes) if k in s.kinds()] for k in allowed}
    unique = [k for k, where in per_kind.items() if len(where) == 1]
    types = ["count_images"] + (["which_image"] if unique else [])
    if counts.count(max(counts)) == 1:
        types.append("most_objects")
    qtype = _pick(rng, types)
    if qtype == "which_image":
        k = _pick(rng, unique)
        return QA(f"Which image shows {with_article(kind_name(k))}?", ORDINALS[per_kind[k][0]], qtype)
    if qtype == "most_objects":
        return QA("Which image has the most objects?", ORDINALS[int(np.argmax(counts))], qtype)
    shown = [k for k, where in per_kind.items() if where]
    k = _pick(rng, shown) if rng.random() < 0.8 else _pick(rng, list(allowed))
    return QA(f"In how many of the {NUMBERS[n]} images is there {with_article(kind_name(k))}?",
              NUMBERS[len(per_kind[k])], qtype)


# ---- RAG facts -------------------------------------------------------------------------------

def _make_names() -> tuple[str, ...]:
    rng = np.random.default_rng(2024)
    cons, vows, ends = "bdfgklmnprstvz", "aeiou", ["", "n", "l", "r", "x", "k"]
    names: list[str] = []
    while len(names) < NUM_KINDS:
        w = "".join(_pick(rng, cons) + _pick(rng, vows) for _ in range(2)) + _pick(rng, ends)
        if w not in names:
            names.append(w)
    return tuple(names)


KIND_NAMES = _make_names()      # kind id -> made-up name ("the red circle is called a ...")


def memory_text(kind: int) -> str:
    return f"{with_article(kind_name(kind)).capitalize()} is called {with_article(KIND_NAMES[kind])}."


def rag_question(scene: Scene, rng: np.random.Generator) -> tuple[QA, int]:
    """A question whose answer is a made-up name; returns it with the kind whose memory entry
    holds the answer."""
    o = _pick(rng, scene.objects)
    if rng.random() < 0.5:
        q = f"What is the object {CELL_PHRASES[o.cell]} called?"
    else:
        q = f"What is the {o.phrase()} called?"
    return QA(q, KIND_NAMES[o.kind], "rag"), o.kind


__all__ = [
    "POPE_STRATEGIES", "HARD_NEGATIVE_CATEGORIES", "VQA_TYPES", "EDIT_TYPES", "QA", "vqa",
    "pope_question", "pope_negative", "graph_holds", "describe", "HardNegatives", "hard_negatives",
    "pair_graph", "relation_caption",
    "Edit", "random_edit", "story", "multi_image_qa", "KIND_NAMES", "memory_text", "rag_question",
]
