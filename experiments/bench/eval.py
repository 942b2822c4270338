"""Evaluation suite wall-clock: ``run_suite`` on a tiny random MLLM, first run (compiles
included) and second run (warm), per task.

    python experiments/bench/eval.py [--quick]      # -> results/eval.json, results/eval.md

Two tiny models side by side: the data benchmark's tiny config (32 px, pool-adapter to 16
tokens per image, 2-layer 64-d decoder) and the same with the LLaVA MLP projector (64 tokens
per image). ``n`` items per task (200; 50 with ``--quick``), batch 32, the scene world's test
split; the demo's five headline tasks, then the extra ones (interleaved2, composed, rag and,
when pycocoevalcap is installed, caption). A random model never emits a stop token, so every
generation runs to its ``max_new_tokens``: the worst case for the generative tasks. Wall-clock
on whatever machine runs this (a shared machine makes the numbers noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flax import nnx  # noqa: E402

from mllm_jax.config import (DataConfig, DecoderConfig, EmbedConfig, MLLMConfig, ProjectorConfig,  # noqa: E402
                             SceneConfig, VisionConfig)
from mllm_jax.data.synthetic_sets import scene_corpus  # noqa: E402
from mllm_jax.data.tokenize import train_tokenizer  # noqa: E402
from mllm_jax.eval.suite import DEFAULT_TASKS, run_suite  # noqa: E402
from mllm_jax.models.mllm import MLLM  # noqa: E402

VISION = VisionConfig(image_size=32, patch_size=4)
MODELS = {
    "tiny (pool, 16 tok/img)": MLLMConfig(vision=VISION, projector=ProjectorConfig(kind="pool", pool_size=4),
                                          decoder=DecoderConfig(vocab_size=512)),
    "tiny (mlp, 64 tok/img)": MLLMConfig(vision=VISION, projector=ProjectorConfig(kind="mlp"),
                                         decoder=DecoderConfig(vocab_size=512)),
}
DATA = DataConfig(seq_buckets=(64, 128, 256))


def extra_tasks() -> tuple[str, ...]:
    try:
        import pycocoevalcap  # noqa: F401
        return ("interleaved2", "composed", "rag", "caption")
    except ImportError:
        return ("interleaved2", "composed", "rag")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="n=50 items per task instead of 200")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    n = 50 if args.quick else 200
    tok = train_tokenizer(scene_corpus(SceneConfig(), 2000), vocab_size=512)
    res = {"n": n, "batch_size": 32, "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared: noisy)",
           "models": {}}
    for name, cfg in MODELS.items():
        model = MLLM(cfg, rngs=nnx.Rngs(0))
        runs = {}
        for tasks_name, tasks in (("headline", DEFAULT_TASKS), ("extra", extra_tasks())):
            for run in ("cold", "warm"):
                t0 = time.perf_counter()
                out = run_suite(model, tok, DATA, cfg, EmbedConfig(method="prompt"), n=n, tasks=tasks,
                                batch_size=32, progress=False, budget_s=None)
                runs[f"{tasks_name}/{run}"] = {"total_s": round(time.perf_counter() - t0, 2),
                                               "per_task_s": out["details"]["time_s"]}
        res["models"][name] = runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(res, indent=2))
    names = list(res["models"])
    md = [f"# Evaluation suite wall-clock (n={n} per task, batch 32, random tiny models)", "",
          "| run | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in ("headline/cold", "headline/warm", "extra/cold", "extra/warm"):
        md.append(f"| {key} (s) | " + " | ".join(f"{res['models'][m][key]['total_s']:.1f}" for m in names) + " |")
    md += ["", "Per task, seconds (cold / warm):", ""]
    for m in names:
        r = res["models"][m]
        per = {**r["headline/cold"]["per_task_s"], **r["extra/cold"]["per_task_s"]}
        warm = {**r["headline/warm"]["per_task_s"], **r["extra/warm"]["per_task_s"]}
        md.append(f"- {m}: " + ", ".join(f"{t} {per[t]:.1f}/{warm[t]:.1f}" for t in per if t != "total"))
    md += ["", f"headline = {', '.join(DEFAULT_TASKS)} (the demo's keys); extra = {', '.join(extra_tasks())}. "
           "cold includes every jit compile (one per shape bucket); warm reuses them. "
           f"Machine: {res['machine']}."]
    (out / "eval.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
