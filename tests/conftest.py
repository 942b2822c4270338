"""Test setup: 8 fake CPU devices (set before jax is imported), float32 by default, and a
persistent XLA compilation cache shared by every test (in-process, in pytest-xdist workers and in
the subprocesses the tests start, ``cache_env``): many tests compile the same small programs, and
compiling dominates a cold run on CPU. The cache is keyed by the program, jax version and flags,
so a hit is the executable a fresh compile would give. ``MLLM_JAX_TEST_JAX_CACHE`` moves it.

XLA's backend (LLVM) optimisation level is 0 for the tests, their subprocesses included (they
inherit ``XLA_FLAGS``) unless ``XLA_FLAGS`` sets it: the tests run tiny programs, so code
generation is most of a cold run (a fresh clone's suite on a 2-core AVX2 EPYC: ~22 % less time
per file measured, 181 -> 138 s for the train-loop and MLLM files). The HLO passes (fusion,
layouts, which dots go to which library) are the same at every level, and the results are
compared against references with tolerances or between runs under the same flags. The library
and the benchmarks keep XLA's default level."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

CACHE_DIR = Path(os.environ.get("MLLM_JAX_TEST_JAX_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "jax-tests"))
CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": str(CACHE_DIR),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


@pytest.fixture
def cache_env():
    """Environment variables that give a subprocess the same compilation cache."""
    return dict(CACHE_ENV)


@pytest.fixture(scope="session")
def assets_dir():
    """Folder with real weights unpacked by `make assets`; tests marked `real` need it."""
    from pathlib import Path
    d = Path(os.environ.get("MLLM_JAX_ASSETS", "assets"))
    if not d.exists():
        pytest.fail(f"{d} does not exist: run `make assets` (or set MLLM_JAX_ASSETS)")
    return d
