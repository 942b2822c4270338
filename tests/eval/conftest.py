"""Shared fixtures for the evaluation tests: the scene-world tokenizer and a tiny random MLLM."""
import pytest
from flax import nnx

from mllm_jax.config import SceneConfig
from mllm_jax.data.synthetic import SceneWorld
from mllm_jax.data.synthetic_sets import scene_corpus
from mllm_jax.data.tokenize import train_tokenizer
from mllm_jax.models.mllm import MLLM
from tests.eval.common import DATA_CFG, MODEL_CFG


@pytest.fixture(scope="session")
def tok():
    return train_tokenizer(scene_corpus(SceneConfig(), 300), vocab_size=512)


@pytest.fixture(scope="session")
def model():
    return MLLM(MODEL_CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def world():
    return SceneWorld(DATA_CFG.scene)
