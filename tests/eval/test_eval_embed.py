"""Embeddings and similarities: the retrieval plumbing against an oracle no model learned
(scene-graph features: R@1 = 1) and a random embedder (chance); the Embedder against the
model called directly on one unpadded sample; sequence_similarity against tslearn's GAK."""
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from mllm_jax.config import ConfigError, EmbedConfig
from mllm_jax.data.pipeline import ImageSpec
from mllm_jax.data.synthetic_sets import hard_negative_set, interleaved_retrieval_set, retrieval_set
from mllm_jax.data.tokenize import encode_sample
from mllm_jax.eval.embed import Embedder, Embeddings, SceneGraphOracle, sequence_similarity
from mllm_jax.eval.encode import BatchEncoder
from mllm_jax.eval.retrieval import caption_relevance, hard_negative_accuracy, image_text_retrieval, recall_at_k
from mllm_jax.models.mllm import slice_embeddings
from tests.eval.common import DATA_CFG, MODEL_CFG


def _align_available() -> bool:
    try:
        from mllm_jax.align import gak_pairwise, softdtw_pairwise  # noqa: F401
        return True
    except ImportError:
        return False


class RandomEmbedder:
    cfg = EmbedConfig(method="mean")

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def encode(self, samples):
        v = self.rng.standard_normal((len(samples), 16))
        return Embeddings(vectors=v / np.linalg.norm(v, axis=1, keepdims=True))

    def similarity(self, a, b):
        return a.vectors @ b.vectors.T


@pytest.mark.parametrize("long", [False, True])
def test_scene_graph_oracle_retrieves_perfectly(world, long):
    images, texts = retrieval_set(world, "test", 120, long=long)
    rel = caption_relevance(images, texts)
    assert rel.diagonal().all()
    if not long:
        assert rel.sum() > len(images)          # some scenes share their objects, hence their caption
    out = image_text_retrieval(SceneGraphOracle(), images, texts, relevant=rel)
    assert out == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}


def test_scene_graph_oracle_rejects_every_hard_negative(world):
    acc = hard_negative_accuracy(SceneGraphOracle(), hard_negative_set(world, "test", 20))
    assert acc["overall"] == 1.0 and len(acc) == 7            # overall + the six SugarCrepe categories


def test_random_embedder_is_at_chance(world):
    images, texts = retrieval_set(world, "test", 150)
    rel = caption_relevance(images, texts)
    chance1 = float((rel.sum(1) / rel.shape[1]).mean())       # P(top-1 of random scores is relevant)
    r1 = np.mean([image_text_retrieval(RandomEmbedder(s), images, texts, relevant=rel)["i2t_r1"] for s in range(20)])
    assert abs(r1 - chance1) < 4 * np.sqrt(chance1 / (20 * len(images))) + 1e-3
    q, c, t = interleaved_retrieval_set(world, "test", 100)
    r5 = []
    for seed in range(20):
        e = RandomEmbedder(seed)
        r5.append(recall_at_k(e.similarity(e.encode(q), e.encode(c)), t, ks=(5,))[5])
    r5 = np.mean(r5)
    assert abs(r5 - 0.05) < 4 * np.sqrt(0.05 * 0.95 / 2000)


def test_sequence_similarity_pooled_cosine_by_hand():
    a = np.array([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 4.0], [9.0, 9.0]]])       # second row: one valid slice
    ma = np.array([[True, True], [True, False]])
    b = np.array([[[1.0, 1.0]], [[1.0, 0.0]]])
    mb = np.ones((2, 1), bool)
    got = sequence_similarity(a, ma, b, mb, EmbedConfig(alignment="none"))
    s2 = 1 / np.sqrt(2)
    np.testing.assert_allclose(got, [[1.0, s2], [7 / 5 * s2, 3 / 5]], atol=1e-6)
    with pytest.raises(ValueError, match="no valid slice"):
        sequence_similarity(a, np.zeros((2, 2), bool), b, mb, EmbedConfig(alignment="none"))


@pytest.mark.skipif(_align_available(), reason="mllm_jax.align is merged")
def test_alignment_without_align_ops_says_what_is_missing():
    x, m = np.ones((2, 3, 4), np.float32), np.ones((2, 3), bool)
    for alignment in ("gak", "softdtw"):
        with pytest.raises(NotImplementedError, match=f"mllm_jax.align.{alignment}_pairwise"):
            sequence_similarity(x, m, x, m, EmbedConfig(alignment=alignment))


