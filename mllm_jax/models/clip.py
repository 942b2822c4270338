"""CLIP: the text transformer and the two-tower model with its projections, numerically
matching transformers' ``CLIPTextModel`` / ``CLIPModel``.

    clip = ClipModel(ClipConfig(), rngs=nnx.Rngs(0))            # or load_pretrained(clip_dir)
    img = clip.get_image_features(pixels)                      # float32[B, H, W, C] -> [B, P]
    txt = clip.get_text_features(input_ids, attention_mask)    # int32[B, T] -> [B, P]

Text tower (``ClipTextTransformer``): ``token_embedding(ids) + position_embedding(0..T-1)``
-> pre-LN encoder layers (``x + attn(ln1(x))``, ``h + mlp(ln2(h))``, the config's
``hidden_act``: quick_gelu for OpenAI CLIP) under CLIP's causal mask combined with the padding
mask -> ``final_layer_norm`` = ``last_hidden_state``. ``pooled`` is ``last_hidden_state`` at one
position per row, chosen as transformers chooses it: with ``eos_token_id == 2`` (old OpenAI
configs, kept for compatibility) the position of the row's largest token id (the end token is
the highest id of CLIP's vocabulary), otherwise the first position holding ``eos_token_id``
(position 0 if there is none). Padded query positions are still computed (compare with the mask).

``ClipModel``: our CLIP ``VisionTower`` (``vision_model``; its ``pooled`` is
``post_layernorm(CLS)``) and the text tower, each followed by a bias-free projection to the
shared ``projection_dim`` space (``visual_projection``, ``text_projection``); the features are
unnormalised, as HF's ``get_image_features`` / ``get_text_features`` return them.

Param names follow HF (``mllm_jax/convert/families/clip.py`` maps them one-to-one):
``text_model.embeddings.{token,position}_embedding``, ``text_model.layers.i.{layer_norm1,
self_attn, layer_norm2, mlp}`` (HF ``text_model.encoder.layers.i``; our attention's ``o_proj``
is HF's ``out_proj``), ``text_model.final_layer_norm``, ``vision_model.*`` (the vision tower's
names), ``visual_projection``, ``text_projection``, ``logit_scale``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.config import dtype_of
from mllm_jax.config.clip import ClipConfig, ClipTextConfig
from mllm_jax.models.layers import Dense, Embed, LayerNorm, causal_mask, padding_mask
from mllm_jax.models.vision import EncoderLayer, VisionTower
from mllm_jax.sharding import constrain

Array = jax.Array


class ClipTextOutput(NamedTuple):
    """``last_hidden_state: [B, T, D]`` (after ``final_layer_norm``), ``pooled: [B, D]``,
    ``hidden_states``: ``num_layers + 1`` arrays (embeddings, then each layer; no final norm) or None."""
    last_hidden_state: Array
    pooled: Array
    hidden_states: Optional[tuple[Array, ...]]


class ClipTextEmbeddings(nnx.Module):
    def __init__(self, cfg: ClipTextConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.token_embedding = Embed(cfg.vocab_size, d, dtype=dtype, rngs=rngs)
        self.position_embedding = Embed(cfg.max_position_embeddings, d, axes=("position", "embed"),
                                        dtype=dtype, init_std=0.01, rngs=rngs)

    def __call__(self, input_ids: Array) -> Array:
        """``input_ids: int[B, T]`` -> ``float[B, T, D]`` (positions ``0..T-1``, as HF's default)."""
        positions = jnp.arange(input_ids.shape[1])[None, :]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


def eos_positions(input_ids: Array, eos_token_id: int) -> Array:
    """``int[B, T]`` -> ``int32[B]``: the position transformers' ``CLIPTextTransformer`` pools at
    (see the module docstring: argmax of the ids when ``eos_token_id == 2``, else the first eos)."""
    ids = input_ids.astype(jnp.int32)
    if eos_token_id == 2:
        return jnp.argmax(ids, axis=-1).astype(jnp.int32)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1).astype(jnp.int32)


class ClipTextTransformer(nnx.Module):
    """HF ``CLIPTextTransformer`` (``CLIPTextModel.text_model``); see the module docstring."""

    def __init__(self, cfg: ClipTextConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype = dtype_of(cfg.dtype)
        self.embeddings = ClipTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, act=cfg.hidden_act,
                                             eps=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None, *,
                 output_hidden_states: bool = False) -> ClipTextOutput:
        """``input_ids: int32[B, T]``, ``attention_mask: int/bool[B, T]`` (1 = real token; default
        all ones) -> ``ClipTextOutput``."""
        cfg = self.config
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(f"ClipTextTransformer: input_ids has length {t} > max_position_embeddings="
                             f"{cfg.max_position_embeddings}; truncate the text (tokenizer max_length)")
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        mask = causal_mask(t)[None] & padding_mask(attention_mask)                  # [B, T, T]
        x = constrain(self.embeddings(input_ids), ("activation_batch", "length", None))
        hidden = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden.append(x)
        x = self.final_layer_norm(x)
        idx = eos_positions(input_ids, cfg.eos_token_id)
        pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        return ClipTextOutput(x, pooled, tuple(hidden) if output_hidden_states else None)


class ClipOutput(NamedTuple):
    """``image_embeds: [B_i, P]``, ``text_embeds: [B_t, P]`` (L2-normalised);
    ``logits_per_text: [B_t, B_i]`` = ``exp(logit_scale) * text_embeds @ image_embeds.T``."""
    image_embeds: Array
    text_embeds: Array
    logits_per_text: Array


def _l2(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ClipModel(nnx.Module):
    """HF ``CLIPModel`` (see the module docstring). ``hf_family = "clip"``."""

    hf_family = "clip"

    def __init__(self, cfg: ClipConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        p = cfg.projection_dim
        self.text_model = ClipTextTransformer(cfg.text, rngs=rngs)
        self.vision_model = VisionTower(cfg.vision, rngs=rngs)
        self.visual_projection = Dense(cfg.vision.hidden_size, p, axes=("embed", None), use_bias=False,
                                       dtype=dtype_of(cfg.vision.dtype), rngs=rngs)
        self.text_projection = Dense(cfg.text.hidden_size, p, axes=("embed", None), use_bias=False,
                                     dtype=dtype_of(cfg.text.dtype), rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init_value, jnp.float32))

    def get_image_features(self, pixel_values: Array) -> Array:
        """``pixel_values: float32[B, H, W, C]`` (NHWC, normalised) -> ``float[B, P]``:
        ``visual_projection(vision_model(pixels).pooled)``, unnormalised."""
        return self.visual_projection(self.vision_model(pixel_values).pooled)

    def get_text_features(self, input_ids: Array, attention_mask: Optional[Array] = None) -> Array:
        """``input_ids: int32[B, T]``, ``attention_mask: int/bool[B, T]`` -> ``float[B, P]``:
        ``text_projection(text_model(ids, mask).pooled)``, unnormalised."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooled)

    def __call__(self, input_ids: Array, pixel_values: Array,
                 attention_mask: Optional[Array] = None) -> ClipOutput:
        img = _l2(self.get_image_features(pixel_values))
        txt = _l2(self.get_text_features(input_ids, attention_mask))
        return ClipOutput(img, txt, jnp.exp(self.logit_scale[...]) * txt @ img.T)


__all__ = ["ClipModel", "ClipOutput", "ClipTextTransformer", "ClipTextOutput", "ClipTextEmbeddings",
           "eos_positions"]
