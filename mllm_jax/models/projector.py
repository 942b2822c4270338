"""Vision -> LLM projectors: LLaVA's 2-layer MLP and InfMLLM's pool-adapter.

    proj = MLPProjector(d_vit, d_llm, ProjectorConfig(kind="mlp"), rngs=rngs)
    tokens = proj(patch_features)                     # [B, N, d_vit] -> [B, N, d_llm]

    pool = PoolAdapter(d_vit, d_llm, grid=16, cfg=ProjectorConfig(kind="pool", pool_size=8), rngs=rngs)
    tokens = pool(patch_features)                     # [B, 16*16, d_vit] -> [B, 8*8, d_llm]

The pool-adapter follows INF-MLLM's code (infly-ai/INF-MLLM ``infmllm/models/pooler.py`` and
``INF-MLLM1/infmllm/models/infmllm_inference_llama.py``): ``ln_vision`` (a LayerNorm over the
ViT output) is applied *before* the pooler; the pooler drops the class token, reshapes to the
``s x s`` grid, averages non-overlapping ``(s/P) x (s/P)`` blocks, flattens the ``P x P``
result row-major and applies ``Linear -> GELU (exact) -> Linear``. Here the class token is
already dropped by the caller, and the LayerNorm (``cfg.layer_norm``) is part of the adapter.
Because LayerNorm acts per token, normalising before or after dropping the CLS is the same.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.config import ProjectorConfig
from mllm_jax.models.layers import Dense, LayerNorm, get_activation

Array = jax.Array


class MLPProjector(nnx.Module):
    """HF ``LlavaMultiModalProjector``: ``linear_2(act(linear_1(x)))``, bias per ``cfg.bias``;
    ``dtype`` is the compute dtype (params stay float32)."""

    def __init__(self, in_dim: int, out_dim: int, cfg: ProjectorConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        kw = dict(use_bias=cfg.bias, dtype=dtype, rngs=rngs)
        self.linear_1 = Dense(in_dim, out_dim, axes=("embed", "mlp"), **kw)
        self.linear_2 = Dense(out_dim, out_dim, axes=("mlp", "embed"), **kw)
        self.act = get_activation(cfg.hidden_act)

    def __call__(self, x: Array) -> Array:
        """``x: float[B, N, in_dim]`` -> ``float[B, N, out_dim]``."""
        return self.linear_2(self.act(self.linear_1(x)))


def pool_grid(x: Array, side: int, pool: int) -> Array:
    """2-D average pooling of a row-major patch grid: ``float[B, s*s, D]`` -> ``float[B, P*P, D]``
    (``s = side``, ``P = pool``, ``P`` divides ``s``; the mean is taken in float32)."""
    b, n, d = x.shape
    if n != side * side:
        raise ValueError(f"PoolAdapter: got {n} patch tokens, expected grid*grid = {side}*{side} = {side * side} "
                         "(drop the CLS token before the adapter)")
    k = side // pool
    x = x.reshape(b, pool, k, pool, k, d)
    return jnp.mean(x.astype(jnp.float32), axis=(2, 4)).astype(x.dtype).reshape(b, pool * pool, d)


class PoolAdapter(nnx.Module):
    """InfMLLM pool-adapter: LayerNorm -> 2-D average pool of the patch grid -> MLP.

    ``grid`` is the side ``s`` of the ViT patch grid and ``cfg.pool_size`` the output side
    ``P``; ``P`` must divide ``s``. Output token ``i * P + j`` is the average of patch rows
    ``[i*k, (i+1)*k)`` and columns ``[j*k, (j+1)*k)`` with ``k = s / P`` (row-major order,
    so the 2-D position of each visual token is kept).

    Params: ``layer_norm`` (if ``cfg.layer_norm``; INF-MLLM's ``ln_vision``, eps 1e-5),
    ``linear_1 [in_dim, out_dim]``, ``linear_2 [out_dim, out_dim]``.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: int, cfg: ProjectorConfig, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        p = cfg.pool_size
        if p <= 0 or grid % p:
            raise ValueError(
                f"PoolAdapter: pool_size P={p} does not divide the patch grid side s={grid} "
                f"(image_size / patch_size); choose P among the divisors of {grid}")
        self.config, self.grid, self.pool = cfg, grid, p
        self.layer_norm = LayerNorm(in_dim, 1e-5) if cfg.layer_norm else None
        kw = dict(use_bias=cfg.bias, dtype=dtype, rngs=rngs)
        self.linear_1 = Dense(in_dim, out_dim, axes=("embed", "mlp"), **kw)
        self.linear_2 = Dense(out_dim, out_dim, axes=("mlp", "embed"), **kw)
        self.act = get_activation(cfg.hidden_act)

    def pool_grid(self, x: Array) -> Array:
        """Average pooling only: ``float[B, s*s, D]`` -> ``float[B, P*P, D]`` (row-major)."""
        return pool_grid(x, self.grid, self.pool)

    def __call__(self, x: Array) -> Array:
        """``x: float[B, s*s, in_dim]`` patch tokens (no CLS) -> ``float[B, P*P, out_dim]``."""
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        x = self.pool_grid(x)
        return self.linear_2(self.act(self.linear_1(x)))


__all__ = ["MLPProjector", "PoolAdapter", "pool_grid"]
