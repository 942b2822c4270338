"""Teachers (scene graph, pixels, MiniLM through our BERT, our vision towers) and the cache."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from mllm_jax.config import ConfigError, DataConfig, MLLMConfig, ProjectorConfig, SceneConfig, VisionConfig
from mllm_jax.data import teachers as TC
from mllm_jax.data.schema import Sample, image_segment, text_segment, validate_sample
from mllm_jax.data.synthetic import SCENE_FEATURE_DIM, Obj, Scene, scene_features
from mllm_jax.data.synthetic_sets import SceneSource

RED, BLUE, CIRCLE, SQUARE, LEFT, ABOVE = 0, 5, 0, 1, 0, 2


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_scene_graph_features_hand_computed():
    """One large red circle at the top left: six one-hot blocks (kind weight 1, the five others
    0.5), no relations -> the kind entry is 1/sqrt(3.5), the other five sqrt(0.5/3.5)."""
    f = scene_features(Scene((Obj(RED, CIRCLE, 1, 0),)))
    assert f.shape == (SCENE_FEATURE_DIM,) == (428,)
    nz = np.flatnonzero(f)
    # layout: kind(40) colour(8) shape(5) size*kind(80) cell*colour(72) cell*shape(45) rel(128) rel(50)
    assert nz.tolist() == [0, 40, 48, 53 + 40 + 0, 133 + 0, 205 + 0]
    np.testing.assert_allclose(f[nz], [1 / np.sqrt(3.5)] + [np.sqrt(0.5 / 3.5)] * 5, rtol=1e-6)
    assert not scene_features(None).any()


def test_scene_graph_features_bind_attributes_and_relations():
    a = Scene((Obj(RED, CIRCLE, 1, 3), Obj(BLUE, SQUARE, 0, 5)))        # red circle left of blue square
    swapped = Scene((Obj(BLUE, CIRCLE, 1, 3), Obj(RED, SQUARE, 0, 5)))  # same colours and shapes, rebound
    flipped = Scene((Obj(RED, CIRCLE, 1, 5), Obj(BLUE, SQUARE, 0, 3)))  # relation reversed
    fa = scene_features(a)
    assert cos(fa, scene_features(Scene(a.objects[::-1]))) == pytest.approx(1.0)   # order does not matter
    assert cos(fa, scene_features(swapped)) < 0.6 and cos(fa, scene_features(flipped)) < 0.9
    stated = Scene((Obj(RED, CIRCLE), Obj(BLUE, SQUARE)), ((0, LEFT, 1),))          # "red circle left of blue square"
    wrong = Scene((Obj(RED, CIRCLE), Obj(BLUE, SQUARE)), ((1, LEFT, 0),))
    assert cos(fa, scene_features(stated)) > cos(fa, scene_features(wrong)) > 0


def test_pixel_teacher():
    t = TC.PixelTeacher()
    img = np.zeros((32, 32, 3), np.uint8)
    img[:] = (200, 10, 100)
    f = t.image_features(img)
    assert f.shape == (128,) and np.linalg.norm(f) == pytest.approx(1.0)
    # colour histogram: 4 bins per channel -> joint bin (3*4 + 0)*4 + 1 = 49, weight 1/sqrt(2)
    assert np.flatnonzero(f[64:]).tolist() == [49] and f[64 + 49] == pytest.approx(2 ** -0.5)
    moved = np.roll(img, 8, axis=1)
    moved[:, :8] = (0, 0, 0)
    img2 = img.copy()
    img2[:, -8:] = (0, 0, 0)
    g, h = t.image_features(moved), t.image_features(img2)
    np.testing.assert_allclose(g[64:], h[64:])                    # same colours ...
    assert not np.allclose(g[:64], h[:64])                       # ... different layout
    rows = t.embed([image_segment(img), text_segment("a red square")])
    assert rows[0].any() and not rows[1].any()
    assert TC.PixelTeacher(seed=1).fingerprint() != t.fingerprint()


def _source(size=24, seed=0):
    return SceneSource(SceneConfig(seed=seed), "train", {"pair": 1, "story": 1, "vqa": 1}, size=size)


def test_cache_roundtrip_and_pipeline_reads_it(tmp_path):
    src = _source()
    teachers = [TC.SceneGraphTeacher(), TC.PixelTeacher()]
    caches = [TC.ensure_cache(t, src, tmp_path / t.name) for t in teachers]
    for i in range(len(src)):
        s = validate_sample(src[i])
        for t, c in zip(teachers, caches):
            np.testing.assert_array_equal(c.features(s), t.embed(s.segments))
    lazy = TC.TeacherCache(tmp_path / "pixel", preload_bytes=0)            # per-read tensorstore path
    s = validate_sample(src[3])
    np.testing.assert_array_equal(lazy.features(s), caches[1].features(s))
    c2 = pickle.loads(pickle.dumps(caches[1]))                             # as sent to grain workers
    np.testing.assert_array_equal(c2.features(s), caches[1].features(s))
    meta = json.loads((tmp_path / "pixel" / "meta.json").read_text())
    assert meta["num_samples"] == 24 and meta["fingerprint"] == teachers[1].fingerprint()

    from mllm_jax.data import pipeline as P
    from mllm_jax.data.tokenize import train_tokenizer
    from mllm_jax.data.synthetic_sets import scene_corpus
    tok = train_tokenizer(scene_corpus(SceneConfig(), 200))
    model = MLLMConfig(vision=VisionConfig(image_size=16, patch_size=4), projector=ProjectorConfig(kind="pool"))
    cfg = DataConfig(batch_size=4, seq_buckets=(64, 128, 256))
    online = P.make_iterator(cfg, model, source=src, tokenizer=tok, shard=(0, 1),
                             teachers=[TC.OnlineFeatures(t) for t in teachers])
    cached = P.make_iterator(cfg, model, source=src, tokenizer=tok, shard=(0, 1), teachers=caches)
    for _ in range(6):
        a, b = next(online), next(cached)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert next(cached)["teacher_scene_graph"][:, :, :].any()


def test_stale_cache_detected_and_rebuilt(tmp_path, caplog):
    src = _source()
    path = tmp_path / "pixel"
    TC.ensure_cache(TC.PixelTeacher(seed=0), src, path)
    new = TC.PixelTeacher(seed=1)                                           # a different teacher
    with pytest.raises(TC.StaleCacheError, match="built by teacher"):
        TC.TeacherCache(path, fingerprint=new.fingerprint())
    c = TC.ensure_cache(new, src, path)
    assert "rebuilding teacher cache" in caplog.text
    s = validate_sample(src[0])
    np.testing.assert_array_equal(c.features(s), new.embed(s.segments))
    other = _source(seed=1)                                                 # a different source
    with pytest.raises(TC.StaleCacheError, match="built for source"):
        TC.TeacherCache(path, fingerprint=new.fingerprint(), source=other.fingerprint())
    c = TC.ensure_cache(new, other, path)
    assert c.meta["source"] == other.fingerprint()
    (path / "meta.json").unlink()                                           # an interrupted build
    with pytest.raises(TC.StaleCacheError, match="no meta.json"):
        TC.TeacherCache(path)
    TC.ensure_cache(new, other, path)
    # a sample that changed under the same id (a source without a fingerprint)
    samples = [Sample("a", (image_segment(np.zeros((4, 4, 3), np.uint8)), text_segment("x")))]
    c = TC.ensure_cache(new, samples, tmp_path / "list")
    changed = Sample("a", (image_segment(np.ones((4, 4, 3), np.uint8)), text_segment("x")))
    with pytest.raises(TC.StaleCacheError, match="'a' changed since"):
        c.features(validate_sample(changed))
    with pytest.raises(TC.StaleCacheError, match="'b' is not in"):
        c.features(validate_sample(Sample("b", (text_segment("x"),))))


def test_cache_build_skips_unreadable_records(tmp_path):
    """A record the source cannot read (DataError, e.g. a malformed JSONL line) is left out of the
    cache and counted, as the pipeline skips it; it used to stop the build."""
    from mllm_jax.data.schema import DataError

    class Src:
        good = [Sample(f"s{i}", (text_segment(f"t{i}"),)) for i in range(3)]

        def __len__(self):
            return 4

        def __getitem__(self, i):
            if i == 1:
                raise DataError("bad_record", "docs.jsonl:2", "", "invalid JSON")
            return self.good[{0: 0, 2: 1, 3: 2}[i]]

    c = TC.build_cache(TC.PixelTeacher(), Src(), tmp_path / "c")
    assert c.meta["num_samples"] == 3 and c.meta["skipped_invalid"] == 1


def test_eval_split_does_not_rebuild_the_training_cache(tmp_path, monkeypatch):
    """The eval pipeline is the training data config on split val, with the same teacher_cache:
    its cache used to be built in the training cache's folder (teacher_cache/<name>), deleting it
    under the training reader, whose index then pointed at the val rows: train sample 5 got val
    sample 5's features, silently (and a grain worker reopening it found no train samples)."""
    from mllm_jax.data import sources

    class Slow(TC.PixelTeacher):          # stands for a cached teacher (MiniLM)
        name = "minilm"

    monkeypatch.setattr(sources, "make_teacher", lambda name, cfg, model: Slow())
    cfg = DataConfig(tasks=("pair:1",), teachers=("minilm",), teacher_cache=str(tmp_path))
    train = SceneSource(SceneConfig(), "train", {"pair": 1}, size=16)
    val = SceneSource(SceneConfig(), "val", {"pair": 1}, size=16)
    (cache,) = sources.open_teachers(cfg, MLLMConfig(), train)
    reader = TC.TeacherCache(cache.path, preload_bytes=0)            # a large cache: read per sample
    s = validate_sample(train[5])
    np.testing.assert_array_equal(reader.features(s), Slow().embed(s.segments))
    (val_cache,) = sources.open_teachers(cfg, MLLMConfig(), val)
    np.testing.assert_array_equal(reader.features(s), Slow().embed(s.segments))
    worker = pickle.loads(pickle.dumps(cache))                       # reopened by a worker
    np.testing.assert_array_equal(worker.features(s), Slow().embed(s.segments))
    v = validate_sample(val[5])
    np.testing.assert_array_equal(val_cache.features(v), Slow().embed(v.segments))
    assert val_cache.path != cache.path


