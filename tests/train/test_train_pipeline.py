"""The project's grain pipeline (``data_pipeline: grain``, the scene world) feeding the loop:
its iterator state goes into the checkpoints and a resumed run sees the batches an
uninterrupted one does."""
import numpy as np
import pytest

from mllm_jax.config import SceneConfig, apply_overrides
from mllm_jax.train.experiment import train
from tests.toy import one_device_mesh, params_np, tiny_experiment


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from mllm_jax.data import tokenize as TK
    from mllm_jax.data.synthetic_sets import scene_corpus
    out = tmp_path_factory.mktemp("tok")
    TK.train_tokenizer(scene_corpus(SceneConfig(), 300), out, vocab_size=512)
    return out


def _cfg(tokenizer_dir, run_dir, steps):
    return tiny_experiment(**{
        "data_pipeline": "grain", "data.tokenizer": str(tokenizer_dir), "data.seq_buckets": [128],
        "data.batch_size": 4, "data.tasks": ["caption_short:1", "vqa:1"], "data.scene": {"train_size": 64},
        "model.decoder.vocab_size": 512, "model.vision.image_size": 16, "model.vision.patch_size": 4,
        "model.projector.kind": "pool", "model.projector.pool_size": 2,
        "train.run_dir": str(run_dir), "train.steps": steps})


def test_grain_pipeline_state_is_checkpointed_and_resumed(tokenizer_dir, tmp_path):
    mesh = one_device_mesh()
    first = train(_cfg(tokenizer_dir, tmp_path / "run", 2), mesh=mesh)
    assert first.status == "completed"
    resumed = train(_cfg(tokenizer_dir, tmp_path / "run", 4), mesh=mesh)   # same run dir, longer
    assert [h["step"] for h in resumed.history] == [3, 4]
    straight = train(_cfg(tokenizer_dir, tmp_path / "straight", 4), mesh=mesh)
    assert [h["loss"] for h in first.history + resumed.history] == [h["loss"] for h in straight.history]
    a, b = params_np(resumed.state), params_np(straight.state)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_eval_data_is_read_once_per_eval(tokenizer_dir, tmp_path):
    """An eval pass of more steps than the val set has batches ended with the set; it went on into
    the set's next epoch and counted those rows twice (train.eval_steps=10, 7 batches here). The
    last, partial batch (26 = 6 x 4 + 2 rows) was dropped (data.drop_remainder, True for
    training): it is padded with empty rows (sample_index -1) instead."""
    from mllm_jax.train.registry import grain_data
    cfg = _cfg(tokenizer_dir, tmp_path, 1)
    cfg = apply_overrides(cfg, ["data.scene.val_size=26", "train.eval_steps=10"])
    assert cfg.data.drop_remainder and cfg.data.batch_size == 4
    rows = [int(i) for _, b in zip(range(cfg.train.eval_steps), grain_data(cfg, split="eval", process_index=0,
                                                                            process_count=1))
            for i in b["sample_index"] if i >= 0]
    assert sorted(rows) == list(range(26))
