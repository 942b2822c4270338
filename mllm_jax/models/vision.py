"""ViT vision tower in the CLIP and SigLIP variants, numerically matching transformers'
``CLIPVisionModel`` / ``SiglipVisionModel``.

    tower = VisionTower(VisionConfig(variant="clip"), rngs=nnx.Rngs(0))
    out = tower(pixels)                      # pixels: float32[B, H, W, C], already normalised
    out.last_hidden_state                    # [B, 1 + N, D] (CLIP: CLS first) | [B, N, D] (SigLIP)

CLIP: patch conv (no bias) -> prepend the class token -> + position embedding (CLS included)
-> ``pre_layrnorm`` -> pre-LN encoder layers -> ``last_hidden_state`` (no final norm);
``pooled = post_layernorm(last_hidden_state[:, 0])``.

SigLIP: patch conv (with bias) -> + position embedding -> encoder layers ->
``last_hidden_state = post_layernorm(...)``; ``pooled`` is the multi-head attention-pooling
head (HF ``SiglipMultiheadAttentionPoolingHead``) when ``cfg.use_head``, else (HF returns None
there) the mean over patch tokens (big_vision's ``pool_type="gap"``).

``hidden_states`` (``output_hidden_states=True``) follow HF: ``num_layers + 1`` arrays, the
encoder input (CLIP: after ``pre_layrnorm``) then each layer's output; no final norm on any.

Param names follow HF (including CLIP's ``pre_layrnorm`` spelling) so that the conversion
tables in ``mllm_jax/convert/families/{clip,siglip}_vision.py`` stay one-to-one; attention
projections use ``layers.Attention`` (``out_proj`` there is our ``o_proj``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.config import VisionConfig, dtype_of
from mllm_jax.models.layers import (
    MLP, Attention, Dense, LayerNorm, add_param, broadcast_param, dot_product_attention, make_param, mark_units,
    matmul_2d, normal_init)
from mllm_jax.sharding import constrain

Array = jax.Array


class VisionOutput(NamedTuple):
    """``last_hidden_state: [B, N(+1), D]``, ``pooled: [B, D]``,
    ``hidden_states``: tuple of ``num_layers + 1`` arrays ``[B, N(+1), D]`` or None."""
    last_hidden_state: Array
    pooled: Array
    hidden_states: Optional[tuple[Array, ...]]


class PatchEmbed(nnx.Module):
    """Non-overlapping ``p x p`` patch convolution (stride p) as one contraction.

    ``kernel: float32[p, p, C, D]`` (HWIO, torch ``Conv2d.weight`` OIHW transposed).
    """

    def __init__(self, patch: int, channels: int, dim: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
        self.patch, self.dtype = patch, dtype
        self.kernel = make_param(normal_init(0.02), ("patch", "patch", "channels", "embed"), rngs.params(),
                                 (patch, patch, channels, dim))
        self.bias = (make_param(nnx.initializers.zeros_init(), ("embed",), rngs.params(), (dim,))
                     if use_bias else None)

    def __call__(self, pixels: Array) -> Array:
        """``pixels: float[B, H, W, C]`` -> ``float[B, (H/p)*(W/p), D]`` in row-major patch order."""
        b, h, w, c = pixels.shape
        p = self.patch
        # patches as rows [B, H/p, W/p, p*p*C] (p, q, c order, as the kernel's), then one 2-D
        # matmul: its weight gradient is a plain product (see layers.matmul_2d)
        x = pixels.astype(self.dtype).reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)
        kernel = self.kernel[...].reshape(p * p * c, -1)
        return matmul_2d(x, kernel, None if self.bias is None else self.bias[...])


class VisionEmbeddings(nnx.Module):
    """Patch embedding, the CLIP class token, learned absolute position embedding."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.dtype = dtype
        self.has_cls = cfg.variant == "clip"
        self.patch_embedding = PatchEmbed(cfg.patch_size, cfg.num_channels, d,
                                          use_bias=cfg.variant == "siglip", dtype=dtype, rngs=rngs)
        self.class_embedding = (make_param(normal_init(d ** -0.5), ("embed",), rngs.params(), (d,))
                                if self.has_cls else None)
        n = cfg.num_patches + int(self.has_cls)
        self.position_embedding = make_param(normal_init(0.02), ("position", "embed"), rngs.params(), (n, d))

    def __call__(self, pixels: Array) -> Array:
        x = self.patch_embedding(pixels)                                    # [B, N, D]
        if self.class_embedding is not None:
            cls = broadcast_param(self.class_embedding[...], (x.shape[0], 1, x.shape[-1]), self.dtype)
            x = jnp.concatenate([cls, x], axis=1)
        return add_param(x, self.position_embedding[...][None])