def test_scene_source_fingerprint_follows_task_order():
    """Index i is task table[i % L], the table in the order the tasks are listed: reordering
    them gives other samples at every index, so a cache built before is stale (the fingerprint
    sorted the tasks: ensure_cache kept the old cache, then every read raised StaleCacheError)."""
    a = SceneSource(SceneConfig(), "train", {"vqa": 1, "pair": 1}, size=8, render=False)
    b = SceneSource(SceneConfig(), "train", {"pair": 1, "vqa": 1}, size=8, render=False)
    assert a[0].id == "scene/train/vqa/0" and b[0].id == "scene/train/pair/0"
    assert a.fingerprint() != b.fingerprint()
    same = SceneSource(SceneConfig(), "train", {"vqa": 1, "pair": 1}, size=8, render=False)
    assert same.fingerprint() == a.fingerprint()


def test_llava_ids_repeated_across_records_can_be_cached(tmp_path):
    """LLaVA-format files reuse an id for several conversations about one image; ids key the
    cache, and building one for such a file raised 'duplicate sample ids' (no run could start)."""
    from PIL import Image
    from mllm_jax.data.formats import LlavaSource
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).save(tmp_path / "b.png")

    def rec(id_, image, q):
        return {"id": id_, "image": image, "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                              {"from": "gpt", "value": "yes"}]}
    f = tmp_path / "l.json"
    f.write_text(json.dumps([rec("x", "a.png", "Is it red?"), rec("y", "b.png", "Dark?"),
                             rec("x", "a.png", "Is it square?")]))
    src = LlavaSource(f)
    cache = TC.ensure_cache(TC.PixelTeacher(), src, tmp_path / "cache")
    assert [src[i].id for i in range(3)] == ["llava:x#0", "llava:y", "llava:x#2"]
    for i in range(3):
        s = validate_sample(src[i])
        np.testing.assert_array_equal(cache.features(s), TC.PixelTeacher().embed(s.segments))


def test_jsonl_ids_repeated_across_records_can_be_cached(tmp_path):
    """Caption files give every caption of an image the image's id (COCO: five per image), and an
    id-less interleaved record is named by its index, which another record's id may repeat: the
    JSONL readers disambiguate as LlavaSource does, so a cache can be built (it raised 'duplicate
    sample ids') and each record reads its own rows."""
    from PIL import Image
    from mllm_jax.data.formats import InterleavedSource, PairsSource
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).save(tmp_path / "b.png")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in [
        {"id": 7, "image": "a.png", "caption": "a red square"}, {"id": 8, "image": "b.png", "caption": "dark"},
        {"id": 7, "image": "a.png", "caption": "a square, red"}]))
    docs = tmp_path / "d.jsonl"
    docs.write_text("\n".join(json.dumps(r) for r in [
        {"id": "1", "texts": ["one", None], "images": ["a.png"]}, {"texts": [None, "two"], "images": ["b.png"]},
        {"id": "z", "texts": ["three"], "images": []}]))
    for src, want in [(PairsSource(pairs), ["pairs:7#0", "pairs:8", "pairs:7#2"]),
                      (InterleavedSource(docs), ["interleaved:1#0", "interleaved:1#1", "interleaved:z"])]:
        assert [src[i].id for i in range(3)] == want
        cache = TC.ensure_cache(TC.PixelTeacher(), src, tmp_path / f"cache_{type(src).__name__}")
        for i in range(3):
            s = validate_sample(src[i])
            np.testing.assert_array_equal(cache.features(s), TC.PixelTeacher().embed(s.segments))


