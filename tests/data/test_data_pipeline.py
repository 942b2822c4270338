"""The grain pipeline: batch format, determinism, exact resume, shards, bad input, buckets."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from mllm_jax.config import DataConfig, MLLMConfig, ProjectorConfig, SceneConfig, VisionConfig
from mllm_jax.data import pipeline as P
from mllm_jax.data import tokenize as TK
from mllm_jax.data.formats import InterleavedSource, LlavaSource
from mllm_jax.data.schema import DataError, Sample, image_segment, text_segment
from mllm_jax.data.synthetic_sets import SceneSource, scene_corpus
from mllm_jax.data.teachers import OnlineFeatures, PixelTeacher, SceneGraphTeacher

FIX = Path(__file__).parent / "fixtures"
MODEL = MLLMConfig(vision=VisionConfig(image_size=16, patch_size=4),
                   projector=ProjectorConfig(kind="pool", pool_size=2))       # 4 tokens per image
TASKS = ("caption_short:1", "caption_long:1", "vqa:2", "pope:1", "multi_image_qa:1", "rag_qa:1", "pair:1", "story:1")


@pytest.fixture(scope="module")
def tok():
    return TK.train_tokenizer(scene_corpus(SceneConfig(), 300), vocab_size=512)


def scene(size=96, **kw):
    return SceneSource(SceneConfig(), "train", DataConfig(tasks=TASKS).task_weights(), size=size, **kw)


def it(tok, source, teachers=(), shard=(0, 1), **kw):
    cfg = DataConfig(**{"batch_size": 4, "seq_buckets": (48, 96, 160), **kw})
    return P.make_iterator(cfg, MODEL, source=source, tokenizer=tok, teachers=list(teachers), shard=shard)


def digest(batch) -> str:
    h = hashlib.sha256()
    for k in sorted(batch):
        v = batch[k]
        if isinstance(v, dict):
            h.update(digest(v).encode())
        else:
            h.update(k.encode() + str(v.dtype).encode() + str(v.shape).encode() + np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


def test_batch_format_padding_and_masks(tok):
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    samples = [
        Sample("chat", (image_segment(img, "user"), text_segment("What color is it?", "user"),
                        text_segment("red", "assistant"))),
        Sample("doc", (text_segment("a red circle"), image_segment(img), text_segment("then a blue square"))),
        Sample("long", (text_segment(" ".join(["circle"] * 60)),)),
    ]
    teach = [OnlineFeatures(SceneGraphTeacher()), OnlineFeatures(PixelTeacher())]
    b = next(it(tok, samples, teach, shuffle=False, drop_remainder=False, num_epochs=1))
    B, T = 4, 96                                              # 60+ tokens -> the 96 bucket
    assert b["input_ids"].shape == (B, T) and b["pixel_values"].shape == (B, 4, 16, 16, 3)
    assert {k: (v.dtype.name, v.shape) for k, v in b.items() if k.startswith("teacher")} == {
        "teacher_scene_graph": ("float32", (B, 16, 428)), "teacher_pixel": ("float32", (B, 16, 128))}
    dtypes = {k: v.dtype.name for k, v in b.items()}
    assert dtypes["input_ids"] == dtypes["labels"] == dtypes["loss_mask"] == dtypes["slice_ids"] == "int32"
    assert dtypes["image_mask"] == dtypes["slice_mask"] == dtypes["slice_is_image"] == "bool"
    assert b["sample_index"].tolist() == [0, 1, 2, -1]                  # last row is padding
    for r, s in enumerate(samples):
        enc = TK.encode_sample(s, tok, MODEL.tokens_per_image)
        L = len(enc.input_ids)
        np.testing.assert_array_equal(b["input_ids"][r, :L], enc.input_ids)
        assert (b["input_ids"][r, L:] == tok.pad_id).all() and b["attention_mask"][r].sum() == L
        assert (b["attention_mask"][r, :L] == 1).all()
        np.testing.assert_array_equal(b["labels"][r, :L - 1], enc.input_ids[1:])
        np.testing.assert_array_equal(b["loss_mask"][r, :L - 1], enc.target[1:])
        assert not b["loss_mask"][r, L - 1:].any()
        np.testing.assert_array_equal(b["positions"][r], np.maximum(np.cumsum(b["attention_mask"][r]) - 1, 0))
        assert b["slice_mask"][r].sum() == len(s.segments)
        assert b["slice_is_image"][r, :len(s.segments)].tolist() == [g.kind == "image" for g in s.segments]
    assert tok.decode(b["labels"][0][b["loss_mask"][0] == 1]) == "red<|im_end|>"
    assert b["image_mask"].sum(1).tolist() == [1, 1, 0, 0]
    # the 2x3 image, resized to 16x16 and normalised with the vision config's mean/std
    from PIL import Image
    want = np.asarray(Image.fromarray(img).resize((16, 16), Image.BILINEAR)) / 255.0
    want = (want - np.array(MODEL.vision.image_mean)) / np.array(MODEL.vision.image_std)
    np.testing.assert_allclose(b["pixel_values"][0, 0], want, atol=1e-5)
    assert not b["pixel_values"][0, 1:].any() and not b["pixel_values"][3].any()
    # the pixel teacher applies to image slices only; scene graphs are absent here (zero rows)
    assert b["teacher_pixel"][1, 1].any() and not b["teacher_pixel"][1, [0, 2]].any()
    assert not b["teacher_scene_graph"].any()


def test_same_seed_same_bytes(tok):
    teach = [OnlineFeatures(SceneGraphTeacher())]
    a = [digest(x) for _, x in zip(range(12), it(tok, scene(), teach, seed=5))]
    b = [digest(x) for _, x in zip(range(12), it(tok, scene(), teach, seed=5))]
    c = [digest(x) for _, x in zip(range(12), it(tok, scene(), teach, seed=6))]
    assert a == b and a != c


def test_exact_resume_mid_epoch_and_across_epochs(tok):
    """Restore the state saved after 7 batches (JSON round trip) -> the next 50 batches equal
    those of the uninterrupted iterator (96 samples / 4 = 24 batches per epoch: 2+ epochs)."""
    teach = [OnlineFeatures(SceneGraphTeacher())]
    ref = it(tok, scene(), teach)
    for _ in range(7):
        next(ref)
    state = json.loads(json.dumps(ref.get_state()))
    want = [digest(next(ref)) for _ in range(50)]
    assert ref.epoch >= 2 and len(ref.summaries) >= 2
    resumed = it(tok, scene(), teach)
    resumed.set_state(state)
    assert [digest(next(resumed)) for _ in range(50)] == want


def test_a_state_saved_for_other_data_is_refused(tok):
    """The saved position is a position in one order (records, batch size, seed, shuffle,
    drop_remainder): resuming it under another silently read another sequence of batches. Now a
    ValueError naming what changed and the way out; other epochs (num_epochs) resume."""
    state = json.loads(json.dumps((lambda r: (next(r), r.get_state())[1])(it(tok, scene()))))
    for kw, changed in (({"batch_size": 2}, "batch_size 4 -> 2"), ({"seed": 9}, "seed 0 -> 9"),
                        ({"shuffle": False}, "shuffle True -> False")):
        with pytest.raises(ValueError, match=rf"saved for other data \({changed}\).*restore_data=false"):
            it(tok, scene(), **kw).set_state(state)
    with pytest.raises(ValueError, match=r"records 96 -> 48"):
        it(tok, scene(48)).set_state(state)
    it(tok, scene(), num_epochs=5).set_state(state)


def test_resume_with_worker_processes(tok):
    """Worker processes give the batches of in-process reading (pairs of views stay together),
    resume exactly, and a state saved under another worker count is refused by name."""
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    plain = it(tok, scene(48), worker_count=0)
    inproc = [digest(next(plain)) for _ in range(8)]
    ref = it(tok, scene(48), worker_count=2)
    first = [digest(next(ref)) for _ in range(2)]
    state = json.loads(json.dumps(ref.get_state()))
    want = [digest(next(ref)) for _ in range(6)]                     # crosses the epoch boundary
    ref.close()
    assert first + want == inproc
    resumed = it(tok, scene(48), worker_count=2)
    resumed.set_state(state)
    got = [digest(next(resumed)) for _ in range(6)]
    resumed.close()
    assert got == want
    with pytest.raises(ValueError, match="worker_count=2.*resume with data.worker_count=2"):
        plain.set_state(state)


class _Holes:
    """Scene samples with an empty (skipped) text at a few indices; picklable for workers."""
    HOLES = (3, 10, 21, 22)

    def __init__(self, size):
        self.src = scene(size)

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return Sample(f"hole{i}", (text_segment("   "),)) if i in self.HOLES else self.src[i]


def test_worker_batches_and_resume_with_skipped_samples(tok):
    """Skipped samples shift batch ends into the middle of a worker's run of examples: batches
    still equal in-process reading, and a state saved there resumes exactly."""
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    plain = it(tok, _Holes(40), worker_count=0, shuffle=False, max_skip_fraction=0.2)
    want = [digest(next(plain)) for _ in range(10)]
    ref = it(tok, _Holes(40), worker_count=2, shuffle=False, max_skip_fraction=0.2)
    got = [digest(next(ref)) for _ in range(3)]
    state = json.loads(json.dumps(ref.get_state()))
    assert state["grain"]["pos"] not in (0, 4)                      # saved inside a run of 4
    got += [digest(next(ref)) for _ in range(7)]
    ref.close()
    assert got == want
    resumed = it(tok, _Holes(40), worker_count=2, shuffle=False, max_skip_fraction=0.2)
    resumed.set_state(state)
    assert [digest(next(resumed)) for _ in range(7)] == want[3:]
    resumed.close()


def test_process_shards_disjoint_and_covering(tok):
    def indices(i, count, drop, epoch=0):
        x = it(tok, scene(50), shard=(i, count), drop_remainder=drop, num_epochs=epoch + 1)
        out = []
        for b in x:
            if x.epoch == epoch:
                out += [int(s) for s in b["sample_index"] if s >= 0]
        return out
    shards = [indices(i, 3, drop=False) for i in range(3)]
    flat = sum(shards, [])
    assert sorted(flat) == list(range(50))                                 # disjoint and covering
    even = [indices(i, 3, drop=True) for i in range(3)]
    assert all(len(s) == 16 for s in even) and len(set(sum(even, []))) == 48  # equal steps per process
    assert set(indices(0, 3, drop=False, epoch=1)) != set(shards[0])        # reshuffled across epochs


class Bad:
    """A source mixing good scene samples with one record per bad-input case."""

    def __init__(self, good: int):
        self.good = scene(good)
        img = FIX / "images"
        ok = np.zeros((4, 4, 3), np.uint8)
        self.bad = [
            lambda: Sample("corrupt", (image_segment(img / "corrupt.png"), text_segment("x"))),
            lambda: Sample("missing", (image_segment(img / "absent.png"), text_segment("x"))),
            lambda: LlavaSource(FIX / "llava.json")[2],                        # 2 <image> slots, 1 image
            lambda: Sample("fewer", (image_segment(ok), text_segment("two <image> tokens <image>"))),
            lambda: InterleavedSource(FIX / "interleaved.jsonl")[6],           # 2 images, 1 slot
            lambda: Sample("empty", (image_segment(ok), text_segment("   "))),
            lambda: Sample("long", (text_segment(" ".join(f"w{i}" for i in range(400))),)),
            lambda: InterleavedSource(FIX / "interleaved.jsonl")[3],           # latin-1 byte
            lambda: Sample("nan", (image_segment(np.full((4, 4, 3), np.nan, np.float32)), text_segment("x"))),
            lambda: Sample("range", (image_segment(np.full((4, 4, 3), 2.0, np.float32)), text_segment("x"))),
            lambda: Sample("images", tuple(image_segment(ok) for _ in range(5))),
        ]
        self.records = ["corrupt", "missing", "llava.json[2]", "fewer", "interleaved.jsonl:7", "empty", "long", "interleaved.jsonl:4",
                        "nan", "range", "images"]
        self.reasons = ["corrupt_image", "missing_image", "image_count_mismatch", "image_count_mismatch",
                        "image_count_mismatch", "empty_text", "too_long", "invalid_utf8", "bad_pixels", "bad_pixels", "too_many_images"]

    def __len__(self):
        return len(self.good) + len(self.bad)

    def __getitem__(self, i):
        return self.good[i] if i < len(self.good) else self.bad[i - len(self.good)]()


def test_bad_input_skipped_and_counted(tok, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="mllm_jax.data")
    src = Bad(38)
    x = it(tok, src, num_epochs=1, max_skip_fraction=0.25, drop_remainder=False)
    batches = list(x)
    kept = {int(s) for b in batches for s in b["sample_index"] if s >= 0}
    assert kept == set(range(38))                                           # every good record, no bad one
    (summary,) = x.summaries
    want = {r: src.reasons.count(r) for r in set(src.reasons)}
    assert summary["by_reason"] == want and summary["skipped"] == 11 and summary["kept"] == 38
    assert any("data epoch 0: 38 records kept, 11 skipped" in r.getMessage() for r in caplog.records)


def test_bad_input_each_case_errors_with_record_name(tok):
    src = Bad(0)
    for k, reason in enumerate(src.reasons):
        one = [src[k]] if k not in (2, 4, 7) else None                      # readers raise at access time
        source = one if one is not None else _Lazy(src.bad[k])
        with pytest.raises(DataError) as e:
            next(it(tok, source, bad_input="error", num_epochs=1, drop_remainder=False))
        assert e.value.reason == reason, (k, str(e.value))
        assert f"record {src.records[k]}" in str(e.value)


def test_data_error_survives_worker_processes():
    """Worker processes send exceptions back pickled: DataError keeps its reason and record."""
    import pickle
    e = pickle.loads(pickle.dumps(DataError("corrupt_image", "rec7", "segments[0].image", "truncated")))
    assert (e.reason, e.record, e.field) == ("corrupt_image", "rec7", "segments[0].image")
    assert str(e) == "[corrupt_image] record rec7, segments[0].image: truncated"


class _Lazy:
    def __init__(self, fn):
        self.fn = fn

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.fn()


def test_too_many_skips_is_an_error(tok):
    with pytest.raises(P.TooManySkipsError, match=r"11 of 23 records skipped.*corrupt_image"):
        list(it(tok, Bad(12), num_epochs=1, max_skip_fraction=0.2))
    x = it(tok, Bad(12), max_skip_fraction=0.2)
    x.check_after = 16                     # checked mid-epoch once enough records were seen
    with pytest.raises(P.TooManySkipsError):
        list(x)
    assert x.summaries == []


def test_few_fixed_shapes(tok):
    shapes = set()
    for _, b in zip(range(60), it(tok, scene(240), batch_size=4)):
        shapes.add(tuple((k, v.shape) for k, v in sorted(b.items())))
    lengths = {dict(s)["input_ids"][1] for s in shapes}
    assert lengths <= {48, 96, 160} and len(shapes) == len(lengths)          # only T varies
    assert len(lengths) >= 2


def test_views_and_generation_prompts(tok):
    views = SceneSource(SceneConfig(), "val", {"vladva": 1}, size=8)
    b = next(it(tok, views, batch_size=4))
    assert set(b) == {"image", "text"}
    np.testing.assert_array_equal(b["image"]["sample_index"], b["text"]["sample_index"])
    assert b["image"]["image_mask"][:, 0].all() and not b["text"]["image_mask"].any()
    last = b["text"]["attention_mask"].sum(1) - 1
    ends = [tok.decode(b["text"]["input_ids"][r, :last[r] + 1]) for r in range(4)]
    assert all(e.endswith("Summary above sentence in one word:<|im_end|>\n<|im_start|>assistant\n") for e in ends)
    vqa = SceneSource(SceneConfig(), "val", {"vqa": 1}, size=4)
    cfg = DataConfig(batch_size=4, shuffle=False, num_epochs=1)
    g = next(P.make_iterator(cfg, MODEL, source=vqa, tokenizer=tok, teachers=[], shard=(0, 1), for_generation=True))
    assert not g["loss_mask"].any()
    text = tok.decode(g["input_ids"][0][g["attention_mask"][0] == 1])
    assert text.endswith("?<|im_end|>\n<|im_start|>assistant\n") and vqa[0].targets[0] not in text.split("?")[-1]


def test_lone_surrogate_text_is_skipped_and_counted(tok, tmp_path):
    """JSON decodes "\\ud800" to a lone surrogate, a str that is not text: the tokenizer raised
    TypeError (TextInputSequence must be str) and the run died on the record. It is now an
    invalid_utf8 DataError naming the sample and segment, skipped and counted."""
    from PIL import Image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    good = '{"texts": ["a red circle", null], "images": ["a.png"]}'
    bad = '{"id": "bad", "texts": ["a \\ud800 circle", null], "images": ["a.png"]}'
    (tmp_path / "docs.jsonl").write_text("\n".join([good, bad, good, good]) + "\n")
    src = InterleavedSource(tmp_path / "docs.jsonl")
    with pytest.raises(DataError) as e:
        next(it(tok, src, bad_input="error", shuffle=False, num_epochs=1, drop_remainder=False))
    assert e.value.reason == "invalid_utf8" and "interleaved:bad, segments[0].text" in str(e.value)
    x = it(tok, src, shuffle=False, num_epochs=1, drop_remainder=False, max_skip_fraction=0.5)
    (b,) = list(x)
    assert b["sample_index"].tolist() == [0, 2, 3, -1]
    assert x.summaries[0]["by_reason"] == {"invalid_utf8": 1} and x.summaries[0]["kept"] == 3


def test_a_tokenizer_larger_than_the_embedding_is_refused(tok):
    """Ids past the embedding's rows looked up NaN rows (jnp.take's fill), so every step's loss
    was NaN and skipped until the NaN guard stopped the run: refused up front, naming both."""
    import dataclasses
    small = dataclasses.replace(MODEL, decoder=dataclasses.replace(MODEL.decoder, vocab_size=len(tok) - 1))
    with pytest.raises(ValueError, match=f"ids go up to {len(tok) - 1} but .*vocab_size={len(tok) - 1} rows"):
        P.make_iterator(DataConfig(batch_size=4, seq_buckets=(48,)), small, source=scene(8), tokenizer=tok)
    P.make_iterator(DataConfig(batch_size=4, seq_buckets=(48,)),
                    dataclasses.replace(MODEL, decoder=dataclasses.replace(MODEL.decoder, vocab_size=len(tok))),
                    source=scene(8), tokenizer=tok, teachers=[])


@pytest.mark.parametrize("tasks", [TASKS, ("vladva:1",)], ids=["samples", "views"])
def test_padding_to_a_longer_bucket_equals_collating_at_it(tok, tasks):
    """Processes of a multi-process run pad their batches to the longest bucket any of them
    picked: the padded batch equals the pipeline's own batch at that bucket, field by field
    (pad ids, masks, positions, slices), for plain batches and for view pairs."""
    src = SceneSource(SceneConfig(), "train", DataConfig(tasks=tasks).task_weights(), size=16)
    buckets = it(tok, src, shuffle=False, num_epochs=1)
    single = it(tok, src, shuffle=False, num_epochs=1, seq_buckets=(160,))
    seen = set()
    for a, b in zip(buckets, single):
        lengths = buckets.seq_lengths(a)
        seen.update(lengths.values())
        assert set(lengths) == ({""} if "input_ids" in a else set(a))
        padded = buckets.pad_seq_lengths(a, {k: 160 for k in lengths})
        assert single.seq_lengths(padded) == single.seq_lengths(b)
        flat = lambda x: {f"{v}.{k}": y for v, d in (x.items() if "input_ids" not in x else [("", x)])  # noqa: E731
                          for k, y in d.items()}
        assert flat(padded).keys() == flat(b).keys()
        for k, y in flat(b).items():
            np.testing.assert_array_equal(flat(padded)[k], y, err_msg=k)
    assert seen - {160}, "no batch had a shorter bucket: the test checked nothing"


@pytest.mark.parametrize("tasks", [TASKS, ("vladva:1",)], ids=["samples", "views"])
def test_blank_batch_is_collate_of_no_examples(tok, tasks):
    """What a process whose eval data ended feeds while others go on: collate's batch of no
    examples at the same bucket (and teacher, image, slice shapes), for batches and view pairs."""
    src = SceneSource(SceneConfig(), "train", DataConfig(tasks=tasks).task_weights(), size=8)
    x = it(tok, src, shuffle=False, num_epochs=1, teachers=[OnlineFeatures(SceneGraphTeacher())])
    b = next(x)
    blank = x.blank_like(b)
    for path, T in x.seq_lengths(b).items():
        got, sub = (blank, b) if path == "" else (blank[path], b[path])
        want = P.collate([], 4, P.Limits((T,), DataConfig().max_images, DataConfig().max_slices),
                         sub["pixel_values"].shape[2:], tok.pad_id, {"scene_graph": sub["teacher_scene_graph"].shape[-1]})
        assert got.keys() == want.keys() == sub.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype, k
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_stream_names_are_unique_and_plain():
    """Two streams of one name: the mixture kept only the last (a stream silently dropped). A name
    with '/' ("a/b" beside "a") made the per-step sequence-length agreement pad stream "a" with
    "a/b"'s lengths. Both are refused, in the config and in MixtureIterator."""
    from mllm_jax.config import ConfigError, ExperimentConfig, apply_updates
    from mllm_jax.data.mixture import MixtureIterator
    with pytest.raises(ConfigError, match=r"streams: names must be unique.*\['gen', 'gen'\]"):
        apply_updates(ExperimentConfig(), {"streams": [{"name": "gen"}, {"name": "gen"}]})
    for bad in ("a/b", "", "disc stream"):
        with pytest.raises(ConfigError, match="streams: name"):
            apply_updates(ExperimentConfig(), {"streams": [{"name": bad}]})
        with pytest.raises(ValueError, match="MixtureIterator: stream names"):
            MixtureIterator({"a": iter([]), bad: iter([])})
    assert [s.name for s in apply_updates(ExperimentConfig(), {"streams": [{"name": "gen"}, {"name": "disc-2"}]}).streams] \
        == ["gen", "disc-2"]


