"""Optax optimisers from ``OptimConfig``: AdamW / SGD / Adafactor, warmup + cosine / linear /
constant schedules, global-norm clipping, weight-decay masks, and freeze masks by regex.

Freezing is structural: ``trainable_filter`` splits the model's params into a trainable part
(differentiated, seen by the optimiser, with optimiser state) and a frozen part (closed over in
the step, no gradient, no optimiser state). Frozen params are therefore bit-identical after
training, and freezing a 7B LLM costs no Adam moments for it.

Common masks (``train.optim.trainable`` / ``frozen`` regexes over dotted param paths):

=====================  ==============================================================
LoRA only              ``trainable: ['\\.lora\\.']``
projector only         ``trainable: ['^projector\\.']``
everything but vision  ``frozen: ['^vision\\.']``
=====================  ==============================================================

Gradient accumulation (``grad_accum``) is done inside the jitted step (``loop.py``), so one
call is one optimiser update and the step counter means the same thing at any accumulation.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import optax
from flax import nnx

from mllm_jax.config import OptimConfig

LORA_ONLY = (r"\.lora\.",)
PROJECTOR_ONLY = (r"^projector\.",)
VISION = (r"^vision\.",)


class FreezeMaskError(ValueError):
    """A trainable/frozen regex matched nothing, or nothing is left to train."""


def path_str(path: Sequence) -> str:
    """``('decoder', 'layers', 0, 'q_proj', 'kernel')`` -> ``'decoder.layers.0.q_proj.kernel'``."""
    return ".".join(str(p) for p in path)


def _matcher(trainable: Sequence[str], frozen: Sequence[str]) -> Callable[[str], bool]:
    t = [re.compile(r) for r in trainable]
    f = [re.compile(r) for r in frozen]
    return lambda p: any(r.search(p) for r in t) and not any(r.search(p) for r in f)


def trainable_filter(cfg: OptimConfig):
    """An ``nnx`` filter ``(path, variable) -> bool`` selecting the trainable ``nnx.Param``s."""
    match = _matcher(cfg.trainable, cfg.frozen)
    return lambda path, var: isinstance(var, nnx.Param) and match(path_str(path))


def check_freeze_mask(param_paths: Sequence[str], cfg: OptimConfig) -> list[str]:
    """Returns the trainable paths; raises if a regex matches no param or nothing trains.

    A typo in a mask must be an error, not a run that silently trains nothing (or everything).
    """
    problems = []
    for kind, pats in (("trainable", cfg.trainable), ("frozen", cfg.frozen)):
        for pat in pats:
            if not any(re.search(pat, p) for p in param_paths):
                problems.append(f"train.optim.{kind} pattern {pat!r} matches no parameter")
    match = _matcher(cfg.trainable, cfg.frozen)
    chosen = [p for p in param_paths if match(p)]
    if not chosen:
        problems.append("no parameter is trainable under train.optim.trainable/frozen")
    if problems:
        sample = ", ".join(list(param_paths)[:8])
        raise FreezeMaskError("; ".join(problems) + f". Param paths look like: {sample} ...")
    return chosen


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine / linear decay to ``lr * min_lr_ratio``
    at ``total_steps`` (or constant)."""
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    end = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        main = optax.constant_schedule(cfg.lr)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def decay_mask(cfg: OptimConfig) -> Callable:
    """``params -> State of bools``: weight decay on params not matching ``cfg.no_decay``."""
    skip = [re.compile(r) for r in cfg.no_decay]

    def mask(params):
        flat = nnx.to_flat_state(params)
        return nnx.from_flat_state([(p, not any(r.search(path_str(p)) for r in skip)) for p, _ in flat])
    return mask


def build_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain for ``cfg`` and its learning-rate schedule (for logging)."""
    sched = make_schedule(cfg, total_steps)
    wd_mask = decay_mask(cfg)
    if cfg.name == "adamw":
        base = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=wd_mask)
    elif cfg.name == "sgd":
        base = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=wd_mask),
                           optax.sgd(sched, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    else:  # adafactor: optax.adafactor's defaults, with the weight decay inside the lr scaling
        # (optax adds weight_decay_rate after it: decay not multiplied by the lr, so the same
        # train.optim.weight_decay decayed ~1/lr times harder than under adamw)
        parts = [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0), optax.scale_by_param_block_rms()]
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=wd_mask))
        base = optax.chain(*parts, optax.scale_by_learning_rate(sched))
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return optax.chain(*parts, base), sched


__all__ = ["FreezeMaskError", "trainable_filter", "check_freeze_mask", "make_schedule", "decay_mask",
           "build_optimizer", "path_str", "LORA_ONLY", "PROJECTOR_ONLY", "VISION"]
