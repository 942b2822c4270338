"""Training-system tests share a persistent XLA compilation cache (in-process and in the
subprocesses they start): many runs compile the same toy step, and recompiling it dominates
their time on CPU. The cache is keyed by the program, jax version and flags, so a hit is the
same executable a fresh compile would give."""
import os
from pathlib import Path

import jax
import pytest

CACHE_DIR = Path(os.environ.get("MLLM_JAX_TEST_JAX_CACHE", Path(__file__).resolve().parents[2] / ".cache" / "jax-tests"))
CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": str(CACHE_DIR),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}

jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def cache_env():
    """Environment variables that give a subprocess the same compilation cache."""
    return dict(CACHE_ENV)
