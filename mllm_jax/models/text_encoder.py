"""BERT text encoder (HF ``BertModel``), e.g. the all-MiniLM-L6-v2 teacher, and mean pooling.

    enc = TextEncoder(TextEncoderConfig(), rngs=nnx.Rngs(0))     # or load_pretrained(minilm_dir)
    out = enc(input_ids, attention_mask)                          # int32[B, T], int[B, T]
    emb = mean_pool(out.last_hidden_state, attention_mask)        # float32[B, D]

Embeddings: ``LayerNorm(word + position + token_type)``; positions are ``0..T-1`` (HF's
default, right padding). Each layer is post-LN: ``h = LN(x + attn(x))``, ``LN(h + mlp(h))``
with exact (erf) GELU. Padded keys are masked out of attention; padded query positions are
still computed (as in HF), so compare or pool with the mask. The optional pooler is HF's
``tanh(dense(last_hidden_state[:, 0]))``.

Param names (HF on the right, mapped in ``mllm_jax/convert/families/bert.py``):
``embeddings.{word,position,token_type}_embeddings`` / ``embeddings.layer_norm`` (LayerNorm),
``layers.i.self_attn.{q,k,v,o}_proj`` (attention.self.{query,key,value}, attention.output.dense),
``layers.i.attn_layer_norm`` (attention.output.LayerNorm), ``layers.i.mlp.{fc1,fc2}``
(intermediate.dense, output.dense), ``layers.i.mlp_layer_norm`` (output.LayerNorm),
``pooler`` (pooler.dense).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.config import TextEncoderConfig, dtype_of
from mllm_jax.models.layers import MLP, Attention, Dense, Embed, LayerNorm, padding_mask
from mllm_jax.sharding import constrain

Array = jax.Array


class TextEncoderOutput(NamedTuple):
    """``last_hidden_state: [B, T, D]``; ``pooled: [B, D]`` (None without a pooler);
    ``hidden_states``: ``num_layers + 1`` arrays (embeddings, then each layer) or None."""
    last_hidden_state: Array
    pooled: Optional[Array]
    hidden_states: Optional[tuple[Array, ...]]


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: TextEncoderConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.word_embeddings = Embed(cfg.vocab_size, d, dtype=dtype, rngs=rngs)
        self.position_embeddings = Embed(cfg.max_position_embeddings, d, axes=("position", "embed"),
                                         dtype=dtype, rngs=rngs)
        self.token_type_embeddings = Embed(cfg.type_vocab_size, d, axes=(None, "embed"), dtype=dtype, rngs=rngs)
        self.layer_norm = LayerNorm(d, cfg.layer_norm_eps)

    def __call__(self, input_ids: Array, token_type_ids: Array) -> Array:
        """``input_ids, token_type_ids: int[B, T]`` -> ``float[B, T, D]``."""
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(positions))
        return self.layer_norm(x)


class BertLayer(nnx.Module):
    """Post-LN block: ``h = LN(x + attn(x))``; ``LN(h + mlp(h))``."""

    def __init__(self, cfg: TextEncoderConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.self_attn = Attention(d, cfg.num_heads, qkv_bias=True, out_bias=True, dtype=dtype, rngs=rngs)
        self.attn_layer_norm = LayerNorm(d, cfg.layer_norm_eps)
        self.mlp = MLP(d, cfg.intermediate_size, act=cfg.hidden_act, dtype=dtype, rngs=rngs)
        self.mlp_layer_norm = LayerNorm(d, cfg.layer_norm_eps)

    def __call__(self, x: Array, mask: Array) -> Array:
        """``x: float[B, T, D]``, ``mask: bool[B, 1, T]`` (key validity) -> ``float[B, T, D]``."""
        h, _ = self.self_attn(x, mask=mask)
        x = self.attn_layer_norm(x + h)
        x = self.mlp_layer_norm(x + self.mlp(x))
        return constrain(x, ("activation_batch", "length", None))


class TextEncoder(nnx.Module):
    """HF ``BertModel`` (see the module docstring). ``hf_family = "bert"``."""

    hf_family = "bert"

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype = dtype_of(cfg.dtype)
        self.embeddings = BertEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.pooler = (Dense(cfg.hidden_size, cfg.hidden_size, axes=("embed", None), dtype=dtype, rngs=rngs)
                       if cfg.add_pooler else None)

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
                 token_type_ids: Optional[Array] = None, *,
                 output_hidden_states: bool = False) -> TextEncoderOutput:
        """``input_ids: int32[B, T]``, ``attention_mask: int/bool[B, T]`` (1 = real token; default
        all ones), ``token_type_ids: int32[B, T]`` (default zeros) -> ``TextEncoderOutput``."""
        cfg = self.config
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(f"TextEncoder: input_ids has length {t} > max_position_embeddings="
                             f"{cfg.max_position_embeddings}; truncate the text (tokenizer max_length)")
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        x = self.embeddings(input_ids, token_type_ids)
        x = constrain(x, ("activation_batch", "length", None))
        mask = padding_mask(attention_mask)
        hidden = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden.append(x)
        pooled = jnp.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return TextEncoderOutput(x, pooled, tuple(hidden) if output_hidden_states else None)


def mean_pool(hidden: Array, mask: Array) -> Array:
    """sentence-transformers mean pooling: ``float[B, T, D]``, ``int/bool[B, T]`` -> ``float32[B, D]``.

    ``sum_t mask * h / max(sum_t mask, 1e-9)`` in float32 (an all-padding row gives zeros).
    """
    m = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


__all__ = ["TextEncoder", "TextEncoderOutput", "BertEmbeddings", "BertLayer", "mean_pool"]
