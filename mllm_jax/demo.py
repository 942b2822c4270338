"""The embedded demo (``make demo``): generative vs contrastive (VladVA) vs Sugar on the scene world.

    python -m mllm_jax demo [--out results] [--quick] [key=value ...]   # overrides on tiny.yaml

1. A byte-level BPE tokenizer is trained on the scene world's corpus (seconds; cached, by the code too).
2. Stage 0 (``mllm_jax/train/vision_pretrain.py``): the ViT is pretrained to predict scene-graph
   facts from pixels (images only), standing in for the CLIP/SigLIP checkpoint every real MLLM
   starts from; written as the MLLM's init checkpoint (``--vision-steps``, cached).
3. Shared stage: the tiny MLLM is pretrained generatively from it (``experiments/configs/tiny.yaml``:
   captions, VQA, POPE, multi-image QA, RAG questions). As in the paper (Sugar starts from the
   generatively trained VILA), the three arms start from this checkpoint. It is cached under
   ``<out>/demo/pretrain`` and reused only when its config hash and the code match.
4. Three arms, the same number of steps, the same trainable parameters and the same number of
   sequences per step (48) each (``ARMS``):
   - ``generative``: more next-token training on the same mix (batch 16) — the baseline;
   - ``contrastive``: the VladVA recipe, InfoNCE between an image view and a caption view of 16
     scenes (each ending in learned soft-prompt slots, the summary token's hidden state as the
     embedding) + next-token loss on 16 long captions;
   - ``sugar``: next-token loss on the mix (16) + alpha * the structure-induced loss on 32
     discriminative samples: the normalised GAK between the MLLM's slice-embedding sequences of
     every two samples is regressed onto the triple kernel of the teachers (scene-graph features
     as the shared image/text space, pixel features for image pairs, the scene graph or, with
     ``--text-teacher minilm``, MiniLM for text pairs). The discriminative batch holds images, captions,
     image-caption pairs and stories, two views of each scene side by side (``paired_views``).
5. Each arm is evaluated on the test split (``mllm_jax.eval.suite``); retrieval for the
   generative model uses its pooled hidden states zero-shot (E5-V summary prompt), as the paper
   compares with VILA. A side-by-side table is printed and written to ``<out>/demo.md``,
   ``<out>/demo.json``; loss curves and similarity matrices (model vs target) to ``<out>/demo/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from mllm_jax.config import EmbedConfig, ExperimentConfig, StreamConfig, apply_updates, config_hash, load_config

log = logging.getLogger("mllm_jax.demo")

CONFIG = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "tiny.yaml"
HEADLINE = ("vqa_acc", "pope_f1", "i2t_r1", "t2i_r1", "hardneg_acc", "interleaved_r1")
SOFT_PROMPTS = 4
# Sugar's settings, tuned on the scene world (METHODS.md leaves alpha, sigma and the batch open):
# sigma 0.5 and alpha 300 both did worse on retrieval; a discriminative stream of images and
# captions alone loses interleaved retrieval (no stories)
SIGMA = 1.0                   # GAK bandwidth of the model's and the target's similarities
ALPHA = 100.0                 # weight of the structure loss
DISC_TASKS = ("image:1", "caption:1", "pair:1", "story:1")
DISC_BATCH = 32

# The arms: config updates on top of the shared stage, and how the evaluation embeds samples.
# Every arm trains the same parameters (train.optim.trainable of tiny.yaml) for the same steps.
ARMS = {
    "generative": dict(updates={"objective.name": "generative"}, streams=("gen",),
                       embed=EmbedConfig(method="prompt")),
    "contrastive": dict(updates={"objective.name": "vladva", "model.contrastive_temperature": 0.05,
                                 "model.num_soft_prompts": SOFT_PROMPTS, "objective.ntp_weight": 0.5},
                        streams=("con", "long"), embed=EmbedConfig(method="prompt")),
    "sugar": dict(updates={"objective.name": "sugar", "model.embed_head": True, "objective.structure_weight": ALPHA,
                           "objective.structure.sigma": SIGMA, "objective.structure.target_sigma": SIGMA},
                  streams=("gen", "disc"), embed=EmbedConfig(alignment="gak", sigma=SIGMA)),
}


def stream_configs(cfg: ExperimentConfig, text_teacher: str) -> dict[str, StreamConfig]:
    """The data streams the arms draw from, derived from the shared stage's ``data``."""
    d = cfg.data
    rep = dataclasses.replace
    return {
        "gen": StreamConfig("gen", d),
        "long": StreamConfig("gen", rep(d, tasks=("caption_long:1",), seed=d.seed + 3)),
        "con": StreamConfig("con", rep(d, tasks=("vladva:1",), seed=d.seed + 2, max_images=1,
                                       soft_prompts=SOFT_PROMPTS, seq_buckets=(48,))),
        # a smaller source than the generative one: the arms see ~5k of its samples, and the
        # MiniLM teacher cache covers the whole source
        # paired_views + in order: each image sample sits in its batch next to a caption of the
        # same scene (and each pair next to a story that starts from its scene): the structure
        # loss sees cross-modal positives among its negatives, as a CLIP batch does
        "disc": StreamConfig("disc", rep(d, tasks=DISC_TASKS, seed=d.seed + 1,
                                         scene=rep(d.scene, train_size=6000), paired_views=True, shuffle=False,
                                         batch_size=DISC_BATCH,
                                         doc_loss=False, teachers=tuple(dict.fromkeys(("scene_graph", "pixel", text_teacher))),
                                         teacher_cache=str(Path(cfg.train.run_dir).parent / "teachers"))),
    }


