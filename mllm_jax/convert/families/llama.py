"""Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` <-> ``mllm_jax.models.decoder.Decoder``.

Our param paths are HF's minus the ``model.`` prefix, with ``kernel`` = ``weight.T`` for linears,
``scale`` for RMSNorm weights and ``embedding`` for the token table. Tied models have no
``lm_head`` (a stray ``lm_head.weight`` in a tied checkpoint is ignored, as transformers does).
"""
from __future__ import annotations

from flax import nnx

from mllm_jax.config import DecoderConfig
from mllm_jax.convert.hf import Entry, Family, register


def _config_from_hf(hf: dict, tensor_names: set) -> DecoderConfig:
    return DecoderConfig.from_hf(hf)       # refuses what it cannot run (sliding windows, rope types)


def _build(cfg: DecoderConfig, rngs: nnx.Rngs):
    from mllm_jax.models.decoder import Decoder
    return Decoder(cfg, rngs=rngs)


def entries(cfg: DecoderConfig) -> list[Entry]:
    """The table: one row per param of ``Decoder(cfg)``."""
    out = [Entry("embed_tokens.embedding", "model.embed_tokens.weight"),
           Entry("norm.scale", "model.norm.weight")]
    o_bias = cfg.attention_bias and cfg.family == "llama"
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        out += [Entry(f"{ours}.input_layernorm.scale", f"{hf}.input_layernorm.weight"),
                Entry(f"{ours}.post_attention_layernorm.scale", f"{hf}.post_attention_layernorm.weight")]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append(Entry(f"{ours}.self_attn.{name}.kernel", f"{hf}.self_attn.{name}.weight", "linear"))
            if (cfg.attention_bias and name != "o_proj") or (o_bias and name == "o_proj"):
                out.append(Entry(f"{ours}.self_attn.{name}.bias", f"{hf}.self_attn.{name}.bias"))
        for name in ("gate_proj", "up_proj", "down_proj"):
            out.append(Entry(f"{ours}.mlp.{name}.kernel", f"{hf}.mlp.{name}.weight", "linear"))
            if cfg.mlp_bias:
                out.append(Entry(f"{ours}.mlp.{name}.bias", f"{hf}.mlp.{name}.bias"))
    if not cfg.tie_word_embeddings:
        out.append(Entry("lm_head.kernel", "lm_head.weight", "linear"))
    return out


_COMMON = dict(config_from_hf=_config_from_hf, config_to_hf=DecoderConfig.to_hf, build=_build,
               entries=entries, ignore=(r"rotary_emb\.inv_freq$", r"^lm_head\.weight$"))

LLAMA = register(Family(name="llama", architectures=("LlamaForCausalLM",), model_types=("llama",), **_COMMON))
QWEN2 = register(Family(name="qwen2", architectures=("Qwen2ForCausalLM",), model_types=("qwen2",), **_COMMON))
