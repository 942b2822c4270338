"""From an ``ExperimentConfig`` to a run: the registry supplies model, loss and data; ``fit``
trains. What the CLI's ``train`` and ``eval`` call, and what scripts call in-process.

    result = train(load_config("experiments/configs/x.yaml", ExperimentConfig))
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
from flax import nnx

from mllm_jax import sharding as shd
from mllm_jax.config import ExperimentConfig
from mllm_jax.train import registry
from mllm_jax.train.loop import FitResult, evaluate, fit, make_eval_step, step_compiler_options
from mllm_jax.train.optim import build_optimizer
from mllm_jax.train.stages import run_stages


def _data(cfg: ExperimentConfig, split: str):
    build = registry.dataset(cfg.data_pipeline)
    return build(cfg, split=split, process_index=jax.process_index(), process_count=jax.process_count())


def train(cfg: ExperimentConfig, *, eval_hooks=(), mesh=None) -> FitResult:
    """Trains one run (one stage) as configured; resumes if its checkpoints exist. ``mesh``
    defaults to ``cfg.mesh`` over all devices."""
    cfg = cfg.resolved()
    spec = registry.model_spec(cfg.model_name)
    eval_data = (lambda: _data(cfg, "eval")) if cfg.train.eval_every else None
    flops = (lambda shapes: spec.forward_flops(cfg, shapes)) if spec.forward_flops else None
    parts = (lambda shapes: spec.flops_parts(cfg, shapes)) if spec.flops_parts else None
    return fit(cfg, lambda: spec.build(cfg, nnx.Rngs(cfg.train.seed)), registry.build_loss_fn(cfg),
               _data(cfg, "train"), eval_data=eval_data, eval_hooks=eval_hooks, forward_flops=flops,
               flops_parts=parts, mesh=mesh)


def train_recipe(cfg: ExperimentConfig, *, stage: Optional[str] = None, mesh=None,
                 overrides: Optional[dict] = None) -> list[FitResult]:
    """All stages of ``cfg.stages`` in order (or one), else the single run. ``overrides``
    (already applied to ``cfg``, e.g. the command line's) are applied again after each stage's
    updates, so that they win over the recipe."""
    if not cfg.stages:
        if stage is not None:
            raise ValueError(f"--stage {stage!r}: the config defines no stages")
        return [train(cfg, mesh=mesh)]
    return run_stages(cfg, lambda c: train(c, mesh=mesh), only=stage, overrides=overrides)


def restore_run(checkpoint: str, cfg: Optional[ExperimentConfig] = None, *, mesh=None):
    """``(TrainState, step)`` of the newest good checkpoint of a run (its ``config.yaml`` unless
    ``cfg`` is given), restored onto ``mesh`` (default: the config's mesh on this machine)."""
    from pathlib import Path

    from mllm_jax.config import load_config
    from mllm_jax.train.checkpoint import Checkpointer, find_checkpoint_dir
    from mllm_jax.train.state import abstract_train_state, shape_only_rngs

    if cfg is None:
        cfg = load_config(Path(checkpoint) / "config.yaml", ExperimentConfig)
    cfg = cfg.resolved()
    spec = registry.model_spec(cfg.model_name)
    mesh = mesh if mesh is not None else shd.make_mesh(*cfg.mesh.shape)
    tx, _ = build_optimizer(cfg.train.optim, max(cfg.train.steps, 1))
    abstract, _ = abstract_train_state(lambda: spec.build(cfg, shape_only_rngs(0)), tx, cfg.train.optim, mesh)
    where = find_checkpoint_dir(checkpoint)
    found = Checkpointer(where, cfg.train.checkpoint, read_only=True).restore(abstract, with_data=False)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {where}")
    state, _, step = found
    return state, step


def evaluate_checkpoint(cfg: ExperimentConfig, checkpoint: Optional[str] = None, *,
                        steps: Optional[int] = None, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Eval losses of the newest good checkpoint in ``checkpoint`` (default: the run's own).

    A recipe's config (``stages``) describes several models, not the one a stage trained: the
    stage's run holds its resolved ``config.yaml``, which is used then (with ``cfg``'s mesh and
    the command line's ``overrides``, e.g. ``eval_data=...``: ``cfg`` has them applied already,
    the stage's config gets them here)."""
    if steps is not None and steps < 1:
        raise ValueError(f"eval steps: {steps}; must be >= 1 (default: train.eval_steps)")
    if cfg.stages:
        import dataclasses
        from pathlib import Path

        from mllm_jax.config import load_config
        run = Path(checkpoint or cfg.train.run_dir)
        run = run if (run / "checkpoints").is_dir() else run.parent
        if not (run / "config.yaml").exists():
            raise FileNotFoundError(f"{run}/config.yaml not found: --checkpoint must name one stage's run "
                                    f"(one of {[str(Path(cfg.train.run_dir) / s.name) for s in cfg.stages]})")
        cfg = dataclasses.replace(load_config(run / "config.yaml", ExperimentConfig, overrides=overrides),
                                  mesh=cfg.mesh)
    cfg = cfg.resolved()
    mesh = shd.make_mesh(*cfg.mesh.shape)
    state, step = restore_run(checkpoint or cfg.train.run_dir, cfg, mesh=mesh)
    step_fn = jax.jit(make_eval_step(registry.build_loss_fn(cfg), mesh),
                      compiler_options=step_compiler_options(state, cfg.train.xla_options))
    out = evaluate(step_fn, state, _data(cfg, "eval"), cfg.train.eval_steps if steps is None else steps, mesh, shd.DEFAULT_RULES)
    return {"step": step, **out}


__all__ = ["train", "train_recipe", "restore_run", "evaluate_checkpoint"]
