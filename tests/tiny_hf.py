"""Tiny random transformers models for parity tests (causal LMs: Llama / Qwen2; ``perturb`` for
any); nothing is downloaded."""
import numpy as np
import torch
import transformers

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)

CASES = {
    "llama_gqa": ("llama", dict()),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
    "llama3_rope": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16, rope_theta=500.0))),
    "linear_rope": ("llama", dict(rope_parameters=dict(rope_type="linear", factor=3.0, rope_theta=100.0))),
    "qwen2": ("qwen2", dict(num_key_value_heads=1)),
    # transformers' name for the tanh GELU that the vision / BERT configs already accepted
    "llama_gelu_new": ("llama", dict(hidden_act="gelu_new")),
}


def perturb(model, seed: int = 0):
    """``model`` in eval mode with ``0.1 * N(0, 1)`` (seeded) added to every parameter, so no
    parameter keeps a symmetric init (zero biases, unit norms) that would hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_hf(family: str, seed: int = 0, **overrides):
    """A tiny random HF causal LM; norms and biases randomised too, so the mapping of every
    tensor matters."""
    cls_cfg, cls = ((transformers.LlamaConfig, transformers.LlamaForCausalLM) if family == "llama"
                    else (transformers.Qwen2Config, transformers.Qwen2ForCausalLM))
    torch.manual_seed(seed)
    model = cls(cls_cfg(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed" in name:
                p.copy_(torch.randn_like(p))  # std 1: hidden states of order 1
            else:  # linears: unit-variance outputs; sharp attention so positions (RoPE) matter
                gain = 3.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(gain * torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def hf_and_ours(path, family: str, seed: int = 0, **overrides):
    """``make_hf(family, seed, **overrides)`` saved as safetensors under ``path``, and our model
    loaded from there: the pair a parity test compares."""
    from mllm_jax.convert.hf import load_pretrained
    hf = make_hf(family, seed=seed, **overrides)
    hf.save_pretrained(path)
    return hf, load_pretrained(path)


def padded_batch(vocab: int, seed: int = 0):
    """int ids [3, 24] and a mask with a left-padded row, a right-padded row and a full row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (3, 24)).astype(np.int32)
    mask = np.ones((3, 24), np.int32)
    mask[0, :5] = 0
    mask[1, 17:] = 0
    return ids, mask
