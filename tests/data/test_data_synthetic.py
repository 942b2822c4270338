"""The scene world's ground truth, checked by code written here, independently of the generator.

The checkers below parse the generated English with their own regular expressions and
evaluate it on the scene graph with their own relation semantics (left = smaller column,
above = smaller row on the 3x3 grid); they share only the vocabulary (names by index).
"""
import re

import numpy as np
import pytest

from mllm_jax.config import SceneConfig
from mllm_jax.data import synthetic_sets as SS
from mllm_jax.data import synthetic_tasks as ST
from mllm_jax.data.synthetic import SceneWorld

COL = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
SHP = ["circle", "square", "triangle", "diamond", "cross"]
PLU = ["circles", "squares", "triangles", "diamonds", "crosses"]
SIZ = ["small", "large"]
CELL = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
NUM = ["zero", "one", "two", "three", "four", "five", "six"]
ORD = ["first", "second", "third", "fourth"]
PALETTE = np.array([(220, 40, 40), (240, 140, 30), (225, 210, 40), (50, 175, 60), (40, 200, 210),
                    (50, 80, 230), (140, 60, 190), (240, 130, 190)])
N = 1000


def objs(scene):
    """[{colour, shape, size, row, col}] with names, from the graph's plain tuples."""
    out = []
    for c, s, z, cell in scene.to_dict()["objects"]:
        out.append(dict(colour=COL[c], shape=SHP[s], size=SIZ[z] if z >= 0 else None,
                        row=cell // 3 if cell >= 0 else None, col=cell % 3 if cell >= 0 else None,
                        cell=CELL[cell] if cell >= 0 else None))
    return out


