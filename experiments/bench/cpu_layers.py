"""The CPU forms of the layers' products vs the generic forms, side by side in one run.

    python experiments/bench/cpu_layers.py [--quick]   -> results/cpu_layers.json, results/cpu_layers.md

Forward + backward (value and gradient with respect to every input) of
- a bfloat16 dense layer ``x[B, T, K] @ W[K, N] + b``: the generic form (the 2-D product of
  ``matmul_2d`` on other backends, differentiated by JAX) vs ``layers.matmul_2d`` on CPU
  (``cpu_forms.bf16_matmul``, the custom-VJP bfloat16 GEMM with row-major transposes); in float32 the two
  are the same code;
- attention (GQA, causal): ``layers._attention_einsum`` (two einsums) vs
  ``layers._attention_cpu`` (heads in front as row-major copies, batched GEMMs);
in float32 and bfloat16, at the shapes of train_step.py's ``lm-small`` case (batch 8 x 128
tokens, hidden 256, MLP 704, 8 query / 4 KV heads of 32) and ``lm-base`` (8 x 256, 512, 1408,
8 heads of 64). Best of 5 calls after a warm-up; GFLOP/s counts the matmul FLOPs (3 products of
2MKN for a dense layer; 2 x 3 x 2 B H T S D for attention, the causal half not skipped).
speedup = generic time / CPU-form time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import allocator, allocator_line, warn_if_unset  # noqa: E402
from _timing import best_time  # noqa: E402

SHAPES = {  # name: (batch, tokens, hidden, mlp, heads, kv heads, head dim)
    "lm-small": (8, 128, 256, 704, 8, 4, 32),
    "lm-base": (8, 256, 512, 1408, 8, 8, 64),
}


def run(names) -> list[dict]:
    import jax.numpy as jnp
    import numpy as np

    from mllm_jax.models import layers as L

    cases = []
    for name in names:
        b, t, d, f, h, kvh, hd = SHAPES[name]
        rng = np.random.default_rng(0)
        for dtype in (jnp.float32, jnp.bfloat16):
            dt = jnp.dtype(dtype).name
            x = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
            w = jnp.asarray(rng.normal(size=(d, f)) * d ** -0.5, jnp.float32)
            bias = jnp.zeros((f,), jnp.float32)

            if dtype == jnp.bfloat16:  # in float32 both forms are the same code
                def generic_dense(x, w, bias):  # matmul_2d's form on other backends
                    return (x.reshape(-1, d) @ w.astype(x.dtype) + bias.astype(x.dtype)).reshape(b, t, f)
                dense = {"generic": generic_dense, "cpu": lambda x, w, bias: L.matmul_2d(x, w, bias)}
                ct = jnp.asarray(rng.normal(size=(b, t, f)), jnp.float32)
                times = _fwd_bwd_times(dense, (x, w, bias), ct, diff=3)
                cases.append(_case(name, "dense", dt, f"[{b * t},{d}]x[{d},{f}]", 3 * 2 * b * t * d * f, times))

            q = jnp.asarray(rng.normal(size=(b, t, h, hd)), dtype)
            k = jnp.asarray(rng.normal(size=(b, t, kvh, hd)), dtype)
            v = jnp.asarray(rng.normal(size=(b, t, kvh, hd)), dtype)
            mask = jnp.broadcast_to(L.causal_mask(t)[None], (b, t, t))
            att = {"generic": L._attention_einsum, "cpu": L._attention_cpu}
            ct = jnp.asarray(rng.normal(size=(b, t, h, hd)), jnp.float32)
            times = _fwd_bwd_times(att, (q, k, v, mask), ct, diff=3)
            cases.append(_case(name, "attention", dt, f"B={b} T={t} H={h}/{kvh} D={hd}",
                               3 * 2 * 2 * b * h * t * t * hd, times))
            c = cases[-2:] if dtype == jnp.bfloat16 else cases[-1:]
            print("  ".join(f"{x['name']}: {1e3 * x['generic_s']:.2f} -> {1e3 * x['cpu_s']:.2f} ms "
                            f"({x['speedup']:.2f}x)" for x in c), flush=True)
    return cases


def _fwd_bwd_times(forms: dict, args: tuple, ct, diff: int) -> dict:
    """``{form: seconds}`` for the value and gradient (w.r.t. the first ``diff`` args) of
    ``sum(form(*args) * ct)``; ``ct`` is an argument, a cotangent XLA cannot constant-fold."""
    import jax
    import jax.numpy as jnp
    times = {}
    for form, fn in forms.items():
        g = jax.jit(jax.value_and_grad(lambda ct, *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32) * ct),
                                       argnums=tuple(range(1, diff + 1))))
        times[form] = best_time(g, ct, *args)
    return times


def _case(shape, layer, dtype, dims, flops, times) -> dict:
    return {"name": f"{shape} {layer} {dtype}", "shape": shape, "layer": layer, "dtype": dtype, "dims": dims,
            "generic_s": times["generic"], "cpu_s": times["cpu"], "speedup": times["generic"] / times["cpu"],
            "generic_gflops": flops / times["generic"] / 1e9, "cpu_gflops": flops / times["cpu"] / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the lm-small shapes only")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    warn_if_unset()
    cases = run(["lm-small"] if args.quick else list(SHAPES))
    result = {"cases": cases, "quick": bool(args.quick),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg": [round(x, 2) for x in os.getloadavg()], "allocator": allocator()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_layers.json").write_text(json.dumps(result, indent=2))
    lines = ["# CPU forms of the layers vs the generic forms (forward + backward)", "",
             "| case | dims | generic ms | CPU form ms | speedup | generic GFLOP/s | CPU form GFLOP/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for c in cases:
        lines.append(f"| {c['name']} | {c['dims']} | {1e3 * c['generic_s']:.2f} | {1e3 * c['cpu_s']:.2f} | "
                     f"{c['speedup']:.2f} | {c['generic_gflops']:.0f} | {c['cpu_gflops']:.0f} |")
    lines += ["", f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs, load average "
                  f"{result['machine']['load_avg']}. Best of 5 calls. " + allocator_line()]
    (out / "cpu_layers.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'cpu_layers.json'} and {out / 'cpu_layers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
