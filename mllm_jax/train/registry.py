"""Names in a config -> the code that builds the model, the loss and the data.

``model_name``, ``objective.name`` and ``data_pipeline`` are either a registered name below or
``"pkg.module:attr"`` (so a user's own model, loss or pipeline plugs in without editing this
file). Registered names are import strings too: nothing heavy is imported until used.

    model    -> ModelSpec(build(cfg, rngs) -> nnx.Module, forward_flops(cfg, shapes) -> float)
    objective-> builder(cfg) -> criterion(outputs, batch) -> (loss, {part: value}), or, for
                builders marked ``takes_model`` (objectives/recipes.py), loss_fn(model, batch, rngs)
    data     -> builder(cfg, *, split, process_index, process_count) -> iterator of process-local
                numpy batches with grain's get_state() / set_state(); split is "train" or "eval"
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Optional

import jax
from flax import nnx

from mllm_jax.config import ExperimentConfig
from mllm_jax.train import flops as F


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build a model from an ``ExperimentConfig`` and count its FLOPs.

    ``forward_flops(cfg, shapes)`` gets the global batch's array shapes (``{"input_ids": (B, T),
    "pixel_values": (B, M, H, W, C), ...}``) and returns forward FLOPs; ``None`` falls back to
    ``2 * params * tokens``. ``flops_parts(cfg, shapes)`` (optional) gives the same forward pass
    as ``flops.FlopsPart`` s, so that a run with frozen params counts the backward pass it does
    (``flops.train_flops_of``) instead of 2x forward. ``param_table(cfg)`` lists the params
    without building the model (used by ``plan`` when the model cannot be built here).
    """
    build: Callable[[ExperimentConfig, nnx.Rngs], nnx.Module]
    forward_flops: Optional[Callable[[ExperimentConfig, dict], float]] = None
    param_table: Optional[Callable[[ExperimentConfig], list]] = None
    flops_parts: Optional[Callable[[ExperimentConfig, dict], list]] = None


# ---- the MLLM ----------------------------------------------------------------------------------

def _build_mllm(cfg: ExperimentConfig, rngs: nnx.Rngs) -> nnx.Module:
    from mllm_jax.models.mllm import MLLM  # imports once models/decoder.py has landed
    return MLLM(cfg.model, rngs=rngs)      # attaches cfg.model.lora itself


def _mllm_parts(cfg: ExperimentConfig, shapes: dict) -> list:
    b, t = shapes["input_ids"][:2]
    images = b * shapes["pixel_values"][1] if "pixel_values" in shapes else 0
    return F.mllm_flops_parts(cfg.model, b, t, images)


def _mllm_flops(cfg: ExperimentConfig, shapes: dict) -> float:
    return sum(p.forward for p in _mllm_parts(cfg, shapes))


MLLM_SPEC = ModelSpec(build=_build_mllm, forward_flops=_mllm_flops,
                      param_table=lambda cfg: F.mllm_params(cfg.model), flops_parts=_mllm_parts)

MODELS: dict[str, Any] = {"mllm": "mllm_jax.train.registry:MLLM_SPEC"}
OBJECTIVES: dict[str, Any] = {
    "ntp": "mllm_jax.train.registry:ntp_objective",
    "generative": "mllm_jax.objectives.recipes:generative",
    "sugar": "mllm_jax.objectives.recipes:sugar",
    "vladva": "mllm_jax.objectives.recipes:vladva",
    "contrastive": "mllm_jax.objectives.recipes:contrastive",
}
DATASETS: dict[str, Any] = {"grain": "mllm_jax.train.registry:grain_data"}


def _resolve(table: dict, name: str, what: str):
    target = table.get(name, name)
    if not isinstance(target, str):
        return target
    if ":" not in target:
        raise KeyError(f"{what} {name!r} is not registered (known: {sorted(table)}); "
                       f"or give an import path 'pkg.module:attr'")
    mod, attr = target.split(":", 1)
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ImportError(f"{what} {name!r}: cannot import {mod!r} ({e})") from e
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ImportError(f"{what} {name!r}: module {mod!r} has no {attr!r}") from None
    return obj


def model_spec(name: str) -> ModelSpec:
    obj = _resolve(MODELS, name, "model_name")
    return obj if isinstance(obj, ModelSpec) else ModelSpec(build=obj)


def objective(name: str) -> Callable:
    return _resolve(OBJECTIVES, name, "objective.name")


