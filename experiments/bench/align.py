"""Benchmark of the alignment ops (mllm_jax.align) against tslearn and pysdtw, side by side.

    python experiments/bench/align.py [--quick] [--out results]

Writes ``results/align.json``, ``results/align.md`` and ``results/align_scaling.png``.
Every case is value + gradient w.r.t. ``x`` (tslearn: ``SoftDTW.compute/grad`` +
``SquaredEuclidean.jacobian_product``, its own numba kernels, float64, its only precision;
tslearn has no GAK gradient, so its GAK time is value only). Ours runs under ``jax.jit`` after a
warm-up call (compile time reported apart); repetitions of ours and of the references are
interleaved and the minimum is kept, so a shared, loaded machine affects both sides alike.
``ns_per_cell`` is our time per DP cell (pairs x n x m). ``bound_ns_per_cell`` is the time of
the transcendentals our cell update cannot avoid (3 exp + 1 log forward, 3 exp backward for
soft-DTW; 1 exp + 1 log per cell for the GAK local kernel), measured in the same run as a
flat vectorised XLA loop over as many elements: the floor of any exp/log-based soft-DTW.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mllm_jax.align import gak_pairwise, softdtw, softdtw_pairwise  # noqa: E402

from _env import allocator, allocator_line, warn_if_unset  # noqa: E402


# ---- references ------------------------------------------------------------------------------

def tslearn_sdtw_vg(x, y, gamma):
    """Value and gradient w.r.t. x of soft-DTW for each pair (tslearn's numba kernels). The
    backend is named (``be="numpy"``): left to tslearn, it is guessed from ``str(array)``, a
    formatted print of each array on each call (measured: 1.0 ms instead of 0.43 ms per pair at
    n = 32, d = 256)."""
    from tslearn.metrics import SoftDTW, SquaredEuclidean
    out = []
    for a, b in zip(x, y):
        d = SquaredEuclidean(a, b, be="numpy")
        s = SoftDTW(d, gamma=gamma, be="numpy")
        v = s.compute()
        out.append((v, d.jacobian_product(s.grad())))
    return out


def tslearn_sdtw_allpairs_vg(X, Y, gamma):
    return [tslearn_sdtw_vg([a], [b], gamma) for a in X for b in Y]


def tslearn_cdist_gak(X, Y, sigma):
    from tslearn.metrics import cdist_gak
    return cdist_gak(X, Y, sigma=sigma)


def pysdtw_fn(pairwise: bool):
    """pysdtw's CPU soft-DTW (torch + numba) value + grad, or a reason why not."""
    try:
        import pysdtw
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        return None, f"pysdtw not importable ({e}); `pip install pysdtw` (pure Python, needs torch+numba)"

    def run(x, y, gamma):
        sd = pysdtw.SoftDTW(gamma=gamma, use_cuda=False)
        xt = torch.from_numpy(np.asarray(x))
        yt = torch.from_numpy(np.asarray(y))
        if pairwise:  # pysdtw only takes paired batches: expand to all P x Q pairs
            p, q = xt.shape[0], yt.shape[0]
            xt = xt[:, None].expand(p, q, *xt.shape[1:]).reshape(p * q, *xt.shape[1:])
            yt = yt[None].expand(p, q, *yt.shape[1:]).reshape(p * q, *yt.shape[1:])
        xt = xt.clone().requires_grad_(True)
        v = sd(xt, yt).sum()
        v.backward()
        return v.item()
    return run, None


# ---- timing ----------------------------------------------------------------------------------

def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - t


def bound_ns(n_cells: int, dtype, kind: str) -> float:
    """ns per element of the unavoidable transcendentals, as one flat vectorised XLA op."""
    size = min(n_cells, 1 << 22)
    z = jnp.asarray(np.random.default_rng(0).random(size) * 3, dtype)
    if kind == "sdtw":   # forward: 3 exp + 1 log; backward: 3 exp
        f = jax.jit(lambda a: jnp.log(jnp.exp(-a) + jnp.exp(-2 * a) + jnp.exp(-3 * a))
                    + jnp.exp(a) + jnp.exp(0.5 * a) + jnp.exp(0.25 * a))
    else:                # GAK local kernel: 1 exp + 1 log1p/expm1
        f = jax.jit(lambda a: jnp.exp(-a) + jnp.log1p(-jnp.expm1(-a)))
    jax.block_until_ready(f(z))
    best = min(timed(f, z) for _ in range(5))
    return best / size * 1e9


# ---- cases -----------------------------------------------------------------------------------

def make_cases(quick: bool):
    rng = np.random.default_rng(0)

    def arr(*shape, dtype=np.float32):
        return rng.normal(size=shape).astype(dtype)

    cases = []
    x, y = arr(64, 128, 64), arr(64, 128, 64)
    cases.append(dict(name="pairs_n128", dtype="float32", pairs=64, n=128, m=128, d=64,
                      kind="sdtw", gamma=0.1, x=x, y=y,
                      ours=jax.jit(jax.value_and_grad(lambda a, b: softdtw(a, b, 0.1).sum())),
                      tslearn=lambda: tslearn_sdtw_vg(x.astype(np.float64), y.astype(np.float64), 0.1),
                      pysdtw=False))
    X, Y = arr(64, 32, 256), arr(64, 32, 256)
    cases.append(dict(name="allpairs_n32", dtype="float32", pairs=64 * 64, n=32, m=32, d=256,
                      kind="sdtw", gamma=0.1, x=X, y=Y,
                      ours=jax.jit(jax.value_and_grad(
                          lambda a, b: softdtw_pairwise(a, b, 0.1).sum())),
                      tslearn=lambda: tslearn_sdtw_allpairs_vg(X.astype(np.float64),
                                                               Y.astype(np.float64), 0.1),
                      pysdtw=True))
    sigma = float(np.sqrt(2 * 256) * np.sqrt(32) / 4)  # ~ sigma_gak scale for this data
    cases.append(dict(name="gak_allpairs_n32", dtype="float32", pairs=64 * 64, n=32, m=32,
                      d=256, kind="gak", sigma=sigma, x=X, y=Y,
                      ours=jax.jit(jax.value_and_grad(
                          lambda a, b: gak_pairwise(a, b, sigma).sum())),
                      tslearn=lambda: tslearn_cdist_gak(X.astype(np.float64),
                                                        Y.astype(np.float64), sigma),
                      pysdtw=None))
    with jax.enable_x64(True):
        x64, y64 = arr(64, 512, 64, dtype=np.float64), arr(64, 512, 64, dtype=np.float64)
    cases.append(dict(name="pairs_n512_f64", dtype="float64", pairs=64, n=512, m=512, d=64,
                      kind="sdtw", gamma=0.1, x=x64, y=y64, x64=True,
                      ours=jax.jit(jax.value_and_grad(lambda a, b: softdtw(a, b, 0.1).sum())),
                      tslearn=lambda: tslearn_sdtw_vg(x64, y64, 0.1),
                      pysdtw=False))
    return cases


def run_case(c, reps: int):
    with jax.enable_x64(bool(c.get("x64"))):
        x, y = jnp.asarray(c["x"]), jnp.asarray(c["y"])
        compile_s = timed(c["ours"], x, y)
        pys, pys_reason = (None, "pysdtw has no GAK") if c["pysdtw"] is None else \
            pysdtw_fn(c["pysdtw"])
        c["tslearn"]()  # numba warm-up (jit compilation of tslearn's kernels)
        if pys is not None:
            pys(c["x"], c["y"], c["gamma"])
        ours, ts, py = [], [], []
        for _ in range(reps):  # interleaved
            ours.append(timed(c["ours"], x, y))
            ts.append(timed(c["tslearn"]))
            if pys is not None:
                py.append(timed(pys, c["x"], c["y"], c["gamma"]))
        cells = c["pairs"] * c["n"] * c["m"]
        dt = jnp.float64 if c.get("x64") else jnp.float32
        bound = bound_ns(cells, dt, c["kind"])
    res = dict(name=c["name"], dtype=c["dtype"], pairs=c["pairs"], n=c["n"], m=c["m"], d=c["d"],
               ours_s=min(ours), compile_s=compile_s, tslearn_s=min(ts),
               pysdtw_s=min(py) if py else None, ratio_vs_tslearn=min(ts) / min(ours),
               ratio_vs_pysdtw=(min(py) / min(ours)) if py else None,
               ns_per_cell=min(ours) / cells * 1e9, bound_ns_per_cell=bound)
    if not py:
        res["pysdtw_note"] = pys_reason
    if c["kind"] == "gak":
        res["tslearn_note"] = "tslearn has no GAK gradient: its time is the value only"
    return res


def scaling(quick: bool, reps: int):
    """Soft-DTW value + grad vs n (8 pairs, d = 16, float32 ours / float64 tslearn)."""
    ns = [32, 64, 128, 256] if quick else [32, 64, 128, 256, 512, 1024]
    rng = np.random.default_rng(1)
    rows = []
    for n in ns:
        x = rng.normal(size=(8, n, 16)).astype(np.float32)
        y = rng.normal(size=(8, n, 16)).astype(np.float32)
        f = jax.jit(jax.value_and_grad(lambda a, b: softdtw(a, b, 0.1).sum()))
        xj, yj = jnp.asarray(x), jnp.asarray(y)
        compile_s = timed(f, xj, yj)
        tslearn_sdtw_vg(x[:1].astype(np.float64), y[:1].astype(np.float64), 0.1)
        r = 1 if n >= 512 else reps  # the same number of interleaved calls on both sides
        ours_t, ts_t = [], []
        for _ in range(r):
            ours_t.append(timed(f, xj, yj))
            ts_t.append(timed(lambda: tslearn_sdtw_vg(x.astype(np.float64), y.astype(np.float64), 0.1)))
        ours, ts = min(ours_t), min(ts_t)
        cells = 8 * n * n
        rows.append(dict(n=n, ours_s=ours, tslearn_s=ts, compile_s=compile_s,
                         ours_ns_per_cell=ours / cells * 1e9, tslearn_ns_per_cell=ts / cells * 1e9))
        print(f"  scaling n={n}: ours {ours * 1e3:.1f} ms, tslearn {ts * 1e3:.1f} ms", flush=True)
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    n = [r["n"] for r in rows]
    ax.loglog(n, [r["ours_ns_per_cell"] for r in rows], "o-", label="mllm_jax (float32)")
    ax.loglog(n, [r["tslearn_ns_per_cell"] for r in rows], "s-", label="tslearn (float64)")
    ax.set_xlabel("sequence length n = m")
    ax.set_ylabel("ns per DP cell (value + grad)")
    ax.set_title("soft-DTW, 8 pairs, d=16")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(out) -> str:
    m = out["machine"]
    lines = [
        "# Alignment ops benchmark (`experiments/bench/align.py`)", "",
        f"{m['cpu']}, {m['cores']} cores; jax {m['jax']}; load average before/after "
        f"{m['load_before']} / {m['load_after']} (a shared machine: ratios come from "
        f"interleaved repetitions, minimum kept). Value + gradient w.r.t. x; ours under jit, "
        f"compile time apart; tslearn is float64 (its only precision). " + allocator_line(), "",
        "| case | dtype | pairs x n x m x d | ours (ms) | compile (s) | tslearn (ms) | pysdtw (ms) "
        "| x tslearn | x pysdtw | ns/cell | exp/log bound ns/cell |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in out["cases"]:
        py = "n/a" if c["pysdtw_s"] is None else f"{c['pysdtw_s'] * 1e3:.1f}"
        rp = "n/a" if c["ratio_vs_pysdtw"] is None else f"{c['ratio_vs_pysdtw']:.1f}"
        lines.append(
            f"| {c['name']} | {c['dtype']} | {c['pairs']} x {c['n']} x {c['m']} x {c['d']} | "
            f"{c['ours_s'] * 1e3:.1f} | {c['compile_s']:.1f} | {c['tslearn_s'] * 1e3:.1f} | {py} | "
            f"{c['ratio_vs_tslearn']:.1f} | {rp} | {c['ns_per_cell']:.2f} | "
            f"{c['bound_ns_per_cell']:.2f} |")
    notes = sorted({c.get("pysdtw_note", "") for c in out["cases"]} - {""}
                   | {c.get("tslearn_note", "") for c in out["cases"]} - {""})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    if out.get("scaling"):
        lines += ["", "## Scaling (soft-DTW, 8 pairs, d = 16)", "",
                  "| n | ours (ms) | tslearn (ms) | ours ns/cell | tslearn ns/cell |",
                  "|---|---|---|---|---|"]
        for r in out["scaling"]:
            lines.append(f"| {r['n']} | {r['ours_s'] * 1e3:.2f} | {r['tslearn_s'] * 1e3:.1f} | "
                         f"{r['ours_ns_per_cell']:.2f} | {r['tslearn_ns_per_cell']:.1f} |")
        lines += ["", "![scaling](align_scaling.png)"]
    if out.get("analysis"):
        lines += ["", "## Where the time goes", "", out["analysis"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, shorter scaling")
    ap.add_argument("--out", default="results")
    ap.add_argument("--cases", default="", help="comma-separated subset of case names")
    args = ap.parse_args(argv)
    warn_if_unset()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    reps = 2 if args.quick else 5
    load_before = os.getloadavg()
    results = []
    for c in make_cases(args.quick):
        if args.cases and c["name"] not in args.cases.split(","):
            continue
        r = run_case(c, reps)
        results.append(r)
        print(f"{r['name']}: ours {r['ours_s'] * 1e3:.1f} ms (compile {r['compile_s']:.1f} s), "
              f"tslearn {r['tslearn_s'] * 1e3:.1f} ms, x{r['ratio_vs_tslearn']:.1f}, "
              f"{r['ns_per_cell']:.2f} ns/cell (bound {r['bound_ns_per_cell']:.2f})", flush=True)
    rows = scaling(args.quick, reps) if not args.cases else []
    out = dict(cases=results, scaling=rows, quick=args.quick, machine=dict(
        cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
        jax=jax.__version__, allocator=allocator(), load_before=[round(v, 2) for v in load_before],
        load_after=[round(v, 2) for v in os.getloadavg()]))
    analysis = out_dir / "align_analysis.md"
    if analysis.exists():
        out["analysis"] = analysis.read_text()
    (out_dir / "align.json").write_text(json.dumps(out, indent=2))
    (out_dir / "align.md").write_text(markdown(out))
    if rows:
        plot(rows, out_dir / "align_scaling.png")
    print(f"wrote {out_dir / 'align.json'} and {out_dir / 'align.md'}")


if __name__ == "__main__":
    main()
