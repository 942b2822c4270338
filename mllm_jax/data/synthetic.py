"""The scene world: procedurally generated images with exact scene graphs (DESIGN.md §4).

A scene is 1..4 objects on a 3x3 grid; each object has a colour (8), a shape (5), a size (2)
and a cell (9), over a noisy, tinted background. Everything is deterministic from
``(SceneConfig.seed, split, index)``:

    world = SceneWorld(SceneConfig(seed=0, image_size=32))
    scene = world.scene("train", 17)          # Scene(objects=(Obj(...), ...))
    img = world.render(scene, world.rng("train", 17, "image"))   # uint8[32, 32, 3]
    short_caption(scene, rng)  -> "a red circle and a small blue square"   (kinds only)
    long_caption(scene, rng)   -> every object with size, colour, shape, position + relations

Splits: ``train``, ``val``, ``test`` draw kinds (colour-shape pairs) from all kinds except the
held-out ones (``SceneConfig.held_out``); ``test_comp`` scenes contain at least one held-out
kind (compositional generalisation: each held-out colour and shape is seen in training, the
combination never). Kinds follow a fixed Zipf-like prior so that POPE's "popular" probes mean
something. Object kinds are unique within a scene, so "the red circle" always names one object.

Relations come from the grid: ``a left of b`` iff ``col(a) < col(b)``; ``a above b`` iff
``row(a) < row(b)`` (``right of``/``below`` are the converses).

Task generators over these scenes (VQA, POPE, hard negatives, stories, RAG) live in
``synthetic_tasks.py``; training samples and evaluation sets in ``synthetic_sets.py``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np

from mllm_jax.config import SceneConfig

COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
RGB = np.array([(220, 40, 40), (240, 140, 30), (225, 210, 40), (50, 175, 60), (40, 200, 210),
                (50, 80, 230), (140, 60, 190), (240, 130, 190)], np.int16)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = ("circles", "squares", "triangles", "diamonds", "crosses")
SIZES = ("small", "large")
CELLS = ("top left", "top", "top right", "left", "center", "right",
         "bottom left", "bottom", "bottom right")
CELL_PHRASES = ("at the top left", "at the top", "at the top right", "on the left", "in the center",
                "on the right", "at the bottom left", "at the bottom", "at the bottom right")
RELATIONS = ("left of", "right of", "above", "below")
LEFT, RIGHT, ABOVE, BELOW = range(4)
CONVERSE = (RIGHT, LEFT, BELOW, ABOVE)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
NUM_KINDS = len(COLOURS) * len(SHAPES)
WORLD_VERSION = 2          # bump when generated content changes (part of cache fingerprints)
SPLITS = {"train": 1, "val": 2, "test": 3, "test_comp": 4, "memory": 5}


def kind_of(colour: int, shape: int) -> int:
    return colour * len(SHAPES) + shape


def kind_name(kind: int) -> str:
    return f"{COLOURS[kind // len(SHAPES)]} {SHAPES[kind % len(SHAPES)]}"


def parse_kind(name: str) -> int:
    colour, shape = name.split()
    return kind_of(COLOURS.index(colour), SHAPES.index(shape))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object; ``-1`` marks an attribute a text does not specify (partial graphs)."""
    colour: int
    shape: int
    size: int = -1
    cell: int = -1

    @property
    def kind(self) -> int:
        return kind_of(self.colour, self.shape)

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    def phrase(self, size: bool = False) -> str:
        """"red circle" / "small red circle" (no article)."""
        words = ([SIZES[self.size]] if size and self.size >= 0 else []) + [COLOURS[self.colour], SHAPES[self.shape]]
        return " ".join(words)


