"""Names in configs -> code, and the default objective."""
import numpy as np
import pytest

from mllm_jax.train import registry


def test_ntp_objective_is_the_objectives_next_token_loss_with_z_loss():
    from mllm_jax.config import ExperimentConfig, apply_overrides
    from mllm_jax.objectives.lm import next_token_loss
    rng = np.random.default_rng(0)
    batch = {"labels": rng.integers(0, 7, size=(2, 5)).astype(np.int32), "loss_mask": np.ones((2, 5), np.int32)}
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    cfg = apply_overrides(ExperimentConfig(), ["objective.z_loss=0.01"])
    loss, parts = registry.ntp_objective(cfg)({"logits": logits}, batch)
    want, _ = next_token_loss(logits, batch["labels"], batch["loss_mask"], z_loss=0.01)
    assert float(loss) == float(want) and "z_loss" in parts and float(parts["z_loss"]) > 0


def test_call_with_batch_passes_what_the_model_takes():
    class Strict:
        def __call__(self, input_ids, *, attention_mask=None, rngs=None):
            return sorted(k for k, v in dict(input_ids=input_ids, attention_mask=attention_mask, rngs=rngs).items()
                          if v is not None)

    class Loose:
        def __call__(self, **kw):
            return sorted(kw)

    batch = {"input_ids": 1, "attention_mask": 2, "labels": 3, "pixel_values": 4}
    assert registry.call_with_batch(Strict(), batch, rngs="r") == ["attention_mask", "input_ids", "rngs"]
    assert registry.call_with_batch(Loose(), batch) == ["attention_mask", "input_ids", "labels", "pixel_values"]


def test_names_resolve_or_say_what_is_known():
    assert registry.model_spec("mllm") is registry.MLLM_SPEC
    assert registry.model_spec("tests.toy:TOY_LM").forward_flops is not None
    assert registry.dataset("grain") is registry.grain_data
    with pytest.raises(KeyError, match=r"model_name 'mlm' is not registered \(known: \['mllm'\]\)"):
        registry.model_spec("mlm")
    with pytest.raises(ImportError, match="data_pipeline 'tests.toy:nope': module 'tests.toy' has no 'nope'"):
        registry.dataset("tests.toy:nope")
