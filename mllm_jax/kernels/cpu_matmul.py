"""Small-batch float32 matmul for XLA:CPU (decode steps), as an XLA FFI custom call.

A decode step multiplies ``B`` rows (the batch) by every weight matrix. At ``B = 8`` XLA:CPU's
GEMMs stream the weights at about a third of the bandwidth of its matrix-vector product (B = 1),
and those matmuls are most of the step. ``cpu_matmul.cc`` reads each weight matrix once, as
contiguous 48-column panels, for up to 8 rows at a time (see the comment at its top).

Use::

    wp = pack(w)                        # [K, N] -> [ceil(N/48), K, 48], once per weight
    y = matmul(x, wp, n=w.shape[1])     # x: float32[M, K] -> float32[M, N]

``pack_transposed(e)`` packs ``e.T`` (a tied embedding ``[V, D]`` used as ``x @ e.T``) without
materialising the transpose. ``generate`` packs the decoder's weights once per call and the
decode loop's ``Dense``/``Embed.attend`` use them when the step has at most ``MAX_ROWS`` rows.

The library is compiled on first use (``g++``/``c++``/``$CXX``, ``-O3 -march=native``, against
``jax.ffi.include_dir()``) into ``$MLLM_JAX_KERNEL_CACHE`` (default
``~/.cache/mllm_jax/kernels``), keyed by the source, the compiler, jaxlib and the CPU's flags,
written atomically. x86-64 paths: AVX-512 (8-row register blocks) and AVX2 + FMA (2-row
blocks; ``isa()`` says which was built). Elsewhere (no AVX2, not x86-64), with no compiler, or
with ``MLLM_JAX_CPU_KERNELS=0``, ``available()`` is False, ``unavailable_reason()`` says why,
and callers keep XLA's dot. The call has no batching, differentiation or sharding rule: it is for
single-device, inference-time use (``generate`` checks this).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

log = logging.getLogger(__name__)

PANEL = 48          # columns per packed panel (kernel constant kPanel)
MAX_ROWS = 128      # AVX-512: measured faster than XLA's dot up to here (experiments/bench/cpu_matmul.py)
# rows (the product of x's leading dims) for which each path beat XLA's dot there: AVX-512 from
# 1 to 128; AVX2 from 2 to 8 (1.2-2.3x; at 1 row XLA's matrix-vector product is as fast or
# faster, from 16 rows on XLA's GEMM)
ROWS = {"avx512": (1, MAX_ROWS), "avx2": (2, 8)}
TARGET = "mllm_jax_cpu_small_m_matmul"
_SRC = Path(__file__).with_name("cpu_matmul.cc")
_LIB = "libmllm_jax_cpu_matmul.so"


class KernelUnavailable(RuntimeError):
    """The CPU kernel cannot be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    return Path(os.environ.get("MLLM_JAX_KERNEL_CACHE") or Path.home() / ".cache" / "mllm_jax" / "kernels")


def _compiler() -> str:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    raise KernelUnavailable("no C++ compiler found (tried $CXX, g++, c++, clang++)")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _flags() -> list[str]:
    return ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
            f"-I{jax.ffi.include_dir()}"]


def build(force: bool = False) -> Path:
    """Compiles the library (if not cached) and returns its path; raises ``KernelUnavailable``."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailable(f"only x86-64 kernels (AVX-512, AVX2) are implemented (this is {platform.machine()})")
    flags = set(_cpu_flags().split())
    if "avx512f" not in flags and not {"avx2", "fma"} <= flags:
        raise KernelUnavailable("this CPU has neither AVX-512 (avx512f) nor AVX2 + FMA, the paths implemented")
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"{cxx} --version failed: {e}") from None
    key = hashlib.sha256("\0".join([
        _SRC.read_text(), version, jaxlib.__version__,
        " ".join(_flags()), _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / key / _LIB
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *_flags(), str(_SRC), "-o", tmp]
    try:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:   # a compiler that hangs or vanished
            raise KernelUnavailable(f"compiling {_SRC.name} failed ({' '.join(cmd)}): {e}") from None
        if r.returncode != 0:
            raise KernelUnavailable(f"compiling {_SRC.name} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: concurrent builders each write their own temp file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built %s", out)
    return out


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Builds, loads and registers the kernel once per process; returns None or the reason it
    is unavailable."""
    try:
        lib = ctypes.CDLL(str(build()))
    except KernelUnavailable as e:
        return str(e)
    except OSError as e:
        return f"loading the kernel library failed: {e}"
    code = lib.mllm_jax_cpu_matmul_isa() if hasattr(lib, "mllm_jax_cpu_matmul_isa") else 0
    if code not in ISAS:
        return "the kernel library was built without AVX-512 or AVX2 + FMA"
    _ISA[0] = ISAS[code]
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MllmJaxCpuSmallMMatmul), platform="cpu")
    return None


