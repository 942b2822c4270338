"""Llama / Qwen2-family decoder-only LM (Flax NNX) with a KV cache.

    model = Decoder(DecoderConfig(num_layers=2), rngs=nnx.Rngs(0))
    out = model(input_ids, attention_mask=mask, output_hidden_states=True)
    out.logits            # float32[B, T, V]
    out.hidden_states     # L + 1 arrays with Hugging Face semantics

Submodules are named like HF's ``LlamaForCausalLM`` (``embed_tokens``, ``layers[i].self_attn``,
``layers[i].mlp``, ``input_layernorm``, ``post_attention_layernorm``, ``norm``, ``lm_head``), so the
conversion table (``mllm_jax/convert/families/llama.py``) is one-to-one. Params are float32;
computation runs in ``cfg.dtype``; norms and softmax accumulate in float32.

Masks and positions. Without a cache, ``attention_mask: [B, T]`` marks real tokens and attention
is causal over the T positions. With a cache (``init_cache``), keys/values of the T new tokens are
written at slots ``[cache_index, cache_index + T)`` of every row, ``attention_mask: [B, S_max]``
marks which slots are valid and causality is slot order; padding slots are holes that nothing
attends to, so left- and right-padded batches give the same results. Positions default to
``cumsum(attention_mask) - 1`` (clipped at 0), i.e. each row counts only its own valid tokens.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.config import DecoderConfig, dtype_of
from mllm_jax.models.layers import Attention, Dense, Embed, GatedMLP, KVCache, RMSNorm, causal_mask
from mllm_jax.sharding import constrain

Array = jax.Array


class DecoderOutput(NamedTuple):
    """``logits: float32[B, T, V] | None``; ``last_hidden_state: [B, T, D]`` (after the final
    norm); ``hidden_states``: L + 1 arrays ``[B, T, D]`` (embeddings, each layer's output, the
    last one after the final norm) or None; ``cache``: the updated per-layer caches or None."""
    logits: Optional[Array]
    last_hidden_state: Array
    hidden_states: Optional[tuple[Array, ...]]
    cache: Optional[list[KVCache]]


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.self_attn = Attention(
            d, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
            qkv_bias=cfg.attention_bias,
            # HF Llama puts attention_bias on o_proj too; Qwen2 never has an o_proj bias
            out_bias=cfg.attention_bias and cfg.family == "llama",
            rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, dtype=dt, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = GatedMLP(d, cfg.intermediate_size, act=cfg.hidden_act, use_bias=cfg.mlp_bias,
                            dtype=dt, rngs=rngs)

    def __call__(self, x: Array, mask: Array, positions: Array, cache: Optional[KVCache] = None,
                 cache_index: Optional[Array] = None) -> tuple[Array, Optional[KVCache]]:
        """``x: float[B, T, D]``, ``mask: bool[B, T, S]``, ``positions: int32[B, T]``."""
        h, cache = self.self_attn(self.input_layernorm(x), mask=mask, positions=positions,
                                  cache=cache, cache_index=cache_index)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("activation_batch", "length", None)), cache


def _layer_call(layer: DecoderLayer, x, mask, positions, cache, cache_index):
    return layer(x, mask, positions, cache, cache_index)


_remat_layer_call = nnx.remat(_layer_call)


class Decoder(nnx.Module):
    """Llama / Qwen2 causal LM. See the module docstring for masks, positions and the cache."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype_of(cfg.dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Dense(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False,
                              dtype=self.dtype, rngs=rngs))

    @property
    def hf_family(self) -> str:
        return self.config.family

    def embed(self, input_ids: Array) -> Array:
        """``int32[B, T]`` -> token embeddings ``float[B, T, D]`` (compute dtype)."""
        return self.embed_tokens(input_ids)

    def lm_logits(self, hidden: Array) -> Array:
        """Final-normed ``hidden: float[..., D]`` -> ``float32[..., V]`` (tied or ``lm_head``)."""
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden, out_dtype=jnp.float32)
        return self.lm_head(hidden, out_dtype=jnp.float32)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> list[KVCache]:
        """Zeroed caches, one per layer: ``k, v: float[batch, KVH, max_len, head_dim]``."""
        cfg = self.config
        shape = (batch, cfg.num_kv_heads, max_len, cfg.resolved_head_dim)
        dt = self.dtype if dtype is None else dtype
        return [KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(cfg.num_layers)]

    def __call__(self, input_ids: Optional[Array] = None, *, inputs_embeds: Optional[Array] = None,
                 attention_mask: Optional[Array] = None, positions: Optional[Array] = None,
                 cache: Optional[list[KVCache]] = None, cache_index: Optional[Array] = None,
                 output_hidden_states: bool = False, return_logits: bool = True) -> DecoderOutput:
        """Forward pass over ``input_ids: int32[B, T]`` or ``inputs_embeds: float[B, T, D]``.

        ``attention_mask``: ``[B, T]`` (no cache) or ``[B, S_max]`` (with a cache; 1 = valid slot);
        None means all valid (with a cache: every slot before ``cache_index + T``).
        ``positions: int32[B, T]``; default ``cumsum(attention_mask) - 1`` clipped at 0.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Decoder: pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t, _ = x.shape
        if cache is None:
            s, offset = t, 0
        else:
            if cache_index is None:
                raise ValueError("Decoder: a cache needs cache_index (the first slot to write)")
            if len(cache) != len(self.layers):
                raise ValueError(f"Decoder: cache has {len(cache)} layers, the model {len(self.layers)}")
            s = cache[0].k.shape[2]
            if isinstance(cache_index, (int, np.integer)) and cache_index + t > s:   # concrete: check
                raise ValueError(f"Decoder: writing {t} tokens at cache_index={int(cache_index)} overflows "
                                 f"the cache's {s} slots")
            offset = jnp.asarray(cache_index, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.broadcast_to(jnp.arange(s) < offset + t, (b, s))
        elif attention_mask.shape != (b, s):
            raise ValueError(
                f"Decoder: attention_mask has shape {attention_mask.shape}, expected {(b, s)} "
                + ("(batch, cache slots S_max) when a cache is given" if cache is not None else "(batch, tokens)"))
        valid = attention_mask.astype(bool)
        mask = valid[:, None, :] & causal_mask(t, s, offset)[None]
        if positions is None:
            pos_all = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
            positions = jnp.maximum(jax.lax.dynamic_slice_in_dim(pos_all, offset, t, axis=1), 0)
        positions = positions.astype(jnp.int32)

        call = _remat_layer_call if self.config.remat else _layer_call
        hidden = [x] if output_hidden_states else None
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            x, c = call(layer, x, mask, positions, None if cache is None else cache[i], cache_index)
            if cache is not None:
                new_cache.append(c)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x
        logits = self.lm_logits(x) if return_logits else None
        return DecoderOutput(logits, x, tuple(hidden) if hidden is not None else None, new_cache)


__all__ = ["Decoder", "DecoderLayer", "DecoderOutput"]
