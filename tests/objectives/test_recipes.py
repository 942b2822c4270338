"""Recipes through the real data pipeline and train loop: named parts, and (slow) ~100 steps
lower every loss part of each recipe."""
import dataclasses

import numpy as np
import pytest

from mllm_jax.config import (CheckpointConfig, DataConfig, DecoderConfig, ExperimentConfig, MeshConfig, MLLMConfig,
                             ObjectiveConfig, OptimConfig, SceneConfig, StreamConfig, TrainConfig, VisionConfig)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from mllm_jax.data.synthetic_sets import scene_corpus
    from mllm_jax.data.tokenize import train_tokenizer
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(scene_corpus(SceneConfig(), num_samples=800), d, vocab_size=320)
    return str(d)


def _cfg(recipe, tok, tmp_path, steps):
    model = MLLMConfig(vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_layers=1, num_heads=2),
                       decoder=DecoderConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
                                             num_heads=4, num_kv_heads=2, max_position_embeddings=256),
                       vision_feature_layer=-1, embed_head=recipe == "sugar",
                       contrastive_temperature=0.1 if recipe in ("vladva", "contrastive") else None,
                       num_soft_prompts=2 if recipe == "vladva" else 0)
    d = DataConfig(tokenizer=tok, batch_size=8, seq_buckets=(96,), max_images=4, max_slices=8,
                   scene=SceneConfig(image_size=16, train_size=2000, val_size=64, test_size=64),
                   tasks=("caption_short:1", "vqa:2", "pope:1"))
    streams = {"gen": StreamConfig("gen", d),
               "disc": StreamConfig("disc", dataclasses.replace(d, tasks=("pair:2", "image:1", "caption:1", "story:1"),
                                                                doc_loss=False, teachers=("scene_graph", "pixel"), seed=1)),
               "con": StreamConfig("con", dataclasses.replace(d, tasks=("vladva:1",), max_images=1, seq_buckets=(48,),
                                                              soft_prompts=model.num_soft_prompts, seed=2))}
    names = {"generative": ("gen",), "sugar": ("gen", "disc"), "vladva": ("con", "gen"), "contrastive": ("con",)}[recipe]
    return ExperimentConfig(
        model=model, data=d, streams=tuple(streams[n] for n in names),
        objective=ObjectiveConfig(name=recipe, structure_weight=10.0,
                                  structure=dataclasses.replace(ObjectiveConfig().structure, text_teacher="scene_graph")),
        mesh=MeshConfig(data=-1, fsdp=1, tensor=1),   # the 8 fake devices of tests/conftest.py
        train=TrainConfig(steps=steps, run_dir=str(tmp_path / recipe), log_every=1, tensorboard=False, progress=False,
                          optim=OptimConfig(lr=3e-3, warmup_steps=5), checkpoint=CheckpointConfig(every_steps=0)))


EXPECTED = {"generative": {"ntp"}, "sugar": {"ntp", "structure", "structure_corr"},
            "vladva": {"infonce_a2b", "infonce_b2a", "contrastive_acc", "temperature", "ntp"},
            "contrastive": {"infonce_a2b", "infonce_b2a", "contrastive_acc", "temperature"}}


@pytest.mark.parametrize("recipe", ["sugar", "vladva"])
def test_recipe_parts_on_pipeline_batches(recipe, tokenizer_dir, tmp_path):
    import jax
    from flax import nnx

    from mllm_jax.train import registry
    cfg = _cfg(recipe, tokenizer_dir, tmp_path, 1)
    data = registry.grain_data(cfg, split="train", process_index=0, process_count=1)
    batch = jax.tree.map(np.asarray, next(data))
    model = registry.model_spec("mllm").build(cfg, nnx.Rngs(0))
    loss_fn = registry.build_loss_fn(cfg)
    loss, parts = nnx.jit(lambda m, b: loss_fn(m, b, None))(model, batch)   # one compile, not op by op
    assert EXPECTED[recipe] <= set(parts) and np.isfinite(float(loss))
    # the parts combine with the configured weights
    p = {k: float(v) for k, v in parts.items()}
    w = p["ntp"] + (10.0 * p["structure"] if recipe == "sugar" else 0.5 * (p["infonce_a2b"] + p["infonce_b2a"]))
    assert float(loss) == pytest.approx(w, rel=1e-5)
    with pytest.raises(ValueError, match="has none of its streams"):
        registry.build_loss_fn(cfg)(model, {"other": batch[next(iter(batch))]}, None)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["generative", "sugar", "vladva"])
def test_short_run_lowers_every_loss_part(recipe, tokenizer_dir, tmp_path):
    from mllm_jax.train.experiment import train
    res = train(_cfg(recipe, tokenizer_dir, tmp_path, 100))
    hist = res.history
    for part in EXPECTED[recipe] - {"contrastive_acc", "temperature", "structure_corr"}:
        first = np.mean([h[f"loss/{part}"] for h in hist[:15]])
        last = np.mean([h[f"loss/{part}"] for h in hist[-15:]])
        assert last < first, (recipe, part, first, last)