def rel_true(a, rel, b):
    return {"left of": a["col"] < b["col"], "right of": a["col"] > b["col"],
            "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[rel]


def find(os_, colour=None, shape=None, size=None):
    return [o for o in os_ if (colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape)
            and (size is None or o["size"] == size)]


@pytest.fixture(scope="module")
def world():
    return SceneWorld(SceneConfig(seed=3))


def vqa_answer(q, os_):
    m = re.fullmatch(r"What color is the (\w+)\?", q)
    if m:
        (o,) = find(os_, shape=m[1])
        return o["colour"]
    m = re.fullmatch(r"What shape is the (\w+) object\?", q)
    if m:
        (o,) = find(os_, colour=m[1])
        return o["shape"]
    if q == "How many objects are there?":
        return NUM[len(os_)]
    m = re.fullmatch(r"How many (\w+) are there\?", q)
    if m:
        return NUM[len(find(os_, shape=SHP[PLU.index(m[1])]))]
    m = re.fullmatch(r"How many (\w+) objects are there\?", q)
    if m:
        return NUM[len(find(os_, colour=m[1]))]
    m = re.fullmatch(r"Where is the (\w+) (\w+)\?", q)
    if m:
        (o,) = find(os_, m[1], m[2])
        return o["cell"]
    m = re.fullmatch(r"Is the (\w+) (\w+) small or large\?", q)
    if m:
        (o,) = find(os_, m[1], m[2])
        return o["size"]
    m = re.fullmatch(r"Is there an? (\w+) (\w+)\?", q)
    if m:
        return "yes" if find(os_, m[1], m[2]) else "no"
    m = re.fullmatch(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", q)
    if m:
        (a,), (b,) = find(os_, m[1], m[2]), find(os_, m[4], m[5])
        return "yes" if rel_true(a, m[3], b) else "no"
    raise AssertionError(f"unparsed question {q!r}")


def test_vqa_answers_match_scene_graph(world):
    qtypes = set()
    for smp in SS.vqa_set(world, "test", N):
        q, a = smp.segments[1].text, smp.targets[0]
        assert vqa_answer(q, objs(smp.scene)) == a, (smp.id, q, a)
        assert smp.meta["answer"] == a
        qtypes.add(smp.meta["qtype"])
    assert qtypes == set(ST.VQA_TYPES)


@pytest.mark.parametrize("size", [32, 48, 64])
def test_images_show_the_scene_graph(size):
    """The pixel at each object's nominal cell centre has the object's colour (nearest palette
    entry) and the image corners are background (no palette colour within distance 60)."""
    world = SceneWorld(SceneConfig(seed=3, image_size=size))
    for i in range(N if size == 32 else N // 4):
        scene = world.scene("val", i)
        img = world.image("val", i, scene).astype(int)
        h = img.shape[0]
        assert img.shape == (size, size, 3)
        for o in objs(scene):
            y, x = int((o["row"] + 0.5) * h / 3), int((o["col"] + 0.5) * h / 3)
            d = np.linalg.norm(PALETTE - img[y, x], axis=1)
            assert COL[int(d.argmin())] == o["colour"], (i, o, img[y, x])
        occupied = {(o["row"], o["col"]) for o in objs(scene)}
        if (0, 0) not in occupied:
            assert np.linalg.norm(PALETTE - img[0, 0], axis=1).min() > 60


def test_pope_labels_and_strategies(world):
    popular_rank = {k: r for r, k in enumerate(world.popularity)}
    for strategy in ST.POPE_STRATEGIES:
        labels = []
        for smp in SS.pope_set(world, "test", N // 2, strategy):
            m = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", smp.segments[1].text)
            os_ = objs(smp.scene)
            truth = "yes" if find(os_, m[1], m[2]) else "no"
            assert truth == smp.targets[0], (smp.id, smp.segments[1].text)
            labels.append(truth)
            if truth == "no" and strategy == "adversarial":     # shares colour or shape with a present object
                assert find(os_, colour=m[1]) or find(os_, shape=m[2])
            if truth == "no" and strategy == "popular":         # among the 3 most popular absent kinds
                present = {COL.index(o["colour"]) * 5 + SHP.index(o["shape"]) for o in os_}
                absent = [k for k in world.popularity if k not in present and k in world.seen_kinds]
                assert popular_rank[COL.index(m[1]) * 5 + SHP.index(m[2])] <= popular_rank[absent[2]]
        assert labels.count("yes") == labels.count("no") == N // 2


PAIR = re.compile(r"an? (?:(small|large) )?(\w+) (\w+)(?: (left of|right of|above|below) an? (?:(small|large) )?(\w+) (\w+))?"
                  r"(?: and an? (\w+) (\w+))?")


def caption_true(text, os_):
    m = PAIR.fullmatch(text)
    assert m, text
    z1, c1, s1, rel, z2, c2, s2, c3, s3 = m.groups()
    ok = False
    for a in find(os_, c1, s1, z1):
        if rel is None:
            ok = True
        for b in find(os_, c2, s2, z2) if rel else []:
            ok = ok or (a is not b and rel_true(a, rel, b))
    return ok and (c3 is None or bool(find(os_, c3, s3)))


def test_hard_negatives_are_false_and_positives_true(world):
    items = SS.hard_negative_set(world, "test", N // 4)
    cats = {}
    for it in items:
        os_ = objs(it.image.scene)
        assert caption_true(it.positive.segments[0].text, os_), it.positive.segments[0].text
        assert not caption_true(it.negative.segments[0].text, os_), (it.category, it.negative.segments[0].text)
        cats[it.category] = cats.get(it.category, 0) + 1
        p, n = it.positive.segments[0].text, it.negative.segments[0].text
        if it.category in ("swap_att", "swap_obj"):           # the same words, rearranged
            assert sorted(p.split()) == sorted(n.split()) and p != n
        if it.category == "add_obj":
            assert n.startswith(p + " and ")
    assert set(cats) == set(ST.HARD_NEGATIVE_CATEGORIES) and min(cats.values()) == N // 4


def test_captions_match_scene_graph(world):
    for smp in SS.caption_set(world, "val", N // 2, long=True):
        os_ = objs(smp.scene)
        text = smp.targets[0]
        sentences = text.split(". ")
        assert sentences[0] == f"There {'is' if len(os_) == 1 else 'are'} {NUM[len(os_)]} object{'s' if len(os_) > 1 else ''}"
        for s in sentences[1:]:
            s = s.rstrip(".")
            m = re.fullmatch(r"An? (small|large) (\w+) (\w+) is (?:at|on|in) the ([\w ]+)", s)
            if m:
                (o,) = find(os_, m[2], m[3], m[1])
                assert o["cell"] == m[4], (smp.id, s)
                continue
            m = re.fullmatch(r"The (\w+) (\w+) is (left of|right of|above|below) the (\w+) (\w+)", s)
            assert m, s
            assert rel_true(find(os_, m[1], m[2])[0], m[3], find(os_, m[4], m[5])[0]), (smp.id, s)
    for smp in SS.caption_set(world, "val", N // 2):
        kinds = sorted(re.findall(r"an? (\w+ \w+)", smp.targets[0]))
        assert kinds == sorted(f"{o['colour']} {o['shape']}" for o in objs(smp.scene))


def apply_edit(text, os_):
    """The test's own reading of an edit sentence."""
    os_ = [dict(o) for o in os_]
    m = re.fullmatch(r"the (\w+) (\w+) turns (\w+)", text)
    if m:
        find(os_, m[1], m[2])[0]["colour"] = m[3]
        return os_
    m = re.fullmatch(r"the (\w+) (\w+) moves to the ([\w ]+)", text)
    if m:
        o = find(os_, m[1], m[2])[0]
        o["cell"] = m[3]
        o["row"], o["col"] = divmod(CELL.index(m[3]), 3)
        return os_
    m = re.fullmatch(r"the (\w+) (\w+) (grows|shrinks)", text)
    if m:
        find(os_, m[1], m[2])[0]["size"] = "large" if m[3] == "grows" else "small"
        return os_
    m = re.fullmatch(r"the (\w+) (\w+) disappears", text)
    if m:
        return [o for o in os_ if not (o["colour"] == m[1] and o["shape"] == m[2])]
    m = re.fullmatch(r"an? (small|large) (\w+) (\w+) appears (?:at|on|in) the ([\w ]+)", text)
    assert m, text
    r, c = divmod(CELL.index(m[4]), 3)
    return os_ + [dict(colour=m[2], shape=m[3], size=m[1], row=r, col=c, cell=m[4])]


def key(os_):
    return sorted((o["colour"], o["shape"], o["size"], o["cell"]) for o in os_)


def test_stories_composed_and_multi_image_questions(world):
    queries, cands, target = SS.composed_retrieval_set(world, "test", N // 2)
    for q, t in zip(queries, (cands[i] for i in target)):
        assert key(apply_edit(q.segments[1].text, objs(q.scene))) == key(objs(t.scene)), q.segments[1].text
    src = SS.SceneSource(world.cfg, "test", {"multi_image_qa": 1}, size=N // 2)
    for i in range(len(src)):
        smp = src[i]
        scenes = [objs(s) for s in smp.meta["scenes"]]
        q, a = smp.segments[-2].text, smp.targets[0]
        assert len(scenes) == smp.num_images
        m = re.fullmatch(r"In how many of the \w+ images is there an? (\w+) (\w+)\?", q)
        if m:
            assert a == NUM[sum(bool(find(s, m[1], m[2])) for s in scenes)]
        elif q == "Which image has the most objects?":
            counts = [len(s) for s in scenes]
            assert a == ORD[counts.index(max(counts))] and counts.count(max(counts)) == 1
        else:
            m = re.fullmatch(r"Which image shows an? (\w+) (\w+)\?", q)
            where = [k for k, s in enumerate(scenes) if find(s, m[1], m[2])]
            assert len(where) == 1 and a == ORD[where[0]]
    # a story document: each "Then ..." sentence turns the previous image's scene into the next
    src = SS.SceneSource(world.cfg, "test", {"story": 1}, size=200)
    for i in range(len(src)):
        segs = src[i].segments
        for k in range(3, len(segs), 2):
            text = segs[k - 1].text
            assert text.startswith("Then ") and text.endswith(".")
            assert key(apply_edit(text[5:-1], objs(segs[k - 2].scene))) == key(objs(segs[k].scene))


def test_rag_answers_come_from_memory(world):
    memory, questions = SS.rag_set(world, "test", N // 2)
    names = {}
    for m in memory:
        r = re.fullmatch(r"An? (\w+) (\w+) is called an? (\w+)\.", m.segments[1].text)
        names[(r[1], r[2])] = r[3]
    assert len(set(names.values())) == len(names) == 40                 # one made-up name per kind
    for q in questions:
        os_ = objs(q.scene)
        text = q.segments[1].text
        r = re.fullmatch(r"What is the object (?:at|on|in) the ([\w ]+) called\?", text)
        (o,) = [o for o in os_ if o["cell"] == r[1]] if r else find(os_, *re.fullmatch(r"What is the (\w+) (\w+) called\?", text).groups())
        assert q.targets[0] == names[(o["colour"], o["shape"])]
        assert memory[q.meta["memory_index"]].meta["name"] == q.targets[0]


def test_splits_hold_out_combinations(world):
    held = {tuple(k.split()) for k in world.cfg.held_out}
    for split in ("train", "val", "test"):
        src = SS.SceneSource(world.cfg, split, {t: 1 for t in SS.TASKS if t != "vladva"}, size=400)
        for i in range(len(src)):
            smp = src[i]
            text = " ".join(s.text for s in smp.segments if s.kind == "text")
            for c, s in held:                                               # never shown, never named
                assert f"{c} {s}" not in text, (smp.id, text)
            for seg in smp.segments:
                if seg.scene is not None and seg.kind == "image":
                    assert not {(o["colour"], o["shape"]) for o in objs(seg.scene)} & held
    for i in range(200):
        assert {(o["colour"], o["shape"]) for o in objs(world.scene("test_comp", i))} & held


def test_deterministic_from_seed():
    def blob(seed):
        src = SS.SceneSource(SceneConfig(seed=seed), "train", {t: 1 for t in SS.TASKS if t != "vladva"}, size=64)
        parts = []
        for i in range(64):
            for seg in src[i].segments:
                parts.append(seg.image.tobytes() if seg.kind == "image" else seg.text.encode())
        return b"|".join(parts)
    assert blob(0) == blob(0)
    assert blob(0) != blob(1)


def test_interleaved_retrieval_sets(world):
    q, c, t = SS.interleaved_retrieval_set(world, "test", 20)
    for qi, ci in zip(q, (c[i] for i in t)):
        assert qi.segments[-1].kind == "text" and ci.segments[0].kind == "image"
        last = qi.segments[-1].text
        prev = [s for s in qi.segments if s.kind == "image"][-1]
        assert key(apply_edit(last[5:-1], objs(prev.scene))) == key(objs(ci.segments[0].scene))
    q, c, t = SS.interleaved_to_interleaved_set(world, "test", 20)
    assert all(qi.segments[0].kind == "text" and ci.segments and ci.segments[0].kind == "text" for qi, ci in zip(q, c))


def test_paired_views_show_one_scene_per_index_pair():
    from mllm_jax.data.synthetic_sets import SceneSource
    cfg = SceneConfig()
    plain = SceneSource(cfg, "train", {"image": 1, "caption": 1})
    paired = SceneSource(cfg, "train", {"image": 1, "caption": 1}, paired_views=True)
    assert plain.fingerprint() != paired.fingerprint()          # teacher caches never mix the two
    for k in range(0, 12, 2):
        img, cap = paired[k], paired[k + 1]
        assert img.segments[0].kind == "image" and cap.segments[0].kind == "text"
        assert img.scene == cap.scene == plain[k].scene
        # the caption is true of the image's scene
        assert ST.graph_holds(img.scene, cap.segments[0].scene), (cap.segments[0].text, img.scene)
        assert plain[k + 1].scene != plain[k].scene or k == 0    # unpaired: scene k+1 is its own
    # each view is rendered on its own: same scene, own jitter/noise
    a = SceneSource(cfg, "train", {"image": 1}, paired_views=True)
    assert a[0].scene == a[1].scene and not np.array_equal(a[0].segments[0].image, a[1].segments[0].image)


def test_discriminative_captions_are_true_partial_graphs(world):
    rng = np.random.default_rng(0)
    styles = set()
    for i in range(60):
        scene = world.scene("train", i)
        seg = SS.disc_caption(scene, rng)
        assert ST.graph_holds(scene, seg.scene), (seg.text, scene)
        styles.add(bool(seg.scene.relations))
        if seg.scene.relations:
            assert ST.describe(seg.scene) == seg.text and len(scene.objects) >= 2
    assert styles == {True, False}                # both styles occur


def test_a_world_without_held_out_kinds_has_a_corpus_and_a_clear_test_comp_error():
    """``scene.held_out=()`` (no compositional split) is a valid world: the tokenizer corpus
    (which reads ``test_comp`` for the held-out kinds) crashed in numpy ("a cannot be empty")."""
    cfg = SceneConfig(held_out=())
    texts = SS.scene_corpus(cfg, 20)
    assert texts and all(isinstance(t, str) for t in texts)
    with pytest.raises(ValueError, match="held_out"):
        SceneWorld(cfg).scene("test_comp", 0)
