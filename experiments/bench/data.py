"""Data throughput: the scene-world generator and the full grain pipeline (0 and 2 worker
processes) against the rate at which the tiny model's training step consumes samples.

    python experiments/bench/data.py [--quick]      # -> results/data.json, results/data.md

* generator: ``SceneSource`` samples/s on one core (scenes, rendering, texts; the training mix).
* pipeline: ``make_iterator`` batches/s x batch size, after warm-up: decode, validate,
  tokenise, preprocess images, scene-graph + pixel teacher features, bucketed padding.
* step: a jitted forward + backward + AdamW update of the tiny MLLM on a pipeline batch
  (the train loop's step when ``mllm_jax.train.loop`` provides one is not assumed here).

ratio = min(pipeline rates) / step rate; the target is >= 3 (the pipeline is never the
bottleneck). All numbers are wall-clock on whatever machine runs this; on a shared machine
they are noisy, and worker processes compete with the step for the same cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from mllm_jax.config import (DataConfig, DecoderConfig, MLLMConfig, ProjectorConfig, SceneConfig,  # noqa: E402
                             VisionConfig)
from mllm_jax.data.pipeline import make_iterator  # noqa: E402
from mllm_jax.data.synthetic_sets import SceneSource, scene_corpus  # noqa: E402
from mllm_jax.data.teachers import OnlineFeatures, PixelTeacher, SceneGraphTeacher  # noqa: E402
from mllm_jax.data.tokenize import train_tokenizer  # noqa: E402

# The tiny configuration: 32 px images, 8x8 patches pooled to 4x4 = 16 tokens per image,
# a 2-layer 64-d decoder over a 512-token BPE; sequences padded to 64/128/256.
TINY_MODEL = MLLMConfig(vision=VisionConfig(image_size=32, patch_size=4),
                        projector=ProjectorConfig(kind="pool", pool_size=4),
                        decoder=DecoderConfig(vocab_size=512))
TASKS = DataConfig().tasks + ("pair:1", "story:1")
TINY_DATA = DataConfig(batch_size=16, tasks=TASKS, seq_buckets=(64, 128, 256))


def generator_rate(seconds: float) -> float:
    src = SceneSource(SceneConfig(), "train", TINY_DATA.task_weights(), size=10 ** 6)
    src[0]
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(50):
            src[n]
            n += 1
    return n / (time.perf_counter() - t0)


def pipeline_rate(tok, workers: int, batches: int) -> tuple[float, dict]:
    if workers:
        from absl import flags
        flags.FLAGS.mark_as_parsed()
    cfg = DataConfig(**{**TINY_DATA.__dict__, "worker_count": workers})
    teachers = [OnlineFeatures(SceneGraphTeacher()), OnlineFeatures(PixelTeacher())]
    it = make_iterator(cfg, TINY_MODEL, tokenizer=tok, teachers=teachers, shard=(0, 1))
    for _ in range(max(3, 2 * workers + 2)):          # warm-up: worker start, first buffers
        batch = next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * cfg.batch_size / (time.perf_counter() - t0)
    it.close()
    return rate, batch


def step_rate(batch: dict, steps: int) -> tuple[float | None, str]:
    """Samples/s of a jitted forward + backward + AdamW update of the tiny MLLM."""
    try:
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx
        from mllm_jax.models.mllm import MLLM
    except ImportError as e:
        return None, f"no tiny model on this branch ({e}); step not measured"
    model = MLLM(TINY_MODEL, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3)
    opt = tx.init(params)

    def loss_fn(params, b):
        out = nnx.merge(graphdef, params, rest)(b["input_ids"], attention_mask=b["attention_mask"],
                                                pixel_values=b["pixel_values"], image_mask=b["image_mask"])
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, b["labels"][..., None], -1)[..., 0]
        m = b["loss_mask"].astype(jnp.float32)
        return (nll * m).sum() / jnp.maximum(m.sum(), 1.0)

    @jax.jit
    def step(params, opt, b):
        loss, grads = jax.value_and_grad(loss_fn)(params, b)
        upd, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    keys = ("input_ids", "attention_mask", "labels", "loss_mask", "pixel_values", "image_mask")
    b = {k: jnp.asarray(batch[k]) for k in keys}
    params, opt, loss = step(params, opt, b)
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(steps):
        params, opt, loss = step(params, opt, b)
    jax.block_until_ready(loss)
    B, T = batch["input_ids"].shape
    return steps * B / (time.perf_counter() - t0), f"forward+backward+AdamW, B={B}, T={T}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs (noisier numbers)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    seconds, batches, steps = (2.0, 40, 10) if args.quick else (6.0, 150, 40)
    with tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(scene_corpus(SceneConfig(), 2000), d)
    gen = generator_rate(seconds)
    pipe, batch = {}, None
    for w in (0, 2):
        pipe[str(w)], b = pipeline_rate(tok, w, batches)
        batch = batch or b
    step, step_note = step_rate(batch, steps)
    ratio = min(pipe.values()) / step if step else None
    res = {"generator_samples_s": round(gen, 1), "pipeline_samples_s": {k: round(v, 1) for k, v in pipe.items()},
           "step_samples_s": round(step, 1) if step else None, "ratio": round(ratio, 2) if ratio else None,
           "notes": {"step": step_note, "batch_size": TINY_DATA.batch_size, "quick": args.quick,
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared: timings are noisy)",
                     "tokens_per_image": TINY_MODEL.tokens_per_image, "tasks": list(TASKS),
                     "teachers": ["scene_graph", "pixel"]}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(res, indent=2))
    fmt = lambda v: "n/a" if v is None else f"{v:,.0f}"  # noqa: E731
    md = ["# Data throughput (tiny config)", "",
          "| what | samples/s |", "|---|---:|",
          f"| scene-world generator (1 core) | {fmt(gen)} |",
          f"| full pipeline, 0 workers | {fmt(pipe['0'])} |",
          f"| full pipeline, 2 workers | {fmt(pipe['2'])} |",
          f"| tiny train step ({step_note}) | {fmt(step)} |", "",
          f"ratio (slowest pipeline / step) = {'n/a' if ratio is None else f'{ratio:.1f}'} (target >= 3).", "",
          f"Machine: {res['notes']['machine']}. Batch size {TINY_DATA.batch_size}; "
          f"{TINY_MODEL.tokens_per_image} tokens per image; tasks {', '.join(TASKS)}; "
          "scene-graph and pixel teacher features computed online."]
    (out / "data.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
