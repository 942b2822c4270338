"""Sugar's structure loss: hand-computed cases, target properties, gradients reach only LoRA."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.config import DecoderConfig, LoRAConfig, MLLMConfig, StructureConfig, VisionConfig
from mllm_jax.models.lora import LoRAParam
from mllm_jax.models.mllm import MLLM
from mllm_jax.objectives.recipes import forward
from mllm_jax.objectives.structure import model_similarity, structure_loss, target_similarity


def _k(d2, sigma):
    """tslearn's GAK local kernel between two points at squared distance d2."""
    z = d2 / (2 * sigma ** 2)
    return math.exp(-(z + math.log(2 - math.exp(-z))))


def _single_slice_batch(shared, image=None, text=None, is_image=(True, False, False)):
    b = len(shared)
    out = {"slice_mask": jnp.ones((b, 1), bool), "slice_is_image": jnp.asarray(is_image)[:, None],
           "teacher_scene_graph": jnp.asarray(shared, jnp.float32)[:, None]}
    if image is not None:
        out["teacher_pixel"] = jnp.asarray(image, jnp.float32)[:, None]
    if text is not None:
        out["teacher_minilm"] = jnp.asarray(text, jnp.float32)[:, None]
    return out


def test_single_slice_target_is_the_modality_switched_local_kernel():
    """One slice per sample: the normalised GAK is the local kernel itself (k(x, x) = 1)."""
    sigma = 0.7
    shared = [[1, 0], [0, 1], [1, 1]]           # unit-normalised inside: e1, e2, (e1+e2)/sqrt2
    image = [[1, 0], [5, 5], [5, 5]]            # only row 0 is an image: image-image pairs do not occur
    text = [[9, 9], [1, 0], [0, 1]]             # rows 1, 2 are text: their pair uses these (orthogonal)
    b = _single_slice_batch(shared, image, text)
    t = np.asarray(target_similarity(b, StructureConfig(target_sigma=sigma)))
    # (0, 1), (0, 2): image-text -> shared space; (1, 2): text-text -> text features
    np.testing.assert_allclose(t[0, 1], _k(2.0, sigma), rtol=1e-5)                   # e1 vs e2
    np.testing.assert_allclose(t[0, 2], _k(2 - math.sqrt(2), sigma), rtol=1e-5)      # e1 vs (e1+e2)/sqrt2
    np.testing.assert_allclose(t[1, 2], _k(2.0, sigma), rtol=1e-5)                   # text e1 vs e2
    np.testing.assert_allclose(np.diag(t), 1.0, rtol=1e-6)
    np.testing.assert_allclose(t, t.T, rtol=1e-6)


def test_a_list_of_teachers_concatenates_their_unit_features():
    """image_teacher=[pixel, vision] (the paper's DINOv2 + CLIP image features): the local
    kernel's squared distance between two images is the mean of the two teachers' (each
    L2-normalised first, whatever its scale)."""
    sigma = 0.8
    b = _single_slice_batch([[1, 0], [0, 1], [1, 1]], image=[[3, 0], [0, 2], [1, 1]], is_image=(True, True, False))
    b["teacher_vision"] = jnp.asarray([[1, 0, 0], [1, 1, 0], [0, 0, 1]], jnp.float32)[:, None]
    cfg = StructureConfig(target_sigma=sigma, image_teacher=["pixel", "vision"])
    assert cfg.image_teacher == ("pixel", "vision")
    t = np.asarray(target_similarity(b, cfg))
    d2_pixel, d2_vision = 2.0, 2 - math.sqrt(2)          # e1 vs e2; e1 vs (e1+e2)/sqrt2
    np.testing.assert_allclose(t[0, 1], _k((d2_pixel + d2_vision) / 2, sigma), rtol=1e-5)
    single = np.asarray(target_similarity(b, StructureConfig(target_sigma=sigma, image_teacher="pixel")))
    np.testing.assert_allclose(single[0, 1], _k(d2_pixel, sigma), rtol=1e-5)
    np.testing.assert_allclose(t[:, 2], single[:, 2], rtol=1e-6)     # image-text pairs: the shared space
    with pytest.raises(KeyError, match=r"image_teacher=\['pixel', 'clip'\].*teacher_clip"):
        target_similarity(b, StructureConfig(image_teacher=("pixel", "clip")))


def test_teacher_lists_in_the_config():
    from mllm_jax.config import ConfigError, ExperimentConfig, apply_overrides
    cfg = apply_overrides(ExperimentConfig(), ["objective.structure.text_teacher=[minilm, clip]"])
    assert cfg.objective.structure.text_teacher == ("minilm", "clip")
    for bad in ([], ["pixel", "pixel"], ["pixel", ""]):
        with pytest.raises(ConfigError, match="objective.structure.image_teacher"):
            StructureConfig(image_teacher=bad)


def test_a_missing_single_teacher_falls_back_to_the_shared_one_and_says_so(caplog):
    b = _single_slice_batch([[1, 0], [0, 1], [1, 1]], is_image=(True, True, False))
    with caplog.at_level("WARNING", logger="mllm_jax.objectives"):
        t = np.asarray(target_similarity(b, StructureConfig(image_teacher="dino_not_loaded")))
    assert "image_teacher='dino_not_loaded' is not in the batch" in caplog.text
    np.testing.assert_allclose(t[0, 1], _k(2.0, 1.0), rtol=1e-5)       # e1 vs e2 in the shared space


