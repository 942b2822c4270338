"""ViT vision tower in the CLIP, SigLIP and DINOv2 variants, numerically matching transformers'
``CLIPVisionModel`` / ``SiglipVisionModel`` / ``Dinov2Model``.

    tower = VisionTower(VisionConfig(variant="clip"), rngs=nnx.Rngs(0))
    out = tower(pixels)                      # pixels: float32[B, H, W, C], already normalised
    out.last_hidden_state                    # [B, 1 + N, D] (CLIP, DINOv2: CLS first) | [B, N, D] (SigLIP)

CLIP: patch conv (no bias) -> prepend the class token -> + position embedding (CLS included)
-> ``pre_layrnorm`` -> pre-LN encoder layers -> ``last_hidden_state`` (no final norm);
``pooled = post_layernorm(last_hidden_state[:, 0])``.

SigLIP: patch conv (with bias) -> + position embedding -> encoder layers ->
``last_hidden_state = post_layernorm(...)``; ``pooled`` is the multi-head attention-pooling
head (HF ``SiglipMultiheadAttentionPoolingHead``) when ``cfg.use_head``, else (HF returns None
there) the mean over patch tokens (big_vision's ``pool_type="gap"``).

DINOv2: patch conv (with bias) -> prepend the class token -> + position embedding, the patch
part resized bicubically when the input's patch grid is not the table's (transformers'
``interpolate_pos_encoding``, reproduced exactly: ``bicubic_matrix``) -> pre-LN layers with
LayerScale (``x + lambda1 * attn(norm1(x))``, ``x + lambda2 * mlp(norm2(x))``; the MLP is GELU,
or SwiGLU for giant) -> ``last_hidden_state = post_layernorm(...)`` (HF ``layernorm``);
``pooled = last_hidden_state[:, 0]`` (HF ``pooler_output``). Any input side works (a
remainder smaller than a patch is dropped, as the stride-p convolution does).

``hidden_states`` (``output_hidden_states=True``) follow HF: ``num_layers + 1`` arrays, the
encoder input (CLIP: after ``pre_layrnorm``) then each layer's output; no final norm on any.

Param names follow HF where the variants share a structure (including CLIP's ``pre_layrnorm``
spelling), so that the conversion tables in ``mllm_jax/convert/families/{_vit,dinov2_vision}.py``
stay one-to-one; attention projections use ``layers.Attention`` (``out_proj`` there is our
``o_proj``). DINOv2's own parts keep its names (``layer_scale1.lambda1``, the SwiGLU's fused
``weights_in`` / ``weights_out``); its shared parts take the CLIP/SigLIP names above.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
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


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``float32[n_out, n_in]``: torch ``interpolate(mode="bicubic", align_corners=False)`` along
    one axis as a matrix (no antialiasing; Keys' cubic with A = -0.75; source ``(i + 0.5) *
    n_in / n_out - 0.5``; taps past an edge read the edge), as ATen computes it (the test
    compares with torch on CPU, 37 -> 16 included: DINOv2's 518-px table at 224 px)."""
    a = -0.75

    def near(x):   # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):    # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    w = np.zeros((n_out, n_in), np.float64)
    scale = np.float32(n_in) / np.float32(n_out)
    for i in range(n_out):
        src = float(scale * np.float32(i + 0.5) - np.float32(0.5))
        x0 = min(int(np.floor(src)), n_in - 1)
        t = min(max(src - x0, 0.0), 1.0)
        for j, c in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
            w[i, min(max(x0 - 1 + j, 0), n_in - 1)] += c
    return w.astype(np.float32)


class VisionEmbeddings(nnx.Module):
    """Patch embedding, the class token (CLIP, DINOv2), learned absolute position embedding
    (``float32[(1 +) S*S, D]`` for the table's ``S x S`` patch grid)."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.dtype = dtype
        self.has_cls = cfg.has_class_token
        self.interpolate = cfg.variant == "dinov2"
        self.grid = cfg.position_grid_size
        self.patch_embedding = PatchEmbed(cfg.patch_size, cfg.num_channels, d,
                                          use_bias=cfg.variant != "clip", dtype=dtype, rngs=rngs)
        cls_std = 0.02 if cfg.variant == "dinov2" else d ** -0.5
        self.class_embedding = (make_param(normal_init(cls_std), ("embed",), rngs.params(), (d,))
                                if self.has_cls else None)
        n = self.grid ** 2 + int(self.has_cls)
        self.position_embedding = make_param(normal_init(0.02), ("position", "embed"), rngs.params(), (n, d))

    def __call__(self, pixels: Array) -> Array:
        p = self.patch_embedding.patch
        gh, gw = pixels.shape[1] // p, pixels.shape[2] // p
        x = self.patch_embedding(pixels[:, :gh * p, :gw * p])               # [B, gh*gw, D]
        if self.class_embedding is not None:
            cls = broadcast_param(self.class_embedding[...], (x.shape[0], 1, x.shape[-1]), self.dtype)
            x = jnp.concatenate([cls, x], axis=1)
        return add_param(x, self.positions(gh, gw)[None])

    def positions(self, gh: int, gw: int) -> Array:
        """The position table for a ``gh x gw`` patch grid: ``float32[(1 +) gh*gw, D]``."""
        table = self.position_embedding[...]
        if (gh, gw) == (self.grid, self.grid):
            return table
        if not self.interpolate:
            raise ValueError(f"vision tower: a {gh}x{gw} patch grid, but the position table is for "
                             f"{self.grid}x{self.grid} and this variant does not interpolate it")
        k = int(self.has_cls)
        patch = table[k:].astype(jnp.float32).reshape(self.grid, self.grid, -1)
        patch = jnp.einsum("hs,std,wt->hwd", bicubic_matrix(self.grid, gh), patch, bicubic_matrix(self.grid, gw),
                           precision=jax.lax.Precision.HIGHEST).astype(table.dtype)
        return jnp.concatenate([table[:k], patch.reshape(gh * gw, -1)], axis=0)


class LayerScale(nnx.Module):
    """DINOv2's per-channel residual-branch scale ``x * lambda1`` (``lambda1: float32[D]``)."""

    def __init__(self, dim: int, value: float, *, rngs: nnx.Rngs):
        self.lambda1 = make_param(nnx.initializers.constant(value), ("embed",), rngs.params(), (dim,))

    def __call__(self, x: Array) -> Array:
        return (x.astype(jnp.float32) * self.lambda1[...]).astype(x.dtype)