def dataset(name: str) -> Callable:
    return _resolve(DATASETS, name, "data_pipeline")


def register(table: dict, name: str, target) -> None:
    """``register(MODELS, "my_model", ModelSpec(...))`` (or an import string)."""
    table[name] = target


def grain_data(cfg: ExperimentConfig, *, split: str, process_index: int, process_count: int):
    """The project's grain pipeline (``mllm_jax.data.pipeline``) on ``cfg.data`` for training
    and on ``cfg.eval_data`` (default: ``cfg.data`` on the ``val`` split, unshuffled) for eval.
    Eval reads every row once: ``num_epochs=1`` where it is unset (an eval pass longer than the
    set ends with it) and never ``drop_remainder`` (the last, partial batch is padded with empty
    rows, which every metric gives zero weight). With ``cfg.streams``, a ``MixtureIterator`` over
    them (eval: each on its ``val`` split)."""
    from mllm_jax.data.mixture import MixtureIterator
    from mllm_jax.data.pipeline import make_iterator

    def one(data):
        if split == "eval":
            # one pass: ``evaluate`` stops where the data ends; repeating the set counted rows twice,
            # and dropping the remainder left the last rows of the set (of each process) out
            data = dataclasses.replace(data, num_epochs=data.num_epochs or 1, drop_remainder=False)
        return make_iterator(data, cfg.model, shard=(process_index, process_count) if data.shard_by_process else (0, 1))

    if cfg.streams:  # one batch per stream and step: {name: batch}
        if split == "eval":
            return MixtureIterator({s.name: one(dataclasses.replace(s.data, split="val", shuffle=False))
                                    for s in cfg.streams})
        return MixtureIterator({s.name: one(s.data) for s in cfg.streams})
    data = cfg.data
    if split == "eval":
        data = cfg.eval_data or dataclasses.replace(cfg.data, split="val", shuffle=False)
    return one(data)


# ---- forward + loss ----------------------------------------------------------------------------

def call_with_batch(model: nnx.Module, batch: dict, rngs: Optional[nnx.Rngs] = None):
    """Calls ``model`` with the batch fields its ``__call__`` names as keyword arguments
    (``input_ids``, ``attention_mask``, ``pixel_values``, ...; all of them if it takes
    ``**kwargs``), plus ``rngs`` if it takes one."""
    params = inspect.signature(type(model).__call__).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in batch.items() if takes_all or k in params}
    if "rngs" in params:
        kwargs["rngs"] = rngs
    return model(**kwargs)


def make_loss_fn(criterion: Callable) -> Callable:
    """``criterion(outputs, batch) -> (loss, parts)``  ->  ``loss_fn(model, batch, rngs)``."""
    def loss_fn(model, batch, rngs):
        return criterion(call_with_batch(model, batch, rngs), batch)
    return loss_fn


def logits_of(outputs) -> jax.Array:
    if isinstance(outputs, dict):
        return outputs["logits"]
    return getattr(outputs, "logits", outputs)


def ntp_objective(cfg: Optional[ExperimentConfig]) -> Callable:
    """Masked next-token loss on ``labels`` / ``loss_mask`` (``mllm_jax.objectives.lm``), with
    ``objective.z_loss`` (default 0)."""
    from mllm_jax.objectives.lm import NTP_DENOMINATOR, next_token_loss
    z_loss = float(cfg.objective.z_loss) if cfg is not None else 0.0

    def criterion(outputs, batch):
        return next_token_loss(logits_of(outputs), batch["labels"], batch["loss_mask"], z_loss=z_loss,
                               denominator=batch.get(NTP_DENOMINATOR))
    return criterion


def build_loss_fn(cfg: ExperimentConfig) -> Callable:
    """``loss_fn(model, batch, rngs)``: builders marked ``takes_model`` (the recipes) return it
    directly; the others return ``criterion(outputs, batch)``, called on the model's outputs."""
    builder = objective(cfg.objective.name)
    fn = builder(cfg)
    return fn if getattr(builder, "takes_model", False) else make_loss_fn(fn)


__all__ = ["ModelSpec", "MLLM_SPEC", "MODELS", "OBJECTIVES", "DATASETS", "model_spec", "objective", "dataset", "grain_data",
           "register", "call_with_batch", "make_loss_fn", "logits_of", "ntp_objective",
           "build_loss_fn"]
