"""Hand-written kernels behind XLA FFI custom calls, each with an XLA fallback.

- ``cpu_matmul``: small-batch float32 matmul for XLA:CPU decode steps (AVX-512; compiled on
  first use).
"""