ISAS = {1: "avx512", 2: "avx2"}
_ISA: list = [None]


def isa() -> str | None:
    """The instruction set the loaded kernel was built for ("avx512" or "avx2"), None if it is
    unavailable."""
    return _ISA[0] if unavailable_reason() is None else None


def unavailable_reason() -> str | None:
    """None when the kernel is usable in this process, else why not."""
    if os.environ.get("MLLM_JAX_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by MLLM_JAX_CPU_KERNELS=0"
    return _load()


def available() -> bool:
    reason = unavailable_reason()
    if reason is not None:
        _log_once(reason)
    return reason is None


@functools.lru_cache(maxsize=None)
def _log_once(reason: str) -> None:
    log.info("CPU small-batch matmul kernel not used: %s", reason)


def row_range() -> tuple[int, int]:
    """``(min, max)`` rows the loaded kernel is used for (``ROWS`` of its ``isa()``)."""
    return ROWS.get(isa(), (1, MAX_ROWS))


def applies(x: jax.Array) -> bool:
    """Whether a ``[..., K]`` float32 input has a number of rows the kernel is faster at than
    XLA's dot (``row_range()``; static shapes)."""
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    lo, hi = row_range()
    return x.dtype == jnp.float32 and lo <= rows <= hi


def pack(w: jax.Array) -> jax.Array:
    """``w: float32[K, N]`` -> ``float32[ceil(N/48), K, 48]`` (columns zero-padded)."""
    k, n = w.shape
    p = -(-n // PANEL)
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, p * PANEL - n)))
    return w.reshape(k, p, PANEL).transpose(1, 0, 2)


def pack_transposed(e: jax.Array) -> jax.Array:
    """``pack(e.T)`` for ``e: float32[N, K]`` (e.g. a tied embedding used as ``x @ e.T``)."""
    n, k = e.shape
    p = -(-n // PANEL)
    e = jnp.pad(e.astype(jnp.float32), ((0, p * PANEL - n), (0, 0)))
    return e.reshape(p, PANEL, k).transpose(0, 2, 1)


def matmul(x: jax.Array, wp: jax.Array, n: int) -> jax.Array:
    """``x: float32[..., K]`` @ the packed ``wp`` (of a ``[K, n]`` weight) -> ``float32[..., n]``."""
    if not available():
        raise KernelUnavailable(unavailable_reason())
    lead, k = x.shape[:-1], x.shape[-1]
    if wp.ndim != 3 or wp.shape[1] != k or wp.shape[2] != PANEL or wp.shape[0] != -(-n // PANEL):
        raise ValueError(f"cpu_matmul.matmul: packed weight {wp.shape} does not fit x {x.shape} and n={n} "
                         f"(expected [{-(-n // PANEL)}, {k}, {PANEL}])")
    x2 = x.reshape(math.prod(lead), k).astype(jnp.float32)
    y = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32))(x2, wp)
    return y.reshape(*lead, n)


__all__ = ["PANEL", "MAX_ROWS", "KernelUnavailable", "available", "unavailable_reason", "isa", "ROWS", "row_range", "applies",
           "build", "cache_dir", "pack", "pack_transposed", "matmul"]


def _main() -> int:
    """``python -m mllm_jax.kernels.cpu_matmul``: build the library, say whether it is usable.
    Exit status 0 either way (the kernel is optional)."""
    reason = unavailable_reason()
    if reason is None:
        print(f"mllm_jax CPU matmul kernel: ready, {isa()} (built under {cache_dir()})")
    else:
        print(f"mllm_jax CPU matmul kernel: not used ({reason}); generate keeps XLA's dot")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