def holds(a: Obj, rel: int, b: Obj) -> bool:
    """Does ``a rel b`` hold on the grid?"""
    if rel == LEFT:
        return a.col < b.col
    if rel == RIGHT:
        return a.col > b.col
    if rel == ABOVE:
        return a.row < b.row
    return a.row > b.row


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene graph. ``relations`` is ``None`` for a full scene (relations follow from the
    cells) or an explicit tuple of ``(subject, relation, object)`` for a text's partial graph."""
    objects: tuple[Obj, ...]
    relations: Optional[tuple[tuple[int, int, int], ...]] = None

    def all_relations(self) -> tuple[tuple[int, int, int], ...]:
        if self.relations is not None:
            return self.relations
        out = []
        for i, a in enumerate(self.objects):
            for j, b in enumerate(self.objects):
                if i != j:
                    out.extend((i, r, j) for r in range(4) if holds(a, r, b))
        return tuple(out)

    def kinds(self) -> list[int]:
        return [o.kind for o in self.objects]

    def find(self, kind: int) -> Optional[Obj]:
        for o in self.objects:
            if o.kind == kind:
                return o
        return None

    def to_dict(self) -> dict:
        d = {"objects": [dataclasses.astuple(o) for o in self.objects]}
        if self.relations is not None:
            d["relations"] = [list(r) for r in self.relations]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        rel = d.get("relations")
        return cls(tuple(Obj(*o) for o in d["objects"]), None if rel is None else tuple(map(tuple, rel)))


def caption_graph(scene: Scene) -> Scene:
    """The partial graph a short caption states: kinds only (no size, cell or relation)."""
    return Scene(tuple(Obj(o.colour, o.shape) for o in scene.objects), relations=())


# ---- the world --------------------------------------------------------------------------------