@pytest.mark.skipif(not _align_available(), reason="mllm_jax.align is not merged yet")
def test_gak_similarity_equals_tslearn():
    from tslearn.metrics import cdist_gak
    rng = np.random.default_rng(0)
    xl, yl = [3, 1, 4, 2, 4], [2, 4, 1]
    x = rng.normal(size=(5, 4, 3)).astype(np.float32) * 0.5
    y = rng.normal(size=(3, 4, 3)).astype(np.float32) * 0.5
    mx = np.arange(4)[None] < np.array(xl)[:, None]
    my = np.arange(4)[None] < np.array(yl)[:, None]
    got = sequence_similarity(x, mx, y, my, EmbedConfig(alignment="gak", sigma=0.8))
    want = cdist_gak([xi[:n] for xi, n in zip(x, xl)], [yi[:n] for yi, n in zip(y, yl)], sigma=0.8)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_embed_config_validation():
    with pytest.raises(ConfigError, match="embed.method"):
        EmbedConfig(method="cls")
    with pytest.raises(ConfigError, match="embed.alignment"):
        EmbedConfig(alignment="dtw")


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "num_slices"))
def _forward(graphdef, state, ids, mask, kw, method, num_slices):
    model = nnx.merge(graphdef, state)
    if not num_slices:
        return model.embed(ids, mask, method=method, **kw)
    sid, sim = kw.pop("slice_ids"), kw.pop("slice_is_image")
    return slice_embeddings(model(ids, attention_mask=mask, **kw), sid, sim, num_slices)


def _direct(model, tok, view, method=None, slices=False):
    """The model on one unpadded sample, encoded with encode_sample and the image spec directly
    (jitted only to avoid op-by-op compiles; the batch is the sample alone, no padding)."""
    enc = encode_sample(view, tok, MODEL_CFG.tokens_per_image)
    ids, mask = enc.input_ids[None], np.ones((1, len(enc.input_ids)), np.int32)
    kw = {}
    if enc.images:
        spec = ImageSpec.from_vision(MODEL_CFG.vision)
        kw = dict(pixel_values=np.stack([spec(im) for im in enc.images])[None],
                  image_mask=np.ones((1, len(enc.images)), bool))
    graphdef, state = nnx.split(model)
    if not slices:
        return np.asarray(_forward(graphdef, state, ids, mask, kw, method, 0))[0]
    kw.update(slice_ids=enc.slice_ids[None], slice_is_image=enc.slice_is_image[None])
    e = np.asarray(_forward(graphdef, state, ids, mask, kw, None, len(enc.slice_is_image)))[0]
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


@pytest.mark.parametrize("method", ["prompt", "mean"])
def test_embedder_equals_the_model_on_one_unpadded_sample(model, tok, world, method):
    images, texts = retrieval_set(world, "test", 1)
    queries, _, _ = interleaved_retrieval_set(world, "test", 1)
    samples = texts + images + queries            # three buckets (0, 1, 2+ images), padded, filler rows
    emb = Embedder(model, BatchEncoder(tok, MODEL_CFG, DATA_CFG), EmbedConfig(method=method))
    got = emb.encode(samples)
    assert got.vectors.shape == (len(samples), MODEL_CFG.decoder.hidden_size) and got.slices is None
    for i, s in enumerate(samples):
        np.testing.assert_allclose(got.vectors[i], _direct(model, tok, emb.view(s), method), atol=2e-5,
                                   err_msg=f"sample {s.id}")
    np.testing.assert_allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-5)


def test_embedder_slices_for_alignment(model, tok, world):
    queries, cands, _ = interleaved_retrieval_set(world, "test", 2)
    samples = queries + cands
    emb = Embedder(model, BatchEncoder(tok, MODEL_CFG, DATA_CFG), EmbedConfig(alignment="gak"))
    got = emb.encode(samples)
    n_seg = [len(s.segments) for s in samples]
    assert got.vectors is None and got.slices.shape[1] == max(n_seg)
    assert got.slice_mask.sum(1).tolist() == n_seg
    for i, s in enumerate(samples):
        np.testing.assert_allclose(got.slices[i, :n_seg[i]], _direct(model, tok, emb.view(s), slices=True),
                                   atol=2e-5, err_msg=f"sample {s.id}")
    if _align_available():
        sim = emb.similarity(got, got)
        assert sim.shape == (4, 4) and np.allclose(np.diagonal(sim), 1.0, atol=1e-4)
    else:
        with pytest.raises(NotImplementedError):
            emb.similarity(got, got)