def arm_config(base: ExperimentConfig, name: str, out: Path, text_teacher: str) -> ExperimentConfig:
    arm = ARMS[name]
    streams = stream_configs(base, text_teacher)
    cfg = apply_updates(base, {**arm["updates"], "train.run_dir": str(out / "demo" / name),
                               "train.init_from": str(out / "demo" / "pretrain"),
                               "train.init_parts": {}})   # the shared stage loaded them; it may have trained them
    cfg = dataclasses.replace(cfg, streams=tuple(streams[s] for s in arm["streams"]))
    if name == "sugar":
        st = dataclasses.replace(cfg.objective.structure, text_teacher=text_teacher)
        cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, structure=st))
    return cfg


def _tokenizer(cfg: ExperimentConfig, out: Path) -> str:
    """The scene world's BPE tokenizer, trained on its corpus; cached by what it depends on: the
    world's version, the scene config, the vocabulary size and the code (the tokenizer trainer
    and the corpus are code: ``code_fingerprint``, as for the trained stages)."""
    from mllm_jax.data.synthetic_sets import scene_corpus
    from mllm_jax.data.tokenize import train_tokenizer
    from mllm_jax.data.synthetic import WORLD_VERSION
    d = out / "demo" / (f"tokenizer-v{WORLD_VERSION}-{config_hash(cfg.data.scene)}-{cfg.model.decoder.vocab_size}"
                        f"-{code_fingerprint()[:8]}")
    if not (d / "tokenizer.json").exists():
        tmp = d.with_name(d.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tok = train_tokenizer(scene_corpus(cfg.data.scene), tmp, vocab_size=cfg.model.decoder.vocab_size)
        if len(tok) > cfg.model.decoder.vocab_size:
            raise ValueError(f"tokenizer has {len(tok)} tokens > model.decoder.vocab_size={cfg.model.decoder.vocab_size}")
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    return str(d)


def _text_teacher(choice: str) -> str:
    """``scene_graph`` (default) or ``minilm`` (needs ``make assets``). On the scene world the
    scene graph is the exact text teacher; MiniLM is the real one, and it scores a caption and
    its hard negative as near-identical (mean cosine on the test split: swap_att 0.994,
    swap_obj 0.990, replace_rel 0.985; the scene graph: 0.50, 0.50, 0.75), so as a text-text
    kernel it teaches the model to blur exactly what the hard-negative test probes."""
    if choice == "scene_graph":
        return choice
    assets = Path(os.environ.get("MLLM_JAX_ASSETS", "assets"))
    if not (assets / "all-MiniLM-L6-v2" / "model.safetensors").exists():
        raise SystemExit(f"--text-teacher minilm: {assets}/all-MiniLM-L6-v2/model.safetensors not found; "
                         "run `make assets` (or set MLLM_JAX_ASSETS)")
    return "minilm"


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A digest of the package's sources (``mllm_jax/**/*.py``, ``*.cc``) and the jax / jaxlib /
    flax / optax versions: the demo's cached stages are reused only by the code that made them. A
    stage cached by an older version (other float rounding, another layer) made a rerun differ
    from a fresh clone's (the vision stage of a run 18 hours older: 37 of 66 params differed)."""
    import flax
    import jax
    import jaxlib
    import optax
    h = hashlib.blake2b(digest_size=8)
    root = Path(__file__).resolve().parent
    for f in sorted(p for ext in ("*.py", "*.cc") for p in root.rglob(ext)):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(f"{jax.__version__}/{jaxlib.__version__}/{flax.__version__}/{optax.__version__}".encode())
    return h.hexdigest()


def _vision_init(cfg: ExperimentConfig, out: Path, steps: int) -> str:
    """Stage 0 (``mllm_jax/train/vision_pretrain.py``): the ViT pretrained on scene-graph labels,
    written as the MLLM's init checkpoint; cached by what it depends on (the code included)."""
    from mllm_jax.train.vision_pretrain import pretrain_vision_init
    key = (f"{config_hash(cfg.model)[:8]}{config_hash(cfg.data.scene)[:8]}-seed{cfg.train.seed}-{steps}"
           f"-{code_fingerprint()[:8]}")
    d = out / "demo" / f"vision-{key}"
    if not (d / "done").exists():
        shutil.rmtree(d, ignore_errors=True)
        log.info("vision pretraining (stage 0, stands in for a CLIP checkpoint): %d steps", steps)
        metrics = pretrain_vision_init(cfg, d, steps=steps)
        (d / "done").write_text(json.dumps(metrics))
    return str(d)


def _train_cached(cfg: ExperimentConfig, parent: Optional[ExperimentConfig] = None):
    """Trains ``cfg`` unless its run dir holds a finished run of the same config (hash) started
    from the same ``parent`` run (an arm's config names the shared stage only by its run dir, so
    a retrained shared stage must invalidate the arms), by the same code (``code_fingerprint``)."""
    from mllm_jax.train.experiment import train
    run = Path(cfg.train.run_dir)
    stamp = run / "config.hash"
    h = config_hash(cfg) + (f"-{config_hash(parent)}" if parent is not None else "") + f"-{code_fingerprint()}"
    if stamp.exists() and stamp.read_text() == h and (run / "checkpoints").exists():
        log.info("reusing %s (config hash %s)", run, h)
        return None
    shutil.rmtree(run, ignore_errors=True)
    res = train(cfg)
    stamp.write_text(h)
    return res


def _restore(cfg: ExperimentConfig):
    from mllm_jax.train.experiment import restore_run
    state, _ = restore_run(cfg.train.run_dir, cfg)
    return state.model()


def _similarity_figure(model, cfg: ExperimentConfig, out: Path) -> Path:
    """Model vs target similarity on a test batch of the discriminative stream."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mllm_jax.data.pipeline import make_iterator
    from mllm_jax.eval.report import plot_similarity
    from mllm_jax.models.mllm import slice_embeddings
    from mllm_jax.objectives.recipes import forward
    from mllm_jax.objectives.structure import model_similarity, target_similarity
    disc = next(s for s in cfg.streams if s.name == "disc").data
    it = make_iterator(dataclasses.replace(disc, split="test", shuffle=False, batch_size=24, teacher_cache=None,
                                           teachers=tuple(t for t in disc.teachers if t != "minilm")), cfg.model)
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    it.close()
    sc = dataclasses.replace(cfg.objective.structure, text_teacher="scene_graph")

    @nnx.jit
    def sims(m, b):
        o = forward(m, b, logits=False)
        e = slice_embeddings(o, b["slice_ids"], b["slice_is_image"], b["slice_mask"].shape[1], head=m.embed_head)
        return model_similarity(e, b["slice_mask"], sc), target_similarity(b, sc)
    s_model, s_target = jax.device_get(sims(model, batch))
    return plot_similarity(np.asarray(s_model), np.asarray(s_target), out / "demo" / "similarity_sugar.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mllm_jax demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results", help="results folder (default: results/)")
    ap.add_argument("--config", default=str(CONFIG), help="the shared stage's config (default: tiny.yaml)")
    ap.add_argument("--pretrain-steps", type=int, help="shared generative stage steps (default: config)")
    ap.add_argument("--vision-steps", type=int, default=1000,
                    help="stage 0: supervised ViT pretraining steps (0, or a train.init_from override: no stage 0)")
    ap.add_argument("--arm-steps", type=int, default=300, help="steps per arm")
    ap.add_argument("--eval-n", type=int, default=300, help="items per evaluation task")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run")
    ap.add_argument("--text-teacher", choices=("scene_graph", "minilm"), default="scene_graph",
                    help="Sugar's text-text kernel: the exact scene graph, or MiniLM from assets/ (make assets)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps, small eval")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="overrides on the config")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t_start = time.perf_counter()
    # the options checked before anything trains (the shared stages take minutes)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known: {list(ARMS)}")
    text_teacher = _text_teacher(args.text_teacher)
    out = Path(args.out)
    (out / "demo").mkdir(parents=True, exist_ok=True)

    from mllm_jax.data.tokenize import TextTokenizer
    from mllm_jax.eval.report import markdown_table, plot_losses, write_json
    from mllm_jax.eval.suite import run_suite

    base = load_config(args.config, ExperimentConfig, overrides=args.overrides)
    steps = args.pretrain_steps if args.pretrain_steps is not None else base.train.steps
    arm_steps, eval_n, vision_steps = args.arm_steps, args.eval_n, args.vision_steps
    if args.quick:
        steps, arm_steps, eval_n = min(steps, 20), min(arm_steps, 10), min(eval_n, 24)
        vision_steps = min(vision_steps, 20)
    tok_dir = _tokenizer(base, out)
    base = apply_updates(base, {"data.tokenizer": tok_dir, "train.steps": steps,
                                "train.run_dir": str(out / "demo" / "pretrain")})
    if vision_steps > 0 and base.train.init_from is None:
        base = apply_updates(base, {"train.init_from": _vision_init(base, out, vision_steps)})
    log.info("shared generative stage: %d steps", steps)
    _train_cached(base)

    results, metrics_files, times = {}, {}, {}
    tok = TextTokenizer.from_dir(tok_dir)
    for name in arms:
        cfg = apply_updates(arm_config(base, name, out, text_teacher), {"train.steps": arm_steps})
        log.info("arm %s: %d steps (%s)", name, arm_steps, cfg.objective.name)
        t0 = time.perf_counter()
        _train_cached(cfg, parent=base)
        model = _restore(cfg)
        t1 = time.perf_counter()
        res = run_suite(model, tok, cfg.data, cfg.model, ARMS[name]["embed"], n=eval_n, mode="loglik")
        times[name] = {"train_s": round(t1 - t0, 1), "eval_s": round(time.perf_counter() - t1, 1)}
        results[name] = res
        metrics_files[name] = Path(cfg.train.run_dir) / "metrics.jsonl"
        if name == "sugar":
            _similarity_figure(model, cfg, out)
    seconds = time.perf_counter() - t_start
    table = markdown_table({a: {k: results[a][k] for k in HEADLINE} for a in arms}, HEADLINE)
    payload = {a: {k: results[a][k] for k in HEADLINE} for a in arms}
    payload["seconds"] = round(seconds, 1)
    write_json(payload, out / "demo.json")
    write_json({"arms": {a: results[a]["details"] for a in arms}, "times": times,
                "config": {a: ARMS[a]["updates"] for a in arms}, "text_teacher": text_teacher},
               out / "demo" / "details.json")
    plot_losses({a: p for a, p in metrics_files.items() if p.exists()}, out / "demo" / "losses.png")
    (out / "demo.md").write_text(f"# Demo: generative vs contrastive (VladVA) vs Sugar\n\n{table}\n"
                                 f"{seconds:.0f} s of training and evaluation; details in demo/details.json.\n")
    print("\n" + table)
    written = [out / "demo.json", out / "demo.md", out / "demo" / "details.json", out / "demo" / "losses.png"]
    written += [out / "demo" / "similarity_sugar.png"] if "sugar" in arms else []
    print(f"training + evaluation: {seconds:.0f} s. Written: {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