class SceneWorld:
    """Samples scenes per split and renders them; picklable, cheap to construct."""

    def __init__(self, cfg: SceneConfig = SceneConfig()):
        self.cfg = cfg
        held = []
        for name in cfg.held_out:
            try:
                held.append(parse_kind(name))
            except ValueError:
                raise ValueError(f"scene.held_out: {name!r} is not '<colour> <shape>' with colour in "
                                 f"{COLOURS} and shape in {SHAPES}") from None
        self.held_out = tuple(sorted(set(held)))
        self.seen_kinds = tuple(k for k in range(NUM_KINDS) if k not in self.held_out)
        if not 1 <= cfg.min_objects <= cfg.max_objects <= 6:
            raise ValueError(f"scene: need 1 <= min_objects <= max_objects <= 6, got "
                             f"{cfg.min_objects}..{cfg.max_objects}")
        # A fixed Zipf-like prior over kinds (independent of the seed, so popularity is stable).
        order = np.random.default_rng(1234).permutation(NUM_KINDS)
        prior = np.empty(NUM_KINDS)
        prior[order] = 1.0 / (np.arange(NUM_KINDS) + 1.0) ** 0.7
        self.prior = prior / prior.sum()
        self.popularity = tuple(int(k) for k in order)   # most popular first
        self._logp = np.log(self.prior)
        self._logp_seen = self._logp[list(self.seen_kinds)]

    def allowed_kinds(self, split: str) -> tuple[int, ...]:
        """Kinds a split may show or mention (all kinds in ``test_comp``)."""
        return tuple(range(NUM_KINDS)) if split == "test_comp" else self.seen_kinds

    def rng(self, split: str, index: int, salt: str | int = 0) -> np.random.Generator:
        """The generator for one (split, index, purpose); the same triple gives the same draws."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {sorted(SPLITS)}")
        s = salt if isinstance(salt, int) else _salt(salt)
        return np.random.Generator(np.random.PCG64([self.cfg.seed, SPLITS[split], int(index), s]))

    def scene(self, split: str, index: int) -> Scene:
        rng = self.rng(split, index, "scene")
        return self.sample_scene(rng, split)

    def sample_scene(self, rng: np.random.Generator, split: str, num_objects: Optional[int] = None) -> Scene:
        cfg = self.cfg
        n = int(num_objects or rng.integers(cfg.min_objects, cfg.max_objects + 1))
        if split == "test_comp":
            if not self.held_out:
                raise ValueError("split 'test_comp' shows held-out kinds, but scene.held_out is empty")
            first = int(rng.choice(np.asarray(self.held_out)))
            rest = _weighted_sample(rng, np.delete(self._logp, first), n - 1)
            kinds = [first] + [int(k if k < first else k + 1) for k in rest]
        else:
            kinds = [self.seen_kinds[i] for i in _weighted_sample(rng, self._logp_seen, n)]
        cells = rng.choice(9, n, replace=False)
        sizes = rng.integers(0, 2, n)
        objs = tuple(Obj(k // len(SHAPES), k % len(SHAPES), int(s), int(c))
                     for k, s, c in zip(kinds, sizes, cells))
        return Scene(objs)

    def render(self, scene: Scene, rng: np.random.Generator) -> np.ndarray:
        """``uint8[H, W, 3]``: tinted noisy background, objects with jittered colour/position."""
        h = self.cfg.image_size
        n = len(scene.objects)
        cell = h / 3.0
        jit = max(1, h // 32)
        tint = rng.integers(-12, 13, (n, 3))               # per-object colour jitter
        shift = rng.integers(-jit, jit + 1, (n, 2))        # per-object position jitter
        canvas = np.empty((h, h, 3), np.int16)
        canvas[:] = rng.integers(30, 110) + rng.integers(-15, 16, 3)
        for o, d, (dy, dx) in zip(scene.objects, tint, shift):
            if o.cell < 0 or o.size < 0:
                raise ValueError(f"render: object {o} has no cell/size (a partial graph cannot be drawn)")
            mask = _stencil(o.shape, o.size, h)
            r = mask.shape[0] // 2
            y0 = int((o.row + 0.5) * cell) + int(dy) - r
            x0 = int((o.col + 0.5) * cell) + int(dx) - r
            ys, xs = slice(max(y0, 0), min(y0 + mask.shape[0], h)), slice(max(x0, 0), min(x0 + mask.shape[1], h))
            m = mask[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0]
            canvas[ys, xs][m] = RGB[o.colour] + d
        if self.cfg.noise_std > 0:    # uniform noise with the configured standard deviation
            a = int(round(self.cfg.noise_std * 3 ** 0.5))
            canvas += rng.integers(-a, a + 1, (h, h, 3), dtype=np.int16)
        return np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)

    def image(self, split: str, index: int, scene: Optional[Scene] = None) -> np.ndarray:
        return self.render(scene or self.scene(split, index), self.rng(split, index, "image"))


def _weighted_sample(rng: np.random.Generator, logp: np.ndarray, n: int) -> np.ndarray:
    """``n`` distinct indices drawn without replacement with probabilities ``∝ exp(logp)``
    (Gumbel top-k: the same law as successive weighted draws)."""
    keys = logp - np.log(-np.log(rng.random(len(logp))))
    return np.argsort(-keys)[:n]


def _salt(name: str) -> int:
    import zlib
    return zlib.crc32(name.encode())


@functools.lru_cache(maxsize=None)
def _stencil(shape: int, size: int, image_size: int) -> np.ndarray:
    """Boolean mask of one shape, side ``2r+1`` pixels."""
    cell = image_size / 3.0
    radius = cell * (0.45 if size == 1 else 0.32)
    r = int(np.ceil(radius))
    y, x = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float32)
    rr = radius
    if SHAPES[shape] == "circle":
        m = x * x + y * y <= rr * rr
    elif SHAPES[shape] == "square":
        m = (np.abs(x) <= rr * 0.8) & (np.abs(y) <= rr * 0.8)
    elif SHAPES[shape] == "triangle":
        m = (y <= rr * 0.8) & (y >= -rr) & (np.abs(x) <= (y + rr) * 0.6)
    elif SHAPES[shape] == "diamond":
        m = np.abs(x) + np.abs(y) <= rr
    else:  # cross
        t = max(rr / 3.0, 0.6)
        m = ((np.abs(x) <= t) & (np.abs(y) <= rr)) | ((np.abs(y) <= t) & (np.abs(x) <= rr))
    m.setflags(write=False)
    return m


# ---- text ---------------------------------------------------------------------------------------

def listing(phrases: list[str]) -> str:
    """["a x", "a y", "a z"] -> "a x, a y and a z"."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Every object's colour and shape, in a random order: "a red circle and a blue square"."""
    order = rng.permutation(len(scene.objects))
    return listing([with_article(scene.objects[i].phrase()) for i in order])