# ---- MiniLM through our BERT, and our vision towers (need the encoders branch) -----------------

def _torch_sentence_embeddings(model_dir, texts):
    """sentence-transformers' all-MiniLM recipe in torch: mean pooling, then L2 normalisation."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    enc = tok(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(e, p=2, dim=1).numpy()


def test_minilm_teacher_tiny_bert_parity(tmp_path):
    pytest.importorskip("mllm_jax.models.text_encoder")
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast
    words = "a an the red blue green circle square cross is left of above below small large".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False).save_pretrained(str(tmp_path))
    texts = ["a red circle", "the blue square is left of a small green cross", "large"]
    teacher = TC.MiniLMTeacher.from_pretrained(tmp_path)
    np.testing.assert_allclose(teacher.embed_texts(texts), _torch_sentence_embeddings(tmp_path, texts), atol=2e-5)
    rows = teacher.embed([image_segment(np.zeros((4, 4, 3), np.uint8)), text_segment(texts[0])])
    assert not rows[0].any() and np.linalg.norm(rows[1]) == pytest.approx(1.0, abs=1e-5)
    first = teacher.embed_texts(texts)
    teacher.memo_size = 3                       # full: the next new text starts the memo over
    again = teacher.embed_texts(texts + ["a blue cross"])
    np.testing.assert_allclose(again[:3], first, atol=1e-6)


@pytest.mark.real
def test_minilm_teacher_real_weights(assets_dir):
    pytest.importorskip("mllm_jax.models.text_encoder")
    d = Path(assets_dir) / "all-MiniLM-L6-v2"
    texts = ["a red circle and a blue square", "There are three objects. A small green cross is in the center.",
             "A purple diamond is called a lonan.", "yes"]
    teacher = TC.MiniLMTeacher.from_pretrained(d)
    got = teacher.embed_texts(texts)
    np.testing.assert_allclose(got, _torch_sentence_embeddings(d, texts), atol=1e-4)
    assert got[0] @ got[1] > got[0] @ got[3]                                # semantics, roughly
    assert teacher.fingerprint().startswith("minilm:all-MiniLM-L6-v2:")


def test_vision_teacher_glue():
    vision = pytest.importorskip("mllm_jax.models.vision")
    from flax import nnx
    cfg = VisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_heads=4)
    tower = vision.VisionTower(cfg, rngs=nnx.Rngs(0))
    teacher = TC.VisionTeacher(tower, "tiny")
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    rows = teacher.embed([text_segment("x"), image_segment(img)])
    from mllm_jax.data.pipeline import ImageSpec
    want = np.asarray(tower(ImageSpec.from_vision(cfg)(img)[None]).pooled)[0]
    np.testing.assert_allclose(rows[1], want / np.linalg.norm(want), atol=1e-5)
    assert not rows[0].any()


def test_an_image_replaced_under_a_cache_names_the_way_to_rebuild_it(tmp_path):
    """The source fingerprint covers the records, not the image files: after an image is
    replaced, ensure_cache keeps the cache and the sample's read raises. The error used to say
    "rebuild it with ensure_cache", which keeps it; it says to delete the folder, which works."""
    import shutil
    from PIL import Image
    from mllm_jax.data.formats import LlavaSource
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "a.png")
    turns = [{"from": "human", "value": "<image>\nRed?"}, {"from": "gpt", "value": "yes"}]
    (tmp_path / "l.json").write_text(json.dumps([{"id": "x", "image": "a.png", "conversations": turns}]))
    src = LlavaSource(tmp_path / "l.json")
    TC.ensure_cache(TC.PixelTeacher(), src, tmp_path / "cache")
    Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).save(tmp_path / "a.png")
    s = validate_sample(src[0])
    with pytest.raises(TC.StaleCacheError, match="changed since .* delete this cache folder"):
        TC.ensure_cache(TC.PixelTeacher(), src, tmp_path / "cache").features(s)
    shutil.rmtree(tmp_path / "cache")
    np.testing.assert_array_equal(TC.ensure_cache(TC.PixelTeacher(), src, tmp_path / "cache").features(s),
                                  TC.PixelTeacher().embed(s.segments))


def test_a_failed_cache_build_on_process_0_stops_every_process(tmp_path, monkeypatch):
    """Multi-process: process 0 builds the cache, the others wait for it. When the build failed,
    the others waited in a barrier until it timed out; now process 0 raises its error and the
    others an error naming the cache (one all-gather, faked here)."""
    import jax
    from mllm_jax.data import sources
    from mllm_jax.train import distributed

    class Broken(TC.PixelTeacher):
        name = "minilm"

        def embed(self, segments):
            raise MemoryError("teacher ran out of memory")
    told = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "any_process", lambda flag: told.append(flag) or True)
    src = SceneSource(SceneConfig(), "train", {"pair": 1}, size=4)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with pytest.raises(MemoryError, match="ran out of memory"):
        sources._shared_cache(Broken(), src, tmp_path / "c")
    assert told == [True]
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(RuntimeError, match=f"{tmp_path / 'c'}: process 0 failed to build the minilm teacher cache"):
        sources._shared_cache(Broken(), src, tmp_path / "c")
    assert told == [True, False]  # process 1 itself had nothing to report


class _SlowPixels(TC.PixelTeacher):
    """PixelTeacher that counts its embed calls and takes its time (so builds overlap)."""
    calls = 0

    def embed(self, segments):
        import time
        type(self).calls += 1
        time.sleep(0.2)
        return super().embed(segments)


def test_concurrent_ensure_cache_builds_once(tmp_path):
    """Two runs starting together on one cache folder: one builds, the other waits and opens the
    built cache (before: both built, each deleting the other's folder as it went). A failed
    rebuild leaves the previous cache in place, and a killed build's folder is cleaned up."""
    import threading
    src, path = _source(), tmp_path / "pixel"
    out, errors = [], []

    def run():
        try:
            out.append(TC.ensure_cache(_SlowPixels(seed=0), src, path))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 2
    assert _SlowPixels.calls == 1        # 24 records, fewer samples than a chunk: one call per build
    s = validate_sample(src[0])
    for c in out:
        np.testing.assert_array_equal(c.features(s), TC.PixelTeacher(seed=0).embed(s.segments))

    class Broken(TC.PixelTeacher):
        def embed(self, segments):
            raise RuntimeError("teacher crashed")
    (path.parent / f".{path.name}.building-123-dead").mkdir()          # left by a killed build
    with pytest.raises(RuntimeError, match="teacher crashed"):
        TC.ensure_cache(Broken(seed=1), src, path)
    kept = TC.TeacherCache(path, fingerprint=TC.PixelTeacher(seed=0).fingerprint())
    np.testing.assert_array_equal(kept.features(s), TC.PixelTeacher(seed=0).embed(s.segments))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_rebuild_stopped_while_replacing_the_cache_leaves_no_copy_behind(tmp_path, monkeypatch):
    """A rebuild moves the old cache aside (``.<name>.old-*``) and then deletes it; a run stopped
    in between left that whole copy on disk for good (only ``.building-*`` folders were cleaned)."""
    import shutil
    src, path = _source(8), tmp_path / "pixel"
    TC.ensure_cache(TC.PixelTeacher(seed=0), src, path)

    def stopped(p, *a, **kw):
        if ".old-" in Path(p).name:
            raise KeyboardInterrupt          # stopped right after the new cache took the old one's place
        return shutil.rmtree(p, *a, **kw)
    from mllm_jax.data import teacher_cache
    monkeypatch.setattr(teacher_cache.shutil, "rmtree", stopped)
    with pytest.raises(KeyboardInterrupt):
        TC.ensure_cache(TC.PixelTeacher(seed=1), src, path)
    monkeypatch.undo()
    assert len(list(tmp_path.glob(".pixel.old-*"))) == 1
    TC.ensure_cache(TC.PixelTeacher(seed=2), src, path)                 # the next rebuild
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_cache_rebuilt_under_a_reader_is_refused(tmp_path):
    """Another run rebuilding the folder (another teacher) while this one reads it: the reader's
    next disk read (lazy) or first load (preloaded, or a worker's reopened copy) raises instead
    of reading the new rows against its own index."""
    src, path = _source(), tmp_path / "pixel"
    TC.ensure_cache(TC.PixelTeacher(seed=0), src, path)
    fp = TC.PixelTeacher(seed=0).fingerprint()
    lazy = TC.TeacherCache(path, fingerprint=fp, preload_bytes=0)
    unread = TC.TeacherCache(path, fingerprint=fp)
    s = validate_sample(src[0])
    lazy.features(s)
    TC.ensure_cache(TC.PixelTeacher(seed=1), src, path)
    for c in (lazy, unread, pickle.loads(pickle.dumps(unread))):
        with pytest.raises(TC.StaleCacheError, match="rebuilt or removed"):
            c.features(s)


def test_vision_teacher_from_teacher_models_is_clips_pooled_embedding(tmp_path):
    """data.teachers=['vision'] with data.teacher_models.vision = a transformers CLIPVisionModel
    folder: the cached features are CLIP's pooler_output (L2-normalised) on the teacher's
    preprocessed image; another tower gets another cache folder; a missing path or a folder that
    is not a vision tower is a clear error."""
    import torch
    import transformers

    from mllm_jax.data import sources
    torch.manual_seed(0)
    vis = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=16, patch_size=4)
    hf = transformers.CLIPVisionModel(vis).eval()
    hf.save_pretrained(tmp_path / "clip")
    src = _source()
    cfg = DataConfig(tasks=("pair:1",), teachers=("vision",), teacher_cache=str(tmp_path / "cache"),
                     teacher_models={"vision": str(tmp_path / "clip")})
    (cache,) = sources.open_teachers(cfg, MLLMConfig(), src)
    teacher = sources.make_teacher("vision", cfg, MLLMConfig())
    s = validate_sample(src[0])
    images = [seg for seg in s.segments if seg.kind == "image"]
    assert images
    x = np.stack([teacher.spec(np.asarray(seg.image)) for seg in images])          # [N, H, W, C]
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).pooler_output.numpy()
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    got = cache.features(s)[[i for i, seg in enumerate(s.segments) if seg.kind == "image"]]
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)

    torch.manual_seed(1)
    transformers.CLIPVisionModel(vis).save_pretrained(tmp_path / "clip2")
    other = DataConfig(**{**cfg.__dict__, "teacher_models": {"vision": str(tmp_path / "clip2")}})
    (cache2,) = sources.open_teachers(other, MLLMConfig(), src)
    assert cache2.path != cache.path and cache2.path.parent == cache.path.parent

    with pytest.raises(ConfigError, match="needs data.teacher_models.vision"):
        sources.make_teacher("vision", DataConfig(teachers=("vision",)), MLLMConfig())
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=32)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ConfigError, match="holds a Decoder, not a vision tower"):
        sources.make_teacher("vision", DataConfig(teacher_models={"vision": str(tmp_path / "llama")}), MLLMConfig())
