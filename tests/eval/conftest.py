"""Shared fixtures for the evaluation tests: the scene-world tokenizer and a tiny random MLLM."""
import pytest
from flax import nnx

from mllm_jax.config import DataConfig, DecoderConfig, MLLMConfig, ProjectorConfig, SceneConfig, VisionConfig
from mllm_jax.data.synthetic import SceneWorld
from mllm_jax.data.synthetic_sets import scene_corpus
from mllm_jax.data.tokenize import train_tokenizer
from mllm_jax.models.mllm import MLLM

MODEL_CFG = MLLMConfig(
    vision=VisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_heads=2),
    projector=ProjectorConfig(kind="pool", pool_size=2),                       # 4 tokens per image
    decoder=DecoderConfig(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2))
DATA_CFG = DataConfig(seq_buckets=(32, 64, 128), batch_size=8)


@pytest.fixture(scope="session")
def tok():
    return train_tokenizer(scene_corpus(SceneConfig(), 300), vocab_size=512)


@pytest.fixture(scope="session")
def model():
    return MLLM(MODEL_CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def world():
    return SceneWorld(DATA_CFG.scene)