def test_mixture_end_leaves_no_drawn_batch_unused(tok):
    """When a later stream ends, the earlier ones that gave their batch for that step are moved
    back: the state saved at the end, restored with more epochs, continues the long stream at the
    first batch no step trained on (uninterrupted: the batch after the last one trained on)."""
    from mllm_jax.data.mixture import MixtureIterator

    def mix(epochs_short):
        return MixtureIterator({"long": it(tok, scene(40), shuffle=False, num_epochs=None),
                                "short": it(tok, scene(8), shuffle=False, num_epochs=epochs_short)})
    reference = mix(None)
    want = [digest(next(reference)["long"]) for _ in range(4)]       # 'long' batches 0..3
    first = mix(1)
    assert [digest(b["long"]) for b in first] == want[:2]             # short: 8 records = 2 batches
    saved = first.get_state()
    resumed = mix(2)
    resumed.set_state(saved)
    assert [digest(next(resumed)["long"]) for _ in range(2)] == want[2:]  # without the rewind: batches 3, 4


def test_resume_keeps_the_skip_examples_of_the_epoch(tok):
    """The state held the skip counts but not the messages of the records skipped so far: after a
    resume the epoch's summary (and the 'skipped records, e.g. ...' warning, the first messages of
    a TooManySkipsError) had counts but no record names for the skips before the checkpoint."""
    src = [Sample("bad0", (text_segment("  "),))] + [Sample(f"ok{i}", (text_segment("a red circle"),)) for i in range(7)]
    x = it(tok, src, shuffle=False, num_epochs=1, max_skip_fraction=0.5)
    next(x)                                          # the first batch: bad0 skipped, ok0..ok3 kept
    state = json.loads(json.dumps(x.get_state()))
    list(x)
    resumed = it(tok, src, shuffle=False, num_epochs=1, max_skip_fraction=0.5)
    resumed.set_state(state)
    list(resumed)
    (want,), (got,) = x.summaries, resumed.summaries
    assert "bad0" in " ".join(want["examples"])
    assert got == want
