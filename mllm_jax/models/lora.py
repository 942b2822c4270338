"""LoRA on regex-selected ``Dense`` layers (merge / unmerge), and learned soft prompts.

    apply_lora(model, LoRAConfig(rank=8, alpha=16, target=r"decoder\\..*(q_proj|v_proj)$"), rngs)
    merge_lora(model)      # kernel += scale * a @ b; forward skips the adapter
    unmerge_lora(model)    # exact inverse up to float rounding

LoRA params are ``LoRAParam`` (a ``nnx.Param`` subclass), so optimisers and freeze masks can
select them by type: ``nnx.All(nnx.Param, nnx.Not(LoRAParam))`` is the frozen base.
``b`` starts at zero, so a freshly attached adapter changes nothing.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from mllm_jax.config import LoRAConfig
from mllm_jax.models.layers import Dense, broadcast_param, make_param, matmul_2d


class LoRAParam(nnx.Param):
    """A LoRA factor (``a`` or ``b``); select with ``nnx.filterlib`` / ``wrt=LoRAParam``."""


class LoRA(nnx.Module):
    """``scale * dropout(x) @ a @ b`` with ``a: float32[in, r]``, ``b: float32[r, out]`` (b = 0 at init)."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
                 dropout: float = 0.0, axes=("embed", "mlp"), rngs: nnx.Rngs):
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.rank, self.scale = rank, alpha / rank
        a_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # torch kaiming(a=sqrt 5)
        self.a = make_param(a_init, (axes[0], "lora_rank"), rngs.params(), (in_features, rank), LoRAParam)
        self.b = make_param(nnx.initializers.zeros_init(), ("lora_rank", axes[1]), rngs.params(),
                            (rank, out_features), LoRAParam)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.merged = False

    def delta(self) -> jax.Array:
        """The merged weight update ``scale * a @ b``: ``float32[in, out]``."""
        return self.scale * (self.a[...] @ self.b[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.merged:
            return jnp.zeros(x.shape[:-1] + (self.b.shape[-1],), x.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        # 2-D products (layers.matmul_2d): plain GEMMs in the backward pass, and on CPU in
        # bfloat16 the native bfloat16 GEMM
        return self.scale * matmul_2d(matmul_2d(x, self.a[...]), self.b[...])


def _path(path) -> str:
    return ".".join(str(p) for p in path)


def iter_dense(model: nnx.Module):
    """Yields ``(dotted_path, Dense)`` for every Dense in ``model``."""
    for path, m in nnx.iter_modules(model):
        if isinstance(m, Dense):
            yield _path(path), m


def apply_lora(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs) -> list[str]:
    """Attaches a LoRA adapter to every Dense whose dotted path matches ``cfg.target``.

    Returns the matched paths; raises if none matched (a typo in the regex is an error, not a
    silent no-op).
    """
    if cfg.rank <= 0:
        return []
    pattern = re.compile(cfg.target)
    matched = []
    for path, dense in list(iter_dense(model)):
        if pattern.search(path):
            if dense.lora is not None:
                raise ValueError(f"{path}: already has a LoRA adapter")
            dense.lora = LoRA(dense.in_features, dense.out_features, rank=cfg.rank, alpha=cfg.alpha,
                              dropout=cfg.dropout, axes=dense.axes, rngs=rngs)
            matched.append(path)
    if not matched:
        names = [p for p, _ in iter_dense(model)]
        raise ValueError(f"LoRA target {cfg.target!r} matched no Dense layer; "
                         f"paths look like: {names[:6]}{' ...' if len(names) > 6 else ''}")
    return matched


def merge_lora(model: nnx.Module, *, remove: bool = False) -> int:
    """Folds each adapter into its kernel. With ``remove`` the adapters are dropped (export),
    also those an earlier ``merge_lora`` already folded in (their kernels are left as they are).
    Returns the number of adapters merged by this call."""
    n = 0
    for _, dense in iter_dense(model):
        lora = dense.lora
        if lora is None:
            continue
        if not lora.merged:
            dense.kernel[...] = dense.kernel[...] + lora.delta()
            lora.merged = True
            n += 1
        if remove:
            dense.lora = None
    return n


def unmerge_lora(model: nnx.Module) -> int:
    """Undoes ``merge_lora`` (for adapters still attached)."""
    n = 0
    for _, dense in iter_dense(model):
        lora = dense.lora
        if lora is None or not lora.merged:
            continue
        dense.kernel[...] = dense.kernel[...] - lora.delta()
        lora.merged = False
        n += 1
    return n


class SoftPrompt(nnx.Module):
    """``num`` learned embedding vectors ``float32[num, dim]`` (VladVA's soft prompts)."""

    def __init__(self, num: int, dim: int, *, init_std: float = 0.02, rngs: nnx.Rngs):
        self.num = num
        self.embedding = make_param(nnx.initializers.normal(init_std), ("prompts", "embed"), rngs.params(), (num, dim))

    def __call__(self, batch: int, dtype=jnp.float32) -> jax.Array:
        """-> ``float[batch, num, dim]``."""
        return broadcast_param(self.embedding[...], (batch,) + self.embedding.shape, dtype)


__all__ = ["LoRAParam", "LoRA", "apply_lora", "merge_lora", "unmerge_lora", "iter_dense", "SoftPrompt"]