class EncoderLayer(nnx.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``h + mlp(ln2(h))``."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.layer_norm1 = LayerNorm(d, cfg.layer_norm_eps)
        self.self_attn = Attention(d, cfg.num_heads, qkv_bias=True, out_bias=True, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(d, cfg.layer_norm_eps)
        self.mlp = MLP(d, cfg.intermediate_size, act=cfg.hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """``x: float[B, N, D]`` -> ``float[B, N, D]`` (full bidirectional attention)."""
        h, _ = self.self_attn(self.layer_norm1(x))
        x = x + h
        x = x + self.mlp(self.layer_norm2(x))
        return constrain(x, ("activation_batch", "length", None))


class MultiheadAttentionPooling(nnx.Module):
    """torch ``nn.MultiheadAttention(batch_first=True)`` for a query set attending to tokens.

    ``in_proj_kernel: float32[D, 3, D]`` holds the q, k, v projections (torch's fused
    ``in_proj_weight [3D, D]`` reshaped and transposed), ``in_proj_bias: float32[3, D]``.
    """

    def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"attention pooling: num_heads={num_heads} does not divide dim={dim}")
        self.num_heads, self.dtype = num_heads, dtype
        self.in_proj_kernel = mark_units(
            make_param(nnx.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2)), ("embed", None, "heads"),
                       rngs.params(), (dim, 3, dim)), (None, None, num_heads))
        self.in_proj_bias = mark_units(
            make_param(nnx.initializers.zeros_init(), (None, "heads"), rngs.params(), (3, dim)), (None, num_heads))
        self.out_proj = Dense(dim, dim, axes=("heads", "embed"), dtype=dtype, rngs=rngs)
        mark_units(self.out_proj.kernel, (num_heads, None))

    def __call__(self, query: Array, x: Array) -> Array:
        """``query: float[B, Q, D]``, ``x: float[B, N, D]`` -> ``float[B, Q, D]``."""
        w, bias = self.in_proj_kernel[...], self.in_proj_bias[...]
        query, x = query.astype(self.dtype), x.astype(self.dtype)
        q = matmul_2d(query, w[:, 0], bias[0])
        k = matmul_2d(x, w[:, 1], bias[1])
        v = matmul_2d(x, w[:, 2], bias[2])
        heads = lambda t: t.reshape(t.shape[0], t.shape[1], self.num_heads, -1)  # noqa: E731
        out = dot_product_attention(heads(q), heads(k), heads(v), None)
        return self.out_proj(out.reshape(query.shape))


class AttentionPoolingHead(nnx.Module):
    """SigLIP's MAP head: a learned probe attends over the tokens, then ``h + mlp(ln(h))``."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.probe = make_param(normal_init(1.0), ("embed",), rngs.params(), (d,))
        self.attention = MultiheadAttentionPooling(d, cfg.num_heads, dtype=dtype, rngs=rngs)
        self.layernorm = LayerNorm(d, cfg.layer_norm_eps)
        self.mlp = MLP(d, cfg.intermediate_size, act=cfg.hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """``x: float[B, N, D]`` -> ``float[B, D]``."""
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        h = self.attention(probe, x)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class VisionTower(nnx.Module):
    """CLIP / SigLIP ViT (see the module docstring). ``hf_family``: clip_vision | siglip_vision."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype = dtype_of(cfg.dtype)
        d = cfg.hidden_size
        self.embeddings = VisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        clip = cfg.variant == "clip"
        self.pre_layrnorm = LayerNorm(d, cfg.layer_norm_eps) if clip else None  # (sic) HF's name
        self.layers = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.post_layernorm = LayerNorm(d, cfg.layer_norm_eps)
        self.head = AttentionPoolingHead(cfg, dtype=dtype, rngs=rngs) if (cfg.use_head and not clip) else None

    @property
    def hf_family(self) -> str:
        return "clip_vision" if self.config.variant == "clip" else "siglip_vision"

    def __call__(self, pixel_values: Array, *, output_hidden_states: bool = False) -> VisionOutput:
        """``pixel_values: float32[B, H, W, C]`` (NHWC, normalised) -> ``VisionOutput``."""
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"VisionTower: pixel_values has shape {tuple(pixel_values.shape)}; expected "
                f"[B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] (NHWC, cfg.image_size)")
        x = self.embeddings(pixel_values)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        x = constrain(x, ("activation_batch", "length", None))
        hidden = [x]
        block = nnx.remat(_run_layer) if cfg.remat else _run_layer
        for layer in self.layers:
            x = block(layer, x)
            hidden.append(x)
        if cfg.variant == "clip":
            last = x
            pooled = self.post_layernorm(x[:, 0])
        else:
            last = self.post_layernorm(x)
            if self.head is not None:
                pooled = self.head(last)
            else:  # HF returns None here; the patch mean (big_vision's "gap") keeps pooled [B, D]
                pooled = jnp.mean(last.astype(jnp.float32), axis=1).astype(last.dtype)
        return VisionOutput(last, pooled, tuple(hidden) if output_hidden_states else None)


def _run_layer(layer: EncoderLayer, x: Array) -> Array:
    return layer(x)


__all__ = ["VisionTower", "VisionOutput", "PatchEmbed", "EncoderLayer", "AttentionPoolingHead",
           "MultiheadAttentionPooling"]