def relation_between(a: Obj, b: Obj) -> int:
    """The relation used to describe a pair: horizontal when the columns differ, else vertical."""
    if a.col != b.col:
        return LEFT if a.col < b.col else RIGHT
    return ABOVE if a.row < b.row else BELOW


def long_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Count, each object with size/colour/shape/position, and the relation of consecutive pairs."""
    objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    n = len(objs)
    parts = [f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} object{'' if n == 1 else 's'}."]
    for o in objs:
        p = o.phrase(size=True)
        parts.append(f"{with_article(p).capitalize()} is {CELL_PHRASES[o.cell]}.")
    for a, b in zip(objs, objs[1:]):
        parts.append(f"The {a.phrase()} is {RELATIONS[relation_between(a, b)]} the {b.phrase()}.")
    return " ".join(parts)


# ---- exact structure features (the scene-graph teacher) ---------------------------------------

_BLOCKS = (("kind", NUM_KINDS, 1.0), ("colour", len(COLOURS), 0.5), ("shape", len(SHAPES), 0.5),
           ("size_kind", 2 * NUM_KINDS, 0.5), ("cell_colour", 9 * len(COLOURS), 0.5),
           ("cell_shape", 9 * len(SHAPES), 0.5), ("rel_colour", 2 * len(COLOURS) ** 2, 0.5),
           ("rel_shape", 2 * len(SHAPES) ** 2, 0.5))
_OFFSETS = np.cumsum([0] + [b[1] for b in _BLOCKS])
SCENE_FEATURE_DIM = int(_OFFSETS[-1])
_SIZES = np.array([b[1] for b in _BLOCKS])
_WEIGHTS = np.sqrt(np.array([b[2] for b in _BLOCKS], np.float32))


def scene_features(scene: Optional[Scene]) -> np.ndarray:
    """``float32[SCENE_FEATURE_DIM]``: per-block count vectors, each L2-normalised and weighted,
    then the whole L2-normalised; zeros for ``None``. Blocks: kinds, colours, shapes, size×kind,
    cell×colour, cell×shape, (colour, rel, colour) and (shape, rel, shape) with relations folded
    to {left of, above}. Attributes a text leaves unspecified contribute nothing, so the cosine of
    two features is an exact, graded similarity of the structures (1 for equal graphs)."""
    v = np.zeros(SCENE_FEATURE_DIM, np.float32)
    if scene is None:
        return v
    C, S = len(COLOURS), len(SHAPES)
    o0 = _OFFSETS
    for o in scene.objects:
        v[o0[0] + o.kind] += 1
        v[o0[1] + o.colour] += 1
        v[o0[2] + o.shape] += 1
        if o.size >= 0:
            v[o0[3] + o.size * NUM_KINDS + o.kind] += 1
        if o.cell >= 0:
            v[o0[4] + o.cell * C + o.colour] += 1
            v[o0[5] + o.cell * S + o.shape] += 1
    for i, r, j in scene.all_relations():
        a, b = scene.objects[i], scene.objects[j]
        if r in (RIGHT, BELOW):                       # fold converses: b left-of/above a
            a, b, r = b, a, CONVERSE[r]
        k = 0 if r == LEFT else 1
        v[o0[6] + (k * C + a.colour) * C + b.colour] += 1
        v[o0[7] + (k * S + a.shape) * S + b.shape] += 1
    norms = np.sqrt(np.add.reduceat(v * v, o0[:-1]))
    scale = np.divide(_WEIGHTS, norms, out=np.zeros_like(norms), where=norms > 0)
    v *= np.repeat(scale, _SIZES)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


__all__ = [
    "COLOURS", "SHAPES", "PLURALS", "SIZES", "CELLS", "CELL_PHRASES", "RELATIONS", "NUMBERS",
    "ORDINALS", "NUM_KINDS", "SPLITS", "LEFT", "RIGHT", "ABOVE", "BELOW", "CONVERSE", "Obj", "Scene",
    "SceneWorld", "kind_of", "kind_name", "parse_kind", "article", "with_article", "holds",
    "caption_graph", "short_caption", "long_caption", "relation_between", "listing",
    "scene_features", "SCENE_FEATURE_DIM",
]
