"""Decode throughput: our KV-cache greedy ``generate`` vs transformers ``generate(do_sample=False)``
on the same weights, batch 1 and 8.

    python experiments/bench/decode.py [--quick] [--new-tokens N] [--xla-flags "..."]
        -> results/decode.json, results/decode.md

Cases: (a) a 4-layer 512-d Llama (vocab 32000, GQA 8/4 heads, random weights, untied head);
(b) SmolLM2-135M-Instruct, dequantised from the GGUF asset (``$MLLM_JAX_ASSETS``, default
``assets/``; skipped with a note if absent). Our model is exported with ``save_pretrained`` and
transformers loads that folder, so both run the same float32 weights.

Method: each engine runs in its own fresh process (a JAX thread pool and torch's OpenMP threads
in one process slow each other down), restricted to the same T cores (``sched_setaffinity``,
which sizes XLA's thread pool) with T compute threads (torch ``set_num_threads(T)``; with T = 1
also XLA's single-threaded Eigen dots). ``--threads 1`` is the quick default: on a small machine
shared with other jobs, two spin-waiting threads per engine measure the scheduler more than the
engine; the full run also does T = 2. Prompts are random
ids, unpadded; no stop tokens, so every row generates exactly N tokens. Ours: the first call
compiles (reported as ``compile_s``: first-call time minus a steady call); then the median of
timed calls. transformers: one warm-up call, then the median of timed calls. tok/s =
B * N / median seconds per call (prefill included on both sides). ``floor``: reading every
weight a step uses once (a decode step cannot be faster on these cores). Engines alternate over
rounds and the per-case numbers are medians over rounds; the greedy tokens of the two engines
are compared as a sanity check. Wall-clock numbers on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from _env import allocator, allocator_line, warn_if_unset  # noqa: E402
from _timing import best_time  # noqa: E402

PROMPT_LEN = 16
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- workers (each in a fresh process) --------------------------------------------------------

def _limit_cores(threads: int) -> list[int]:
    """Pins this process to ``threads`` cores (the last ones) before any thread pool exists."""
    cores = sorted(os.sched_getaffinity(0))[-threads:]
    os.sched_setaffinity(0, cores)
    return cores


def _ours_worker(model_dir: str, prompts: dict, n_new: int, reps: int, threads: int, xla_flags: str, out):
    cores = _limit_cores(threads)
    flags = "--xla_cpu_multi_thread_eigen=false" if threads == 1 else ""
    os.environ["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), flags, xla_flags) if x)
    sys.path.insert(0, str(ROOT))
    import jax
    from flax import nnx
    from mllm_jax.convert.hf import load_pretrained
    from mllm_jax.generate import generate
    from mllm_jax.kernels import cpu_matmul
    model = load_pretrained(model_dir)
    # the memory floor of a decode step: reading every weight it uses once (a jitted sum over
    # them); an untied model only gathers B rows of its input embedding
    state = nnx.state(model, nnx.Param)
    if model.lm_head is not None:
        state = {k: v for k, v in state.items() if k != "embed_tokens"}
    params = jax.tree.leaves(state)
    read_all = jax.jit(lambda ps: sum(p.sum() for p in ps))
    res = {"weights_mb": sum(p.nbytes for p in params) / 1e6, "weights_read_s": best_time(read_all, params)}
    # the weight matmuls of one decode step alone, at this batch: x[B, in] @ W for every 2-D
    # weight (the tied embedding as x @ E.T), weights cold as in the loop: where the step's time goes
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    mats = [(v, "embed_tokens" in jax.tree_util.keystr(k)) for k, v in flat if v.ndim == 2]
    ws = [w for w, _ in mats]
    tied = tuple(t for _, t in mats)

    @jax.jit
    def matmuls(ws, xs):
        return [x @ (w.T if t else w) for w, t, x in zip(ws, tied, xs)]

    # the same products through the CPU kernel that generate uses (packed weights)
    kernel = cpu_matmul.unavailable_reason() or "cpu_matmul"
    if kernel == "cpu_matmul":
        wps = jax.jit(lambda ws: [cpu_matmul.pack_transposed(w) if t else cpu_matmul.pack(w)
                                  for w, t in zip(ws, tied)])(ws)
        ns = [w.shape[0] if t else w.shape[1] for w, t in mats]
        kernel_matmuls = jax.jit(lambda wps, xs: [cpu_matmul.matmul(x, wp, n) for wp, n, x in zip(wps, ns, xs)])

    for b in prompts:
        xs = [jax.numpy.ones((b, w.shape[1] if t else w.shape[0]), w.dtype) for w, t in mats]
        res[f"matmul_s_{b}"] = best_time(matmuls, ws, xs)
        if kernel == "cpu_matmul":
            res[f"kernel_matmul_s_{b}"] = best_time(kernel_matmuls, wps, xs)
    res["kernel"] = kernel
    if kernel == "cpu_matmul":
        del wps
    for b, ids in prompts.items():
        ids = jax.device_put(ids)

        def call():
            return np.asarray(generate(model, ids, max_new_tokens=n_new, stop_tokens=()).tokens)
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
        times, toks = [], None
        for _ in range(reps):
            t0 = time.perf_counter()
            toks = call()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        res[b] = dict(seconds=med, all=times, compile_s=max(first - med, 0.0), tokens=toks)
    res["threads"] = f"cores {cores}, XLA_FLAGS={os.environ['XLA_FLAGS']!r}, jax {jax.__version__}"
    out.put(res)


def _torch_worker(model_dir: str, prompts: dict, n_new: int, reps: int, threads: int, out):
    cores = _limit_cores(threads)
    import torch
    import transformers
    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    res = {}
    for b, ids in prompts.items():
        x = torch.tensor(ids, dtype=torch.long)

        def call():
            with torch.no_grad():
                y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                                   min_new_tokens=n_new, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
            return y[:, x.shape[1]:].numpy()
        call()
        times, toks = [], None
        for _ in range(reps):
            t0 = time.perf_counter()
            toks = call()
            times.append(time.perf_counter() - t0)
        res[b] = dict(seconds=statistics.median(times), all=times, tokens=toks)
    res["threads"] = f"cores {cores}, torch.set_num_threads({threads}), torch {torch.__version__}"
    out.put(res)


def _run(target, *args):
    """Runs ``target(*args, queue)`` in a fresh process and returns what it puts on the queue."""
    import queue as queue_mod
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    while True:
        try:
            res = q.get(timeout=5)
            break
        except queue_mod.Empty:
            if not p.is_alive():
                raise RuntimeError(f"{target.__name__} died with exit code {p.exitcode} (see its stderr above)")
    p.join()
    return res


# ---- cases --------------------------------------------------------------------------------------

def random_llama(tmp: Path) -> Path:
    from flax import nnx
    from mllm_jax.config import DecoderConfig
    from mllm_jax.convert.hf import save_pretrained
    from mllm_jax.models.decoder import Decoder
    cfg = DecoderConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=4,
                        num_heads=8, num_kv_heads=4, eos_token_id=None, pad_token_id=0)
    return save_pretrained(Decoder(cfg, rngs=nnx.Rngs(0)), tmp / "llama4x512")


def smollm2(tmp: Path) -> Path | None:
    from mllm_jax.convert.hf import load_pretrained, save_pretrained
    d = Path(os.environ.get("MLLM_JAX_ASSETS", ROOT / "assets")) / "SmolLM2-135M-Instruct"
    if not (d / SMOLLM2_GGUF).exists():
        return None
    return save_pretrained(load_pretrained(d, gguf_file=SMOLLM2_GGUF), tmp / "smollm2")


def bench_case(name: str, model_dir: Path, vocab: int, threads: int, args) -> list[dict]:
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(1, vocab, (b, PROMPT_LEN)).astype(np.int32) for b in (1, 8)}
    ours_runs, ref_runs = [], []
    for _ in range(args.rounds):
        ours_runs.append(_run(_ours_worker, str(model_dir), prompts, args.new_tokens, args.reps, threads,
                              args.xla_flags))
        ref_runs.append(_run(_torch_worker, str(model_dir), prompts, args.new_tokens, args.reps, threads))
    rows = []
    for b in prompts:
        ours_s = statistics.median(r[b]["seconds"] for r in ours_runs)
        ref_s = statistics.median(r[b]["seconds"] for r in ref_runs)
        n_tok = b * args.new_tokens
        match = float(np.mean(ours_runs[-1][b]["tokens"] == ref_runs[-1][b]["tokens"]))
        rows.append(dict(
            name=f"{name} B={b} threads={threads}", batch=b, threads=threads,
            new_tokens=args.new_tokens, prompt_len=PROMPT_LEN,
            ours_tok_s=round(n_tok / ours_s, 1), ref_tok_s=round(n_tok / ref_s, 1),
            ratio=round(ref_s / ours_s, 2),
            ours_ms_per_step=round(1e3 * ours_s / args.new_tokens, 2),
            ref_ms_per_step=round(1e3 * ref_s / args.new_tokens, 2),
            compile_s=round(statistics.median(r[b]["compile_s"] for r in ours_runs), 2),
            weights_mb=round(ours_runs[0]["weights_mb"], 1),
            floor_ms_per_step=round(1e3 * min(r["weights_read_s"] for r in ours_runs), 2),
            matmul_ms_per_step=round(1e3 * min(r[f"matmul_s_{b}"] for r in ours_runs), 2),
            kernel_matmul_ms_per_step=(round(1e3 * min(r[f"kernel_matmul_s_{b}"] for r in ours_runs), 2)
                                       if f"kernel_matmul_s_{b}" in ours_runs[0] else None),
            kernel=ours_runs[0]["kernel"],
            greedy_tokens_match=match,
            ours_threads=ours_runs[0]["threads"], ref_threads=ref_runs[0]["threads"]))
        print(f"{rows[-1]['name']:<34} ours {rows[-1]['ours_tok_s']:>8} tok/s  transformers "
              f"{rows[-1]['ref_tok_s']:>8} tok/s  ratio {rows[-1]['ratio']:.2f}  "
              f"compile {rows[-1]['compile_s']} s  tokens match {match:.2f}", flush=True)
    return rows


def write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "decode.json").write_text(json.dumps(results, indent=2))
    lines = ["# Decode throughput: mllm_jax generate vs transformers generate (greedy, float32)", "",
             f"Machine: {results['machine']}; {results['note']}", "",
             "| case | ours tok/s | transformers tok/s | ratio | ours ms/step | ref ms/step | floor ms/step | "
             "weight matmuls ms/step, XLA dot | same, CPU kernel | ratio bound | first call s | tokens match |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in results["cases"]:
        used = c["kernel_matmul_ms_per_step"] or c["matmul_ms_per_step"]
        lines.append(f"| {c['name']} | {c['ours_tok_s']} | {c['ref_tok_s']} | {c['ratio']} | "
                     f"{c['ours_ms_per_step']} | {c['ref_ms_per_step']} | {c['floor_ms_per_step']} | "
                     f"{c['matmul_ms_per_step']} | {c['kernel_matmul_ms_per_step'] or '-'} | "
                     f"{c['ref_ms_per_step'] / used:.2f} | {c['compile_s']} | "
                     f"{c['greedy_tokens_match']:.2f} |")
    kernels = sorted({c["kernel"] for c in results["cases"]})
    kernel_line = ("our decode loop's weight matmuls ran through mllm_jax.kernels.cpu_matmul (packed "
                   "weights, an XLA FFI custom call)" if kernels == ["cpu_matmul"] else
                   f"CPU kernel not used: {'; '.join(kernels)}; our weight matmuls were XLA's dot")
    lines += [""] + [f"- {s}" for s in results["skipped"]] + [
        f"- {results['settings']}",
        f"- {allocator_line()}",
        f"- {kernel_line}.",
        "- threads: the same number of compute threads for both engines (see `threads` in each case "
        "of decode.json: XLA_FLAGS for ours, torch.set_num_threads for transformers)",
        "- ratio = ours tok/s / transformers tok/s; tok/s counts B x new tokens per call, prefill included.",
        "- floor ms/step: time to read every float32 weight a decode step uses once, on the same cores (a jitted sum over "
        "them), the memory-bandwidth bound of one decode step; ours ms/step / floor shows how close "
        "to it each engine runs.",
        "- weight matmuls ms/step: every weight matrix of a decode step multiplied once by a [B, in] "
        "activation (the tied embedding as x @ E.T), nothing else, weights cold as in the loop; "
        "once with XLA's dot and once with the CPU kernel on its packed weights. At B=1 XLA's "
        "matrix-vector product streams the weights near the floor; at B=8 XLA:CPU's GEMM (YNNPACK by "
        "default; Eigen and oneDNN via XLA_FLAGS measured the same) reads them at about a third of "
        "that bandwidth, which is what the kernel is for.",
        "- ratio bound: ref ms/step / the weight matmuls generate uses (the kernel when available), the "
        "ratio ours would reach if everything but those matmuls (prefill included) took no time.",
        "- first call s: first-call time minus a steady call: compiling, and packing the weights for "
        "the kernel (done once per model)."]
    (out_dir / "decode.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repetitions (< 2 min)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts per engine (default: 1 with --quick, else 1,2)")
    ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for our worker (reported)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    warn_if_unset()
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    args.reps = args.reps or (2 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 2)
    threads = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
    cases, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = [("llama 4x512 (random)", random_llama(tmp), 32000)]
        d = smollm2(tmp)
        if d is None:
            skipped.append(f"SmolLM2-135M skipped: {SMOLLM2_GGUF} not found (run `make assets`, set MLLM_JAX_ASSETS)")
        else:
            models.append(("SmolLM2-135M", d, 49152))
        for t in threads:
            for name, path, vocab in models:
                cases += bench_case(name, path, vocab, t, args)
    results = dict(
        cases=cases, skipped=skipped,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        note="shared machine loaded by other jobs: wall-clock numbers are noisy",
        settings=(f"prompt {PROMPT_LEN} tokens, {args.new_tokens} new tokens, {args.reps} timed calls x "
                  f"{args.rounds} rounds per engine, XLA_FLAGS extra: {args.xla_flags or 'none'}"),
        load_average=os.getloadavg(), allocator=allocator())
    write(results, Path(args.out))
    print(f"wrote {args.out}/decode.json and decode.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
