"""Names in configs -> code, and the default next-token loss (against torch's cross-entropy)."""
import numpy as np
import pytest
import torch

from mllm_jax.train import registry


def test_next_token_loss_matches_torch_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    labels = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
    mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.int32)
    ours = float(registry.next_token_loss(logits, labels, mask))
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(logits).reshape(-1, 7),
                                           torch.from_numpy(labels).reshape(-1).long(), reduction="none")
    ref = float((ce * torch.from_numpy(mask).reshape(-1)).sum() / mask.sum())
    assert ours == pytest.approx(ref, rel=1e-6)
    assert float(registry.next_token_loss(logits, labels, np.zeros_like(mask))) == 0.0  # nothing to train


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
