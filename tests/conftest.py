"""Test setup: 8 fake CPU devices (set before jax is imported), float32 by default."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


@pytest.fixture(scope="session")
def assets_dir():
    """Folder with real weights unpacked by `make assets`; tests marked `real` need it."""
    from pathlib import Path
    d = Path(os.environ.get("MLLM_JAX_ASSETS", "assets"))
    if not d.exists():
        pytest.fail(f"{d} does not exist: run `make assets` (or set MLLM_JAX_ASSETS)")
    return d
