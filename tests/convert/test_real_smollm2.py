"""Real weights: SmolLM2-135M-Instruct (GGUF Q4_1) in transformers vs our decoder, both loaded
through transformers' GGUF dequantiser. Run with ``MLLM_JAX_ASSETS=... pytest -m real``."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mllm_jax.convert.hf import load_pretrained
from mllm_jax.generate import generate

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is the capital of France?",
             "Write a haiku about the sea.",
             "List three prime numbers and explain why they are prime."]


@pytest.fixture(scope="module")
def smollm2(assets_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = assets_dir / "SmolLM2-135M-Instruct"
    if not (d / GGUF).exists():
        pytest.fail(f"{d / GGUF} is missing: run `make assets`")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    tok.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    ours = load_pretrained(d, gguf_file=GGUF)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                     add_generation_prompt=True) for q in QUESTIONS]
    enc = tok(texts, return_tensors="np", padding=True)
    return tok, hf, ours, enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


@pytest.mark.real
def test_smollm2_logits_match_transformers(smollm2):
    tok, hf, ours, ids, mask = smollm2
    assert ours.config.tie_word_embeddings and ours.lm_head is None
    assert (mask == 0).any()  # a padded batch
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    valid = mask.astype(bool)
    err = np.abs(got - ref)[valid].max()
    assert err < 1e-3, f"max abs logit error {err:.3g} (logits up to {np.abs(ref[valid]).max():.1f})"


@pytest.mark.real
def test_smollm2_greedy_generation_matches_transformers(smollm2):
    tok, hf, ours, ids, mask = smollm2
    n = 32
    eos, pad = hf.generation_config.eos_token_id, tok.pad_token_id
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    ref = ref[:, ids.shape[1]:].numpy()
    ref = np.pad(ref, ((0, 0), (0, n - ref.shape[1])), constant_values=pad)
    out = generate(ours, ids, attention_mask=mask, max_new_tokens=n, stop_tokens=eos, pad_token_id=pad)
    got = np.asarray(out.tokens)
    np.testing.assert_array_equal(got, ref, err_msg="\n".join(tok.batch_decode(got)))
    assert "Paris" in tok.decode(got[0])
