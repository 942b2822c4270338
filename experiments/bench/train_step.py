"""Train-step speed: our jitted step against transformers + torch AdamW, same architecture,
config and batch, in the same run.

    python experiments/bench/train_step.py [--quick]     # -> results/train_step.json, .md

Ours: ``mllm_jax.train.loop.make_train_step`` exactly as ``fit`` runs it (TrainState, AdamW,
global-norm clipping, the NaN guard, donated buffers, masked next-token loss in float32).
Reference: the same architecture in transformers (random weights) with ``torch.optim.AdamW``
and ``clip_grad_norm_``: ``LlamaForCausalLM`` for the decoder-only cases, and
``LlavaForConditionalGeneration`` for the MLLM case (run only where ``mllm_jax.models.mllm``
can be imported; until the decoder lands the LM cases use the test suite's Llama-architecture
``ToyLM``, built from the same ``models.layers`` with the same parameter names).

Each side runs in its own subprocesses (peak RSS is then its own), alternating over a few
rounds so that both see the same machine load; each compiles / warms up and times its steps.
Ours is timed as ``fit`` runs it: the next step is dispatched before the previous one's loss is
waited on, and a step's time is the interval between consecutive completions (JAX's async
dispatch hides the Python side of a step behind the previous step's computation; for lm-tiny
that side is ~0.4-0.6 ms of a 6 ms step). The reference's eager step is synchronous.
The reported step time is, on both sides, the best round's mean (a round's wall-clock over its
timed steps / steps: the round least disturbed by other processes on a shared machine; medians
of the single steps are in the JSON too). Not the fastest single step: with the next step
already queued, a completion the host notices late (descheduled on a loaded machine) makes the
next interval short, down to the dispatch alone (measured: 0.7 ms intervals in a 10 ms
lm-tiny step), while a sum over consecutive steps is not fooled. The peak is measured in the
same run, before and after the cases: the best throughput of a large jitted float32 matmul (the
faster of XLA:CPU's YNNPACK and Eigen GEMMs: float32 steps run their dots on Eigen, see
``loop.step_compiler_options``; and torch's, for context). MFU = training FLOPs per step
(``mllm_jax.train.flops``: 6N + attention, counted from the config) / step time / measured peak. ratio = reference time / our time (> 1: ours is
faster). Each case runs in one dtype on both sides: float32, or (``-bf16`` cases) bfloat16
compute with float32 params (ours: the layers' bfloat16 path; the reference: torch.autocast),
with MFU then against the measured bfloat16 matmul peak.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import allocator, allocator_line, warn_if_unset  # noqa: E402

CASES = {
    # name: DecoderConfig fields, batch, sequence length (float32 everywhere)
    "lm-tiny": dict(decoder=dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                                 num_heads=4, num_kv_heads=2), batch=8, seq_len=64),
    "lm-small": dict(decoder=dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_layers=4,
                                  num_heads=8, num_kv_heads=4), batch=8, seq_len=128),
    "lm-base": dict(decoder=dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8,
                                 num_heads=8, num_kv_heads=8), batch=8, seq_len=256),
    "mllm-tiny": dict(decoder=dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_layers=4,
                                   num_heads=8, num_kv_heads=4),
                      vision=dict(image_size=64, patch_size=8, hidden_size=256, intermediate_size=1024,
                                  num_layers=4, num_heads=8), batch=8, seq_len=128, mllm=True),
}
# The same architectures with bfloat16 compute (params float32; ours: ``train.compute_dtype:
# bfloat16``; the reference: torch.autocast("cpu", bfloat16) around forward and loss, as the HF
# Trainer runs ``bf16=True``).
CASES["lm-small-bf16"] = dict(CASES["lm-small"], dtype="bfloat16")
CASES["mllm-tiny-bf16"] = dict(CASES["mllm-tiny"], dtype="bfloat16")
QUICK = ("lm-tiny", "lm-small", "mllm-tiny", "lm-small-bf16")
LR, BETAS, EPS, CLIP = 1e-4, (0.9, 0.999), 1e-8, 1.0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _configs(case: dict):
    from mllm_jax.config import DecoderConfig, MLLMConfig, VisionConfig
    dt = case.get("dtype", "float32")
    dec = DecoderConfig(**case["decoder"], dtype=dt)
    if not case.get("mllm"):
        return dec, None
    return dec, MLLMConfig(vision=VisionConfig(**case["vision"], dtype=dt), decoder=dec, image_token_id=3)


def _timed_pipelined(dispatch, steps: int, warmup: int) -> list[float]:
    """Step times as ``fit`` runs the loop: each step is dispatched before the previous one's
    loss is waited on (JAX's asynchronous dispatch overlaps the Python side of step i + 1 with
    the computation of step i); a step's time is the interval between consecutive completions.
    ``dispatch()`` launches one step and returns an array to wait on."""
    prev = dispatch()
    for _ in range(warmup):
        nxt = dispatch()
        prev.block_until_ready()
        prev = nxt
    prev.block_until_ready()
    last, times = time.perf_counter(), []
    prev = dispatch()
    for _ in range(steps):
        nxt = dispatch()
        prev.block_until_ready()
        now = time.perf_counter()
        times.append(now - last)
        last, prev = now, nxt
    prev.block_until_ready()
    return times


def _timed(step, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


# ---- workers (each in its own process) ------------------------------------------------------------

def worker_ours(case: dict, steps: int) -> dict:
    import jax
    from flax import nnx

    from mllm_jax import sharding as shd
    from mllm_jax.config import OptimConfig
    from mllm_jax.train.loop import jit_train_step, make_train_step, step_compiler_options
    from mllm_jax.train.optim import build_optimizer
    from mllm_jax.train.registry import make_loss_fn, ntp_objective
    from mllm_jax.train.state import create_train_state

    base = _rss_mb()
    dec, mllm = _configs(case)
    if mllm is not None:
        from mllm_jax.models.mllm import MLLM
        model_fn, impl = (lambda: MLLM(mllm, rngs=nnx.Rngs(0))), "mllm_jax.models.mllm.MLLM"
    else:
        try:
            from mllm_jax.models.decoder import Decoder
            model_fn, impl = (lambda: Decoder(dec, rngs=nnx.Rngs(0))), "mllm_jax.models.decoder.Decoder"
        except ImportError:
            from tests.toy import ToyLM
            model_fn, impl = (lambda: ToyLM(dec, rngs=nnx.Rngs(0))), "tests/toy.py ToyLM (decoder not landed)"
    optim = OptimConfig(lr=LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, clip_norm=CLIP, schedule="constant")
    tx, sched = build_optimizer(optim, 1000)
    mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state, shardings = create_train_state(model_fn, tx, optim, mesh, seed=0)
    options = step_compiler_options(state)  # as fit chooses them (train.xla_options unset)
    step = jit_train_step(make_train_step(make_loss_fn(ntp_objective(None)), tx, sched, mesh=mesh), shardings, mesh,
                          options)
    batch = jax.device_put(_batch_np(case, dec, mllm))
    box = [state]

    def dispatch():
        box[0], m = step(box[0], batch)
        return m["loss"]
    times = _timed_pipelined(dispatch, steps, warmup=2)
    return {"step_s": statistics.median(times), "times": times, "impl": impl, "xla_options": options,
            "peak_rss_mb": _rss_mb(), "base_rss_mb": base}


def _batch_np(case, dec, mllm):
    import numpy as np
    rng = np.random.default_rng(0)
    b, t = case["batch"], case["seq_len"]
    ids = rng.integers(8, dec.vocab_size, size=(b, t + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": np.ones((b, t), np.int32),
             "attention_mask": np.ones((b, t), np.int32)}
    if mllm is not None:
        batch["input_ids"][:, :mllm.tokens_per_image] = mllm.image_token_id
        v = mllm.vision
        batch["pixel_values"] = rng.normal(size=(b, 1, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
        batch["image_mask"] = np.ones((b, 1), bool)
    return batch


def worker_ref(case: dict, steps: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    base = _rss_mb()
    dec, mllm = _configs(case)
    batch = _batch_np(case, dec, mllm)
    if mllm is None:
        model = LlamaForCausalLM(LlamaConfig(**dec.to_hf(), attn_implementation="sdpa"))
        inputs = {"input_ids": torch.from_numpy(batch["input_ids"]).long()}
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**mllm.to_hf(), attn_implementation="sdpa"))
        inputs = {"input_ids": torch.from_numpy(batch["input_ids"]).long(),
                  "pixel_values": torch.from_numpy(batch["pixel_values"][:, 0].transpose(0, 3, 1, 2).copy())}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    bf16 = case.get("dtype") == "bfloat16"

    def one():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    times = _timed(one, steps, warmup=2)
    return {"step_s": statistics.median(times), "times": times, "impl": type(model).__name__,
            "torch_threads": torch.get_num_threads(), "peak_rss_mb": _rss_mb(), "base_rss_mb": base}


def worker_peak(n: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
    ab = a.astype(jnp.bfloat16)
    from mllm_jax.train.loop import CPU_FLOAT32_OPTIONS
    f = jax.jit(lambda x, y: x @ y)
    # float32 steps run their dots on Eigen (loop.step_compiler_options): the peak is the faster
    # of XLA:CPU's two float32 GEMMs
    fe = jax.jit(lambda x, y: x @ y, compiler_options=CPU_FLOAT32_OPTIONS)
    fb = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))  # as the bf16 layers run
    jax_ynn_t = min(_timed(lambda: f(a, a).block_until_ready(), 5, warmup=2))
    jax_eigen_t = min(_timed(lambda: fe(a, a).block_until_ready(), 5, warmup=2))
    jax_t = min(jax_ynn_t, jax_eigen_t)
    jax_bt = min(_timed(lambda: fb(ab, ab).block_until_ready(), 5, warmup=2))
    ta = torch.from_numpy(np.asarray(a))
    tb = ta.to(torch.bfloat16)
    torch_t = min(_timed(lambda: ta @ ta, 5, warmup=2))
    torch_bt = min(_timed(lambda: tb @ tb, 5, warmup=2))
    return {"n": n, "jax_flops": 2 * n ** 3 / jax_t, "torch_flops": 2 * n ** 3 / torch_t,
            "jax_ynn_flops": 2 * n ** 3 / jax_ynn_t, "jax_eigen_flops": 2 * n ** 3 / jax_eigen_t,
            "jax_bf16_flops": 2 * n ** 3 / jax_bt, "torch_bf16_flops": 2 * n ** 3 / torch_bt}


# ---- driver -------------------------------------------------------------------------------------

def _run_worker(kind: str, payload: dict, timeout: float = 1800) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device with all cores, as a user's laptop has
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--payload", json.dumps(payload)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"{kind} worker failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    times = [t for r in runs for t in r["times"]]
    # the best round's mean step, not the fastest single step: see the module docstring
    best = min(sum(r["times"]) / len(r["times"]) for r in runs)
    return {"best_s": best, "median_s": statistics.median(times), "impl": runs[0]["impl"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "rss_growth_mb": max(r["peak_rss_mb"] - r["base_rss_mb"] for r in runs)}


def _mllm_available() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("mllm_jax.models.mllm") is not None and \
            importlib.util.find_spec("mllm_jax.models.decoder") is not None
    except ImportError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny cases only, fewer steps")
    ap.add_argument("--steps", type=int, help="timed steps per side (default 10, quick 5)")
    ap.add_argument("--cases", help=f"comma-separated subset of {', '.join(CASES)} (default: all, or --quick's)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--payload", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        p = json.loads(args.payload)
        res = {"ours": lambda: worker_ours(p["case"], p["steps"]), "ref": lambda: worker_ref(p["case"], p["steps"]),
               "peak": lambda: worker_peak(p["n"])}[args.worker]()
        print(json.dumps(res))
        return 0
    warn_if_unset()

    from mllm_jax.train import flops as F

    steps = args.steps or (5 if args.quick else 10)
    rounds = 2 if args.quick else 3
    n = 1536 if args.quick else 2048
    peaks = [_run_worker("peak", {"n": n})]
    cases, skipped = [], []
    names = tuple(c.strip() for c in args.cases.split(",") if c.strip()) if args.cases else \
        (QUICK if args.quick else tuple(CASES))
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; known: {', '.join(CASES)}")
    for name in names:
        case = CASES[name]
        if case.get("mllm") and not _mllm_available():
            skipped.append(f"{name}: mllm_jax.models.mllm / decoder not importable yet")
            continue
        dec, mllm = _configs(case)
        b, t = case["batch"], case["seq_len"]
        fwd = F.mllm_forward_flops(mllm, b, t, b) if mllm else F.decoder_forward_flops(dec, b, t)
        flops = F.train_flops(fwd)
        runs = {"ours": [], "ref": []}
        for _ in range(rounds):  # alternate the sides so that both see the same machine load
            for side in ("ours", "ref"):
                runs[side].append(_run_worker(side, {"case": case, "steps": steps}))
        ours, ref = (_summary(runs[k]) for k in ("ours", "ref"))
        tokens = b * t
        cases.append({
            "name": name, "ours_s": ours["best_s"], "ref_s": ref["best_s"], "ratio": ref["best_s"] / ours["best_s"],
            "mfu": None, "flops_per_step": flops, "tokens_per_step": tokens,
            "ours_median_s": ours["median_s"], "ref_median_s": ref["median_s"],
            "ratio_of_medians": ref["median_s"] / ours["median_s"],
            "ours_tokens_per_s": tokens / ours["best_s"], "ref_tokens_per_s": tokens / ref["best_s"],
            "ours_peak_rss_mb": ours["peak_rss_mb"], "ref_peak_rss_mb": ref["peak_rss_mb"],
            "ours_rss_growth_mb": ours["rss_growth_mb"], "ref_rss_growth_mb": ref["rss_growth_mb"],
            "ours_impl": ours["impl"], "ours_xla_options": runs["ours"][0]["xla_options"],
            "ref_impl": ref["impl"], "batch": b, "seq_len": t,
            "dtype": case.get("dtype", "float32"),
            "steps": steps, "rounds": rounds, "ref_torch_threads": runs["ref"][0].get("torch_threads"),
        })
    peaks.append(_run_worker("peak", {"n": n}))
    peak = {k: max(p[k] for p in peaks) for k in ("jax_flops", "jax_ynn_flops", "jax_eigen_flops", "torch_flops",
                                                  "jax_bf16_flops", "torch_bf16_flops")}
    peak["n"] = n
    for c in cases:
        # MFU against the measured matmul peak of the case's compute dtype
        c["peak_flops"] = peak["jax_bf16_flops" if c["dtype"] == "bfloat16" else "jax_flops"]
        c["mfu"] = c["flops_per_step"] / c["ours_s"] / c["peak_flops"]
        c["ref_mfu"] = c["flops_per_step"] / c["ref_s"] / c["peak_flops"]
        print(f"{c['name']}: ours {c['ours_s'] * 1e3:.1f} ms, ref {c['ref_s'] * 1e3:.1f} ms, ratio {c['ratio']:.2f}, "
              f"MFU {100 * c['mfu']:.1f}% of the measured {c['dtype']} peak", flush=True)

    result = {
        "cases": cases, "skipped": skipped,
        "peak": {"measured_jax_matmul_flops": peak["jax_flops"], "measured_torch_matmul_flops": peak["torch_flops"],
                 "measured_jax_ynn_matmul_flops": peak["jax_ynn_flops"],
                 "measured_jax_eigen_matmul_flops": peak["jax_eigen_flops"],
                 "measured_jax_bf16_matmul_flops": peak["jax_bf16_flops"],
                 "measured_torch_bf16_matmul_flops": peak["torch_bf16_flops"],
                 "matmul_n": peak["n"], "nominal_cpu_flops": F.CPU_PEAK_PER_CORE * (os.cpu_count() or 1)},
        "targets": {"ratio": 1.5, "mfu_of_measured_peak": 0.30},
        # XLA:CPU's intra-op pool has one thread per CPU this process may run on; torch's count is per case
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "python": platform.python_version(),
                    "load_avg": [round(x, 2) for x in os.getloadavg()], "allocator": allocator()},
        "quick": bool(args.quick),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps(result, indent=2))
    (out / "train_step.md").write_text(_markdown(result))
    print(f"wrote {out / 'train_step.json'} and {out / 'train_step.md'}")
    return 0


def _options_cell(options) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in options.items()) if options else "XLA defaults"


def _markdown(r: dict) -> str:
    p = r["peak"]
    lines = ["# Train step: ours (jitted JAX) vs transformers + torch AdamW", "",
             f"Measured matmul peak (n={p['matmul_n']}): float32 JAX {p['measured_jax_matmul_flops'] / 1e9:.1f} "
             f"(the faster of XLA:CPU's YNNPACK {p['measured_jax_ynn_matmul_flops'] / 1e9:.1f} and Eigen "
             f"{p['measured_jax_eigen_matmul_flops'] / 1e9:.1f}), "
             f"torch {p['measured_torch_matmul_flops'] / 1e9:.1f} GFLOP/s; bfloat16 (float32 accumulation) JAX "
             f"{p['measured_jax_bf16_matmul_flops'] / 1e9:.1f}, torch {p['measured_torch_bf16_matmul_flops'] / 1e9:.1f}"
             f" GFLOP/s; nominal CPU table {p['nominal_cpu_flops'] / 1e9:.0f} GFLOP/s. MFU is against the JAX peak of "
             f"the case's dtype. Targets: ratio >= {r['targets']['ratio']}, "
             f"MFU >= {100 * r['targets']['mfu_of_measured_peak']:.0f}% of the measured peak.", "",
             "| case | dtype | ours ms | ref ms | ratio | ours tok/s | ref tok/s | MFU ours | MFU ref | "
             "peak RSS ours / ref MB | ours impl | ours XLA options |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in r["cases"]:
        lines.append(f"| {c['name']} | {c['dtype']} | {1e3 * c['ours_s']:.1f} | {1e3 * c['ref_s']:.1f} | "
                     f"{c['ratio']:.2f} | {c['ours_tokens_per_s']:.0f} | {c['ref_tokens_per_s']:.0f} | "
                     f"{100 * c['mfu']:.1f}% | {100 * c['ref_mfu']:.1f}% | "
                     f"{c['ours_peak_rss_mb']:.0f} / {c['ref_peak_rss_mb']:.0f} | {c['ours_impl']} | "
                     f"{_options_cell(c.get('ours_xla_options'))} |")
    target = r["targets"]["ratio"]
    lines += ["", f"MFU ours would need for ratio {target} against the reference as measured (ratio x MFU ref): "
              + ", ".join(f"{c['name']} {100 * target * c['ref_mfu']:.0f}%" for c in r["cases"])
              + " of the measured matmul peak of the case's dtype. Where the reference already runs near "
              "this machine's peak (oneDNN / MKL matmuls), that is about the peak of a bare matmul, out of reach "
              "for a whole training step."]
    for s in r["skipped"]:
        lines.append(f"\nskipped: {s}")
    lines += ["", f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs, load average "
                  f"{r['machine']['load_avg']} when the run ended. Both sides in the case's dtype (bfloat16: "
                  "params float32, ours with `train.compute_dtype: bfloat16`, the reference under "
                  "`torch.autocast(\"cpu\", torch.bfloat16)`), one process each, the same batch every step; "
                  "the best round's mean step after warm-up, over alternating rounds (ours: completion to completion "
                  "with the next step already dispatched, as `fit` runs; ratio of the single steps' medians: "
                  + ", ".join(f"{c['name']} {c['ratio_of_medians']:.2f}" for c in r["cases"]) + "). Wall-clock on a "
                  "shared machine: noisy. " + allocator_line()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
