"""The CPU small-batch matmul kernel vs XLA:CPU's dot, side by side in one run.

    python experiments/bench/cpu_matmul.py [--quick] [--threads 1,2]
        -> results/cpu_matmul.json, results/cpu_matmul.md

``y[M, N] = x[M, K] @ W[K, N]`` for the weight shapes of the decode benchmark's models (the
4x512 Llama's MLP, SmolLM2-135M's MLP and a 6144-wide slice of its tied embedding) and M from 1
to 128 rows (M = decode batch; the generate loop uses the kernel for
``cpu_matmul.row_range()`` rows: 1-128 on AVX-512, 2-8 on AVX2). Weights are cold, as in a decode step: each timed call multiplies
``copies`` different matrices (more bytes than the L3 cache) and the time per matrix is
reported; best of 5 calls. Each thread count runs in its own process pinned to that many cores
(with 1 thread also XLA's single-threaded Eigen dots), as in decode.py. GB/s = weight bytes /
time: the memory-bandwidth view; GFLOP/s = 2 M K N / time: the compute view.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from _env import allocator, allocator_line, warn_if_unset  # noqa: E402
from _timing import best_time  # noqa: E402

SHAPES = {"llama 4x512 gate/up": (512, 1408), "llama 4x512 down": (1408, 512),
          "SmolLM2 gate/up": (576, 1536), "SmolLM2 embedding slice": (576, 6144)}


def _worker(threads: int, rows: list[int], copies_mb: int, out) -> None:
    cores = sorted(os.sched_getaffinity(0))[-threads:]
    os.sched_setaffinity(0, cores)
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from mllm_jax.kernels import cpu_matmul
    reason = cpu_matmul.unavailable_reason()
    if reason:
        out.put({"unavailable": reason})
        return

    cases = []
    for name, (k, n) in SHAPES.items():
        copies = max(4, copies_mb * 2**20 // (4 * k * n))
        ws = [jnp.asarray(np.random.default_rng(i).standard_normal((k, n)), jnp.float32) for i in range(copies)]
        wps = jax.jit(lambda ws: [cpu_matmul.pack(w) for w in ws])(ws)
        xla = jax.jit(lambda x, ws: [x @ w for w in ws])
        ker = jax.jit(lambda x, wps: [cpu_matmul.matmul(x, wp, n) for wp in wps])
        for m in rows:
            x = jnp.ones((m, k), jnp.float32)
            t_xla, t_ker = best_time(xla, x, ws) / copies, best_time(ker, x, wps) / copies
            cases.append(dict(name=f"{name} [{m},{k}]x[{k},{n}] threads={threads}", shape=name, m=m, k=k, n=n,
                              threads=threads, xla_us=round(1e6 * t_xla, 1), kernel_us=round(1e6 * t_ker, 1),
                              speedup=round(t_xla / t_ker, 2),
                              xla_gb_s=round(4 * k * n / t_xla / 1e9, 1), kernel_gb_s=round(4 * k * n / t_ker / 1e9, 1),
                              kernel_gflop_s=round(2 * m * k * n / t_ker / 1e9, 1)))
            print(f"{cases[-1]['name']:<52} XLA {cases[-1]['xla_us']:>8} us  kernel {cases[-1]['kernel_us']:>8} us"
                  f"  speedup {cases[-1]['speedup']:.2f}", flush=True)
        del ws, wps
    out.put({"cases": cases, "cores": cores, "jax": jax.__version__})


def _run(*args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_matmul.json").write_text(json.dumps(results, indent=2))
    lines = ["# CPU small-batch matmul kernel vs XLA:CPU dot (float32, cold weights)", "",
             f"Machine: {results['machine']}", ""]
    if results.get("unavailable"):
        lines.append(f"Kernel unavailable here: {results['unavailable']}")
    else:
        lines += ["| case | XLA us | kernel us | speedup | XLA GB/s | kernel GB/s | kernel GFLOP/s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['name']} | {c['xla_us']} | {c['kernel_us']} | {c['speedup']} | {c['xla_gb_s']} | "
                  f"{c['kernel_gb_s']} | {c['kernel_gflop_s']} |" for c in results["cases"]]
    lines += ["", f"- {allocator_line()}",
              f"- generate uses the kernel ({results['isa']}) for calls of {results['rows'][0]} to {results['rows'][1]} rows.",
              "- speedup = XLA time / kernel time; weights cold (more matrices per call than fit in L3)."]
    (out / "cpu_matmul.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 thread, rows 1/8/64 (< 1 min)")
    ap.add_argument("--threads", default=None, help="comma-separated (default: 1 with --quick, else 1,2)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    warn_if_unset()
    threads = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
    rows = [1, 8, 64] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128]
    from mllm_jax.kernels import cpu_matmul
    results = dict(cases=[], machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{platform.platform()}", allocator=allocator(),
                   isa=cpu_matmul.isa(), rows=list(cpu_matmul.row_range()))
    for t in threads:
        res = _run(t, rows, 96 if args.quick else 192)
        if "unavailable" in res:
            results["unavailable"] = res["unavailable"]
            break
        results["cases"] += res["cases"]
    write(results, Path(args.out))
    print(f"wrote {args.out}/cpu_matmul.json and cpu_matmul.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