class SwiGLUFFN(nnx.Module):
    """DINOv2-giant's MLP, ``weights_out(silu(x1) * x2)`` with ``[x1 | x2] = weights_in(x)`` (the
    fused layout its checkpoints store; transformers splits it into ``gate_proj`` / ``up_proj``)."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.weights_in = Dense(dim, 2 * hidden, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.weights_out = Dense(hidden, dim, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x1, x2 = jnp.split(self.weights_in(x).astype(jnp.float32), 2, axis=-1)
        h = (jax.nn.silu(x1) * x2).astype(self.weights_out.dtype)
        return self.weights_out(h)


class EncoderLayer(nnx.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``h + mlp(ln2(h))`` (the ViT towers'
    and CLIP's text tower's, HF names); with ``layerscale`` (DINOv2) each branch is scaled by its
    LayerScale (``layer_scale1``, ``layer_scale2``); ``swiglu``: DINOv2-giant's MLP."""

    def __init__(self, dim: int, num_heads: int, intermediate_size: int, *, act: str, eps: float,
                 layerscale: Optional[float] = None, swiglu: bool = False, dtype, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(dim, eps)
        self.self_attn = Attention(dim, num_heads, qkv_bias=True, out_bias=True, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(dim, eps)
        if swiglu:
            self.mlp = SwiGLUFFN(dim, intermediate_size, dtype=dtype, rngs=rngs)
        else:
            self.mlp = MLP(dim, intermediate_size, act=act, dtype=dtype, rngs=rngs)
        self.layer_scale1 = LayerScale(dim, layerscale, rngs=rngs) if layerscale is not None else None
        self.layer_scale2 = LayerScale(dim, layerscale, rngs=rngs) if layerscale is not None else None

    @classmethod
    def of_vision(cls, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs) -> "EncoderLayer":
        return cls(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, act=cfg.hidden_act, eps=cfg.layer_norm_eps,
                   layerscale=cfg.layerscale_value if cfg.variant == "dinov2" else None,
                   swiglu=cfg.use_swiglu_ffn, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
        """``x: float[B, N, D]`` -> ``float[B, N, D]``; ``mask: bool[B, N, N]`` (True = may
        attend), None: full bidirectional attention."""
        h, _ = self.self_attn(self.layer_norm1(x), mask=mask)
        x = x + (h if self.layer_scale1 is None else self.layer_scale1(h))
        h = self.mlp(self.layer_norm2(x))
        x = x + (h if self.layer_scale2 is None else self.layer_scale2(h))
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
    """CLIP / SigLIP / DINOv2 ViT (see the module docstring). ``hf_family``: clip_vision |
    siglip_vision | dinov2_vision."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dtype = dtype_of(cfg.dtype)
        d = cfg.hidden_size
        self.embeddings = VisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        clip = cfg.variant == "clip"
        self.pre_layrnorm = LayerNorm(d, cfg.layer_norm_eps) if clip else None  # (sic) HF's name
        self.layers = nnx.List([EncoderLayer.of_vision(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.post_layernorm = LayerNorm(d, cfg.layer_norm_eps)
        self.head = (AttentionPoolingHead(cfg, dtype=dtype, rngs=rngs)
                     if (cfg.use_head and cfg.variant == "siglip") else None)

    @property
    def hf_family(self) -> str:
        return f"{self.config.variant}_vision"

    def __call__(self, pixel_values: Array, *, output_hidden_states: bool = False) -> VisionOutput:
        """``pixel_values: float32[B, H, W, C]`` (NHWC, normalised) -> ``VisionOutput``."""
        cfg = self.config
        if cfg.variant == "dinov2":   # any side of at least one patch (the table is interpolated)
            ok = (pixel_values.ndim == 4 and pixel_values.shape[-1] == cfg.num_channels
                  and min(pixel_values.shape[1:3]) >= cfg.patch_size)
            want = f"[B, H, W, {cfg.num_channels}] (NHWC, H and W >= patch_size={cfg.patch_size})"
        else:
            ok = pixel_values.ndim == 4 and pixel_values.shape[1:] == (cfg.image_size, cfg.image_size, cfg.num_channels)
            want = f"[B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] (NHWC, cfg.image_size)"
        if not ok:
            raise ValueError(f"VisionTower: pixel_values has shape {tuple(pixel_values.shape)}; expected {want}")
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
        elif cfg.variant == "dinov2":
            last = self.post_layernorm(x)
            pooled = last[:, 0]
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
           "MultiheadAttentionPooling", "LayerScale", "SwiGLUFFN", "bicubic_matrix"]