def test_structure_loss_hand_computed():
    sigma = 1.0
    emb = jnp.asarray([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]])        # samples 0 and 2 identical
    b = _single_slice_batch([[1, 0], [1, 0], [0, 1]])                      # shared-only teachers
    loss, parts = structure_loss(emb, b, StructureConfig(sigma=sigma, target_sigma=sigma))
    k_orth = _k(2.0, sigma)
    s_model = np.array([[1, k_orth, 1], [k_orth, 1, k_orth], [1, k_orth, 1]])
    s_target = np.array([[1, 1, k_orth], [1, 1, k_orth], [k_orth, k_orth, 1]])
    off = ~np.eye(3, dtype=bool)
    assert float(loss) == pytest.approx(float(np.mean((s_model - s_target)[off] ** 2)), rel=1e-5)
    assert -1.0 <= float(parts["structure_corr"]) <= 1.0


def test_padding_rows_do_not_count():
    emb = jax.random.normal(jax.random.key(0), (3, 2, 4))
    b = _single_slice_batch([[1, 0], [0, 1], [1, 1]])
    b = {k: jnp.concatenate([v, v[:, :1] * 0], axis=1) for k, v in b.items()}   # S = 2, second slice padding
    loss = jax.jit(lambda e, b: structure_loss(e, b, StructureConfig()))   # one compile, not op by op
    loss3, parts3 = loss(emb, b)
    b4 = {k: jnp.concatenate([v, jnp.zeros_like(v[:1])], 0) for k, v in b.items()}  # + a row with no slice
    emb4 = jnp.concatenate([emb, 100 * jnp.ones_like(emb[:1])], 0)
    loss4, parts4 = loss(emb4, b4)
    np.testing.assert_allclose(float(loss4), float(loss3), rtol=1e-6)
    assert float(parts3["structure_pairs"]) == float(parts4["structure_pairs"]) == 6      # i != j of 3 rows
    assert np.isfinite(float(jax.jit(jax.grad(lambda e: loss(e, b4)[0]))(emb4).sum()))


@pytest.mark.parametrize("alignment", ["gak", "softdtw", "pooled"])
def test_model_similarity_is_symmetric_with_unit_diagonal(alignment):
    emb = jax.random.normal(jax.random.key(1), (4, 3, 8))
    mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]], bool)
    s = np.asarray(model_similarity(emb, mask, StructureConfig(alignment=alignment)))
    np.testing.assert_allclose(s, s.T, atol=1e-5)
    np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-5)


def test_multi_slice_target_symmetric_unit_diagonal():
    rng = np.random.default_rng(0)
    b = {"slice_mask": jnp.asarray([[1, 1, 1], [1, 1, 0], [1, 0, 0]], bool),
         "slice_is_image": jnp.asarray([[0, 1, 0], [1, 0, 0], [0, 0, 0]], bool)}
    for name, d in (("scene_graph", 6), ("pixel", 5), ("minilm", 4)):
        b[f"teacher_{name}"] = jnp.asarray(np.abs(rng.normal(size=(3, 3, d))), jnp.float32)
    t = np.asarray(target_similarity(b, StructureConfig()))
    np.testing.assert_allclose(t, t.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(t), 1.0, atol=1e-6)
    assert ((t >= 0) & (t <= 1 + 1e-6)).all()
    with pytest.raises(KeyError, match="teacher_scene_graph"):
        target_similarity({k: v for k, v in b.items() if k != "teacher_scene_graph"}, StructureConfig())


def test_structure_gradient_reaches_lora_and_only_it_when_base_is_frozen():
    cfg = MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                         num_layers=1, num_heads=2),
                     decoder=DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                                           num_heads=2, num_kv_heads=1),
                     vision_feature_layer=-1, lora=LoRAConfig(rank=2, target=r"decoder\..*(q_proj|v_proj)$"))
    model = MLLM(cfg, rngs=nnx.Rngs(0))
    for layer in model.decoder.layers:
        for m in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            m.lora.b[...] = 0.1 * jnp.ones_like(m.lora.b[...])   # b = 0 would zero a's gradient
    k = cfg.tokens_per_image
    ids = np.full((3, 4 + k), 9, np.int32)
    ids[0, 1:1 + k] = cfg.image_token_id
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(jnp.asarray(ids)),
             "pixel_values": jax.random.normal(jax.random.key(2), (3, 1, 16, 16, 3)),
             "image_mask": jnp.asarray([[True], [False], [False]]),
             "slice_ids": jnp.asarray(np.r_[[[0] + [1] * k + [2, 2, 0]], [[1, 1, 2, 2] + [0] * k], [[1] * 4 + [0] * k]]),
             "slice_is_image": jnp.asarray([[1, 0], [0, 0], [0, 0]], bool),
             "slice_mask": jnp.asarray([[1, 1], [1, 1], [1, 0]], bool),
             "teacher_scene_graph": jax.random.uniform(jax.random.key(3), (3, 2, 5))}
    from mllm_jax.models.mllm import slice_embeddings

    def loss(lora_params, rest):
        m = nnx.merge(graphdef, lora_params, rest)
        out = forward(m, batch, logits=False)
        e = slice_embeddings(out, batch["slice_ids"], batch["slice_is_image"], 2)
        return structure_loss(e, batch, StructureConfig())[0]

    graphdef, lora_params, rest = nnx.split(model, LoRAParam, ...)
    g = jax.jit(jax.grad(loss))(lora_params, rest)
    norms = {jax.tree_util.keystr(p): float(jnp.abs(x).sum()) for p, x in jax.tree_util.tree_leaves_with_path(g)}
    assert norms and all(v > 0 for v in norms.values()), norms     # every LoRA factor gets gradient
    # with the base frozen (differentiating w.r.t. the LoRA factors only), nothing else is touched:
    # the train loop's freeze masks (tests/train) keep frozen params bit-identical
