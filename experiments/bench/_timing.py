"""Timing helper shared by the benchmark scripts."""
from __future__ import annotations

import time


def best_time(f, *args, reps: int = 5) -> float:
    """Seconds of the fastest of ``reps`` calls of ``f(*args)`` after one warm-up call (which
    compiles), each waited for with ``jax.block_until_ready``."""
    import jax
    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return best
