"""The eval encoder feeds the model exactly what the training pipeline feeds it, in fixed
bucketed shapes; the embedding views are the training tasks' renderings."""
import dataclasses

import numpy as np
import pytest

from mllm_jax.config import SceneConfig
from mllm_jax.data import pipeline as P
from mllm_jax.data.schema import Sample, image_segment, text_segment
from mllm_jax.data.synthetic_sets import (SceneSource, interleaved_retrieval_set, retrieval_set, vqa_set)
from mllm_jax.data.tokenize import encode_sample
from mllm_jax.eval.encode import BatchEncoder, document_view, image_buckets, length_buckets, prompt_view

from tests.eval.common import DATA_CFG, MODEL_CFG

ROW_KEYS = ("input_ids", "attention_mask", "labels", "loss_mask", "positions", "slice_ids")


def _samples(world):
    images, texts = retrieval_set(world, "test", 5)
    queries, cands, _ = interleaved_retrieval_set(world, "test", 5)
    return vqa_set(world, "test", 7) + images + texts + queries + cands


def _training_rows(tok, samples, for_generation):
    """Each sample's row as the training pipeline (make_iterator) pads it, keyed by sample index."""
    cfg = dataclasses.replace(DATA_CFG, batch_size=4, shuffle=False, num_epochs=1, drop_remainder=False)
    rows = {}
    for b in P.make_iterator(cfg, MODEL_CFG, source=samples, tokenizer=tok, teachers=[], shard=(0, 1),
                             for_generation=for_generation):
        for r, i in enumerate(b["sample_index"]):
            if i >= 0:
                rows[int(i)] = {k: v[r] for k, v in b.items()}
    return rows


@pytest.mark.parametrize("for_generation", [False, True])
def test_same_tokens_and_pixels_as_the_training_pipeline(tok, world, for_generation):
    samples = _samples(world)
    ref = _training_rows(tok, samples, for_generation)
    assert sorted(ref) == list(range(len(samples)))
    enc = BatchEncoder(tok, MODEL_CFG, DATA_CFG, batch_size=4)
    seen = []
    for rows, batch in enc.batches(samples, for_generation=for_generation):
        for r, i in enumerate(rows):
            want = ref[int(i)]
            L = int(want["attention_mask"].sum())
            for k in ROW_KEYS:
                np.testing.assert_array_equal(batch[k][r, :L], want[k][:L], err_msg=f"{k} of sample {i}")
                assert not batch["attention_mask"][r, L:].any()
            np.testing.assert_array_equal(batch["slice_is_image"][r], want["slice_is_image"])
            np.testing.assert_array_equal(batch["slice_mask"][r], want["slice_mask"])
            n_img = int(want["image_mask"].sum())
            if n_img:
                assert batch["image_mask"][r].sum() == n_img
                np.testing.assert_array_equal(batch["pixel_values"][r, :n_img], want["pixel_values"][:n_img])
            else:
                assert batch["pixel_values"] is None or not batch["image_mask"][r].any()
            assert batch["sample_index"][r] == i
        seen += rows.tolist()
    assert sorted(seen) == list(range(len(samples)))          # every sample exactly once


def test_batches_have_bucketed_shapes_and_real_filler_rows(tok, world):
    samples = _samples(world)
    enc = BatchEncoder(tok, MODEL_CFG, DATA_CFG, batch_size=4)
    shapes = set()
    for rows, batch in enc.batches(samples):
        B, T = batch["input_ids"].shape
        assert B == 4 and T in enc.limits.seq_buckets and 1 <= len(rows) <= 4
        m = 0 if batch["pixel_values"] is None else batch["pixel_values"].shape[1]
        assert m == 0 or m in image_buckets(DATA_CFG.max_images)
        for r in range(len(rows), B):                       # filler rows repeat row 0: never empty
            np.testing.assert_array_equal(batch["input_ids"][r], batch["input_ids"][0])
            assert batch["attention_mask"][r].any()
        shapes.add((m, T))
    assert len(shapes) <= 3 * len(DATA_CFG.seq_buckets)
    assert image_buckets(4) == (1, 2, 4) and image_buckets(6) == (1, 2, 4, 6) and image_buckets(0) == ()
    assert length_buckets((32, 64, 128), 2048) == (32, 64, 128, 256, 512, 1024, 2048)
    assert length_buckets((48, 96), 200) == (48, 96, 192)


def test_items_longer_than_the_training_buckets_get_a_longer_bucket(tok):
    enc = BatchEncoder(tok, MODEL_CFG, DATA_CFG)
    long = Sample("long", (text_segment(" ".join(["circle"] * 200)),))
    (rows, batch), = enc.batches([long])
    assert batch["input_ids"].shape[1] == 256 > DATA_CFG.seq_buckets[-1]


def test_prompt_view_is_the_vladva_training_rendering(tok):
    src = SceneSource(SceneConfig(), "train", {"vladva": 1}, size=3)
    for i in range(3):
        views = src[i]
        img_seg, cap_seg = views["image"].segments[0], views["text"].segments[0]
        doc_img = Sample("img", (dataclasses.replace(img_seg, role=None),))
        doc_cap = Sample("cap", (dataclasses.replace(cap_seg, role=None),))
        for doc, view in ((doc_img, views["image"]), (doc_cap, views["text"])):
            got = encode_sample(prompt_view(doc), tok, MODEL_CFG.tokens_per_image)
            want = encode_sample(view, tok, MODEL_CFG.tokens_per_image)
            np.testing.assert_array_equal(got.input_ids, want.input_ids)
            np.testing.assert_array_equal(got.slice_ids, want.slice_ids)


def test_views_drop_the_answer(world):
    vqa = vqa_set(world, "test", 1)[0]                   # user [image, question] -> assistant answer
    doc = document_view(vqa)
    assert [s.kind for s in doc.segments] == ["image", "text"] and not doc.is_chat
    pv = prompt_view(vqa)
    assert [s.role for s in pv.segments] == ["user"] * 3 and pv.segments[-1].text.startswith("Summary above image")
    txt = prompt_view(Sample("t", (text_segment("a red circle"),)))
    assert txt.segments[-1].text.startswith("Summary above sentence")


def test_mismatched_image_token_is_an_error(tok):
    with pytest.raises(ValueError, match="image_token_id"):
        BatchEncoder(tok, dataclasses.replace(MODEL_CFG, image_token_id=7), DATA_CFG)


def test_bad_sample_raises_naming_it(tok):
    enc = BatchEncoder(tok, MODEL_CFG, DATA_CFG)
    bad = Sample("scene/test/bad/0", (image_segment(np.zeros((8, 8, 3), np.uint8)), text_segment("  ")))
    with pytest.raises(Exception, match="scene/test/bad/0"):
        list(enc.batches([bad]))
