"""Differentiable sequence alignment: soft-DTW, its divergence and the global alignment kernel
as batched, masked, jit/vmap/grad-able JAX ops (anti-diagonal wavefronts), plus the local
kernels and Sugar's target kernels.

Paired (``[B, n, d]`` vs ``[B, m, d]`` -> ``[B]``) and all-pairs (``[P, n, d]`` vs ``[Q, m, d]``
-> ``[P, Q]``) forms; variable lengths through prefix masks; optional bands.
"""
from mllm_jax.align.gak import gak, gak_from_log_kernel, gak_pairwise
from mllm_jax.align.kernels import (cosine_distance, cost_matrix, gak_log_kernel, neg_log_kernel,
                                    pooled_cosine, sigma_gak, sqeuclidean, triple_kernel,
                                    triple_log_kernel)
from mllm_jax.align.softdtw import (softdtw, softdtw_divergence, softdtw_divergence_pairwise,
                                    softdtw_from_cost, softdtw_pairwise)

__all__ = [
    "softdtw", "softdtw_pairwise", "softdtw_from_cost", "softdtw_divergence",
    "softdtw_divergence_pairwise", "gak", "gak_pairwise", "gak_from_log_kernel",
    "sqeuclidean", "cosine_distance", "gak_log_kernel", "neg_log_kernel", "cost_matrix",
    "sigma_gak", "triple_log_kernel", "triple_kernel", "pooled_cosine",
]
