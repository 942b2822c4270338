"""The process environment the benchmarks report with their numbers.

XLA:CPU allocates an executable's temporaries afresh on every call; buffers of tens of MB come
straight from ``mmap``, so each call first-touches them page by page (measured: 29,700 minor
page faults = 122 MB per value+gradient call of ``gak_allpairs_n32``, about a quarter of its
time). glibc >= 2.35 backs such allocations with transparent huge pages under
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (354 faults per call). The tunable is read when a
process starts, so it cannot be set from Python: ``make`` exports it for every target (see
BUILD.md), and the benchmark scripts record what they ran with.
"""
from __future__ import annotations

import os
import sys

RECOMMENDED = "glibc.malloc.hugetlb=1"


def allocator() -> str:
    """``GLIBC_TUNABLES`` of this process (``"unset"`` if none)."""
    return os.environ.get("GLIBC_TUNABLES") or "unset"


def allocator_line() -> str:
    """One Markdown sentence for a results file."""
    return (f"Allocator: GLIBC_TUNABLES={allocator()} (`make bench` sets {RECOMMENDED}: XLA:CPU's "
            "per-call temporaries on transparent huge pages; see BUILD.md).")


def warn_if_unset() -> None:
    if RECOMMENDED not in os.environ.get("GLIBC_TUNABLES", ""):
        print(f"note: GLIBC_TUNABLES does not contain {RECOMMENDED}; `make bench` sets it "
              "(XLA:CPU's per-call temporaries then fault in 2 MB pages, not 4 KB ones)",
              file=sys.stderr)
