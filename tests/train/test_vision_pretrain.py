"""Stage 0 (mllm_jax/train/vision_pretrain.py): the tower learns scene-graph labels from pixels,
and the written checkpoint is the whole MLLM: that tower, everything else as a fresh init."""
import jax
import numpy as np
import pytest
from flax import nnx

from mllm_jax.config import ExperimentConfig, load_config
from mllm_jax.convert.hf import flat_params
from mllm_jax.data.pipeline import ImageSpec
from mllm_jax.data.synthetic import SceneWorld
from mllm_jax.models.mllm import MLLM
from mllm_jax.train.checkpoint import Checkpointer
from mllm_jax.train.vision_pretrain import constant_bce, label_batch, pretrain_vision, write_init
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TINY = ROOT / "experiments/configs/tiny.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY, ExperimentConfig)


def test_constant_bce_by_hand():
    y = np.array([[1.0, 0.0], [0.0, 0.0]])
    p = np.array([0.5, 0.25])
    want = -(np.log(0.5) + np.log(0.5) + np.log(0.75) + np.log(0.75)) / 4
    assert constant_bce(y, p) == pytest.approx(want)


def test_labels_are_the_scene_graph_facts(cfg):
    world = SceneWorld(cfg.data.scene)
    x, y = label_batch(world, ImageSpec.from_vision(cfg.model.vision), "train", [0, 1])
    assert x.shape == (2, 32, 32, 3) and y.shape[0] == 2
    for row, i in zip(y, [0, 1]):
        scene = world.scene("train", i)
        assert row[:40].sum() == len({o.kind for o in scene.objects})      # the kinds block comes first
        assert all(row[o.kind] == 1 for o in scene.objects)


def test_pretraining_beats_the_image_blind_predictor_and_the_checkpoint_is_the_mllm(cfg, tmp_path):
    probe, m = pretrain_vision(cfg, steps=120, batch_size=16, eval_size=128)
    # what pixels add: below the best constant (per-label frequency) cross-entropy
    assert m["bce"] < 0.9 * m["bce_prior"], m
    write_init(cfg, probe.vision, tmp_path / "init")
    fresh = flat_params(MLLM(cfg.model, rngs=nnx.Rngs(cfg.train.seed)))
    tower = flat_params(probe.vision)

    def target(meta):
        assert set(meta) == set(fresh)
        return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in meta.items()}
    saved, _, step = Checkpointer(tmp_path / "init", read_only=True).restore_params(target)
    assert step == 0
    for k, v in saved.items():
        want = tower[k.removeprefix("vision.")] if k.startswith("vision.") else fresh[k]
        np.testing.assert_array_equal(np.asarray(v), np.asarray(want), err_msg=k)
    assert not np.array_equal(np.asarray(saved["vision.embeddings.patch_embedding.kernel"]),
                              np.asarray(fresh["vision.embeddings.patch_embedding.kernel"]))
