"""``python -m mllm_jax <command>``: train, eval, generate, convert, demo, plan.

Configs are YAML files of ``ExperimentConfig`` (see ``experiments/configs/``); any field can be
overridden as ``key=value`` after the options (``train.optim.lr=3e-4 data.batch_size=64``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

DESCRIPTION = """\
mllm_jax: multimodal LLMs in JAX / Flax NNX.

commands:
  train     train (or resume) a run; all stages of a multi-stage recipe in order
  eval      eval losses of a run's newest checkpoint
  generate  decode from a checkpoint or a Hugging Face model
  convert   Hugging Face safetensors <-> our checkpoints
  demo      the embedded end-to-end demo (what `make demo` runs)
  plan      size a run on a mesh this machine does not have (params, memory, FLOPs, step time)

`python -m mllm_jax <command> --help` explains each one."""

EPILOG = """\
examples:
  python -m mllm_jax train --config experiments/configs/<name>.yaml train.steps=200 train.optim.lr=3e-4
  python -m mllm_jax train --config experiments/configs/infmllm_3stage.yaml --stage instruct
  python -m mllm_jax plan --config experiments/configs/vila7b_sugar.yaml --mesh 1,256,1 --global-batch 256
multi-host: run the same command on every host (TPU pods discover each other); on GPU clusters
add --coordinator HOST:PORT --num-processes N --process-id I (or MLLM_JAX_COORDINATOR,
MLLM_JAX_NUM_PROCESSES, MLLM_JAX_PROCESS_ID)."""


def _load(args) -> "ExperimentConfig":  # noqa: F821
    from mllm_jax.config import ExperimentConfig, load_config
    return load_config(args.config, ExperimentConfig, overrides=args.overrides)


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="experiment YAML (ExperimentConfig)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=10")


def _add_distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (default: $MLLM_JAX_COORDINATOR etc., or auto-detected on TPU pods / SLURM)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)


def _init_distributed(args) -> None:
    from mllm_jax.train import distributed
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def cmd_train(args) -> int:
    _init_distributed(args)
    from mllm_jax.config import parse_overrides
    from mllm_jax.train.experiment import train_recipe
    results = train_recipe(_load(args), stage=args.stage, overrides=parse_overrides(args.overrides))
    for r in results:
        if r.status == "preempted":
            print(f"preempted at step {int(r.state.step)}; checkpoint in {r.checkpoint_dir}", file=sys.stderr)
            return 128 + (r.signum or 15)
    last = results[-1]
    loss = last.history[-1]["loss"] if last.history else None
    print(json.dumps({"status": "completed", "step": int(last.state.step), "loss": loss,
                      "checkpoint_dir": str(last.checkpoint_dir)}))
    return 0


def cmd_eval(args) -> int:
    _init_distributed(args)
    from mllm_jax.train.experiment import evaluate_checkpoint
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"eval --steps {args.steps}: must be >= 1 (default: train.eval_steps)")
    print(json.dumps(evaluate_checkpoint(_load(args), args.checkpoint, steps=args.steps, overrides=args.overrides)))
    return 0


def cmd_plan(args) -> int:
    from mllm_jax.sharding import ShardingError
    from mllm_jax.train.plan import make_plan
    if args.mesh:
        try:
            mesh = tuple(int(x) for x in args.mesh.split(","))
        except ValueError:
            mesh = ()
        if len(mesh) != 3 or min(mesh) < 1:
            raise SystemExit(f"--mesh {args.mesh!r}: expected data,fsdp,tensor sizes >= 1 (e.g. 1,256,1)")
    else:
        mesh = (1, args.devices, 1)
    try:
        cfg = _load(args)
        # a recipe's base config is no stage's model (what trains, LoRA): plan each stage as it runs
        runs = [(None, cfg)]
        if cfg.stages:
            from mllm_jax.config import parse_overrides
            from mllm_jax.train.stages import stage_configs
            runs = [(s.name, c) for s, c in stage_configs(cfg, args.stage, parse_overrides(args.overrides))]
        elif args.stage is not None:
            raise ValueError(f"--stage {args.stage!r}: the config defines no stages")
        plans = [(name, make_plan(c, mesh, global_batch=args.global_batch, processes=args.processes, mfu=args.mfu,
                                  accelerators=args.accelerators.split(","))) for name, c in runs]
    except ShardingError as e:
        print(f"plan: the mesh {mesh} does not fit the model: {e}", file=sys.stderr)
        return 2
    except ValueError as e:     # --devices / --mfu / --global-batch / --accelerators out of range
        print(f"plan: {e}", file=sys.stderr)
        return 2
    for i, (name, plan) in enumerate(plans):
        print(("\n" if i else "") + (f"== stage {name}\n" if name else "") + plan.to_text())
    return 0


def _delegate(module: str, what: str, argv: Sequence[str]) -> int:
    import importlib
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        print(f"{what}: {module} could not be imported ({e}); is the package installed (make demo)?", file=sys.stderr)
        return 2
    return int(mod.main(list(argv)) or 0)


def cmd_generate(args) -> int:
    return _delegate("mllm_jax.generate_cli", "generate", args.rest)


def cmd_convert(args) -> int:
    from pathlib import Path

    from mllm_jax.convert.hf import flat_params, load_pretrained, save_pretrained
    from mllm_jax.train.checkpoint import Checkpointer
    if args.from_hf:
        if not args.out:
            raise SystemExit("convert --from-hf needs --out CKPT_DIR")
        model = load_pretrained(args.from_hf, gguf_file=args.gguf_file)
        ck = Checkpointer(args.out)
        ck.save_params(0, flat_params(model), config={"converted_from": str(Path(args.from_hf).absolute())})
        ck.close()
        from mllm_jax.models.decoder import Decoder
        from mllm_jax.models.vision import VisionTower
        part = "vision" if isinstance(model, VisionTower) else "decoder" if isinstance(model, Decoder) else None
        # a tower or an LLM alone is one part of an MLLM (an LLM alone also starts an LLM run)
        how = (f"train.init_parts='{{{part}: {args.out}}}' (an MLLM's {part}.* params)" if part == "vision" else
               f"train.init_from={args.out} (an LLM run) or train.init_parts='{{decoder: {args.out}}}' (an MLLM's "
               f"decoder.* params)" if part == "decoder" else f"train.init_from={args.out}")
        print(f"wrote {args.out}/0 ({len(flat_params(model))} arrays); start a run from it with {how}")
        return 0
    if not args.to_hf:
        raise SystemExit("convert --from-run needs --to-hf DIR")
    from mllm_jax.models.lora import merge_lora
    from mllm_jax.train.experiment import restore_run
    state, step = restore_run(args.from_run)
    model = state.model()
    merge_lora(model, remove=True)
    save_pretrained(model, args.to_hf)
    print(f"wrote {args.to_hf} from {args.from_run} step {step}")
    return 0


def cmd_demo(args) -> int:
    return _delegate("mllm_jax.demo", "demo (`make demo`)", args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mllm_jax", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    p = sub.add_parser("train", help="train or resume a run (all stages of a recipe)",
                       description="Train (or resume from the newest good checkpoint in train.run_dir) on "
                                   "the mesh in `mesh` (data/fsdp/tensor; -1 = the remaining devices). "
                                   "Writes config.yaml, metrics.jsonl, tensorboard/ and checkpoints/ under "
                                   "train.run_dir. SIGTERM/SIGINT save a checkpoint and exit with 128+signal.")
    _add_config(p)
    p.add_argument("--stage", help="run only this stage of the config's stages (it starts from the previous "
                                   "stage's checkpoint)")
    _add_distributed(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="eval losses of a checkpoint",
                       description="Restore the newest good checkpoint and report mean eval losses as JSON.")
    _add_config(p)
    p.add_argument("--checkpoint", help="run dir or checkpoint dir (default: the config's train.run_dir)")
    p.add_argument("--steps", type=int, help="eval batches (default: train.eval_steps)")
    _add_distributed(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="decode text from a run or a Hugging Face model (mllm_jax/generate_cli.py)", add_help=False,
                       description="Greedy or sampled decoding with a KV cache; options are those of "
                                   "mllm_jax/generate_cli.py (see `generate --help`).")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("convert", help="Hugging Face safetensors <-> our checkpoints",
                       description="--from-hf DIR --out CKPT_DIR: import an HF model as a step-0 checkpoint "
                                   "that train.init_from can start from. --from-run RUN_DIR --to-hf DIR: export "
                                   "a run's newest params (LoRA merged) as an HF safetensors directory.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="Hugging Face model directory (config.json + safetensors)")
    src.add_argument("--from-run", metavar="RUN_DIR", help="a run directory (config.yaml + checkpoints/)")
    p.add_argument("--gguf-file", help="with --from-hf: a GGUF file inside DIR (dequantised by transformers)")
    p.add_argument("--out", metavar="CKPT_DIR", help="with --from-hf: checkpoint directory to write")
    p.add_argument("--to-hf", metavar="DIR", help="with --from-run: Hugging Face directory to write")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("demo", help="the embedded end-to-end demo (make demo)", add_help=False,
                       description="Runs the end-to-end demo on the synthetic scene world (see mllm_jax/demo.py).")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("plan", help="size a run for a mesh (nothing allocated)",
                       description="Build the abstract train state with jax.eval_shape for a (data, fsdp, tensor) "
                                   "mesh of any size and print parameter counts by module, bytes per device "
                                   "(params, grads, optimizer state, activation estimate), FLOPs per step and the "
                                   "step time at a given MFU on TPU v5p / H100 / H200. Exits 2 if a sharded "
                                   "dimension does not divide its mesh axes.")
    _add_config(p)
    p.add_argument("--mesh", help="data,fsdp,tensor sizes, e.g. 1,256,1")
    p.add_argument("--devices", type=int, default=1, help="shorthand for --mesh 1,N,1")
    p.add_argument("--global-batch", type=int, help="sequences per step over all hosts (default: data.batch_size, "
                                                    "which is per process, times --processes; not with streams, "
                                                    "each stream's data.batch_size sets its batch)")
    p.add_argument("--processes", type=int, help="processes (hosts) of the run: every batch (data's, or each "
                                                 "stream's) is its data.batch_size times this (default 1; not with "
                                                 "--global-batch)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--accelerators", default="tpu-v5p,h100,h200", help="comma-separated keys of flops.ACCELERATORS")
    p.add_argument("--stage", help="with a multi-stage recipe: plan only this stage (default: every stage, each "
                                   "with its own trainable set, LoRA and steps)")
    p.set_defaults(fn=cmd_plan)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command in ("generate", "demo"):
        args.rest, unknown = unknown + args.rest, []
    elif unknown and hasattr(args, "overrides"):
        # argparse takes only the first run of key=value positionals; those after an option come
        # back unknown, in order (they apply after the first run, as typed)
        late = [u for u in unknown if "=" in u and not u.startswith("-")]
        args.overrides = list(args.overrides) + late
        unknown = [u for u in unknown if u not in late]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass
    from mllm_jax.config import ConfigError
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:     # a bad config value or key: the message names it; no traceback
        if args.verbose:
            raise
        print(f"mllm_jax {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
