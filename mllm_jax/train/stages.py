"""Multi-stage recipes as configs, each stage starting from the previous stage's checkpoint.

A recipe is ``ExperimentConfig.stages``: a tuple of ``StageConfig(name, updates)`` where
``updates`` are dotted-key config changes (what trains, which data, which LoRA, how long).
Stage ``k`` runs in ``<train.run_dir>/<name>`` with ``train.init_from`` set to stage ``k-1``'s
run dir, so its params start where the last stage ended (its optimiser starts fresh). Running
the recipe again after an interruption resumes the stage that was running; finished stages
are restored and return at once.

``load_params_into`` does the hand-over and checks it strictly: every param of the new model
must be in the checkpoint except new adapters (LoRA factors, soft prompts), which keep their
fresh init (LoRA's ``b`` starts at zero, so nothing changes); a LoRA adapter in the checkpoint
that the new model does not have is merged into its base kernel (``kernel += alpha/rank *
a @ b``, with alpha and rank from the saved config); anything else is an error naming it.
``train.init_fresh`` (regexes) names params that keep their fresh init whatever the checkpoint
has: InfMLLM's stage 1 puts a new pool-adapter between the ViT and LLM of a converted LLaVA.
``train.init_parts`` (``{part: dir}``) starts the params under ``<part>.`` from a checkpoint of
that part (a converted CLIP tower, a converted LLM), checked the same way: stage 1 from a ViT
and an LLM saved separately. Only the first stage loads them; later ones start from the last
(a chained stage clears the ``init_parts`` of the base config and of the command line, and
refuses one its own updates set: it would be ignored). ``train.init_fresh`` of the base config or
the command line is likewise the first stage's: a chained stage keeps only one its own updates set
(the params it names were trained by the previous stage).

InfMLLM's three stages (METHODS.md §3) — ViT ``vision.*``, pool-adapter ``projector.*``,
LLM ``decoder.*``:

=======================  =========  ============  ============================  =====================
stage                    ViT        adapter       LLM                           data
=======================  =========  ============  ============================  =====================
1 ``align``              frozen     trained       frozen                        image-caption pairs
2 ``multitask``          trained    trained       frozen + LoRA on q, v         VQA / caption / grounding
3 ``instruct``           frozen     trained       full (or LoRA by config)      instruction mix
=======================  =========  ============  ============================  =====================
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax.config import ConfigError, ExperimentConfig, StageConfig, apply_updates
from mllm_jax.convert.hf import flat_params
from mllm_jax.train.checkpoint import Checkpointer
from mllm_jax.train.optim import LORA_ONLY, PROJECTOR_ONLY, VISION
from mllm_jax.train.state import TrainState, unflatten_like

log = logging.getLogger(__name__)

NEW_ADAPTERS = (r"\.lora\.(a|b)$", r"(^|\.)soft_prompt\.", r"^embed_head\.", r"^logit_(scale|bias)$")
_LORA = re.compile(r"^(.*)\.lora\.(a|b)$")


class StageHandoverError(ValueError):
    """The checkpoint a stage starts from does not fit the stage's model."""


# ---- recipes ------------------------------------------------------------------------------------

def infmllm_stages(*, steps: Sequence[int] = (1000, 2000, 2000), lr: Sequence[float] = (1e-3, 1e-4, 2e-5),
                   data: Sequence[dict] = ({}, {}, {}), lora_rank: int = 8, lora_alpha: float = 16.0,
                   stage3_lora: bool = False) -> tuple[StageConfig, ...]:
    """InfMLLM's recipe. ``data[k]`` are stage ``k``'s data updates (e.g. ``{"data.tasks":
    ["caption_short:1", "caption_long:1"]}``). ``stage3_lora`` keeps training the stage-2 LoRA
    (plus the adapter) in stage 3 instead of fine-tuning the whole LLM (into which the LoRA is
    then merged)."""
    lora_qv = r"decoder\..*(q_proj|v_proj)$"
    # stage 1 trains a new adapter: from train.init_from (a pretrained ViT + LLM) it takes the
    # rest, whatever projector that checkpoint has
    stage1 = {"train.optim.trainable": list(PROJECTOR_ONLY), "train.optim.frozen": [], "model.lora.rank": 0,
              "train.init_fresh": list(PROJECTOR_ONLY)}
    stage2 = {"train.optim.trainable": [*VISION, *PROJECTOR_ONLY, *LORA_ONLY], "train.optim.frozen": [],
              "model.lora.rank": lora_rank, "model.lora.alpha": lora_alpha, "model.lora.target": lora_qv}
    if stage3_lora:
        stage3 = {"train.optim.trainable": [*PROJECTOR_ONLY, *LORA_ONLY], "train.optim.frozen": [],
                  "model.lora.rank": lora_rank, "model.lora.alpha": lora_alpha, "model.lora.target": lora_qv}
    else:
        stage3 = {"train.optim.trainable": [*PROJECTOR_ONLY, r"^decoder\."], "train.optim.frozen": [],
                  "model.lora.rank": 0}
    out = []
    for i, (name, upd) in enumerate((("align", stage1), ("multitask", stage2), ("instruct", stage3))):
        out.append(StageConfig(name, {**upd, "train.steps": steps[i], "train.optim.lr": lr[i], **data[i]},
                               init_from_previous=i > 0))
    return tuple(out)


def _sets_train_field(updates: dict, field: str) -> bool:
    """Whether ``updates`` (``{"a.b": value}``, as ``apply_updates`` takes them) set
    ``train.<field>``: by that key, in a mapping for ``train``, or with a whole ``train``."""
    for key, value in updates.items():
        key = key.strip()
        if key == f"train.{field}":
            return True
        if key == "train" and (dataclasses.is_dataclass(value) or
                               isinstance(value, dict) and field in {str(k) for k in value}):
            return True
    return False


def stage_config(base: ExperimentConfig, stage: StageConfig, previous_run_dir: Optional[str],
                 overrides: Optional[dict] = None) -> ExperimentConfig:
    """The config one stage runs with (its own run dir, its init from the previous stage).
    ``overrides`` (``{"a.b": value}``, e.g. the command line's) apply after the stage's updates:
    what the user typed wins over the recipe.

    A stage that starts from the previous one (``init_from_previous`` and a previous run dir)
    runs with ``train.init_parts`` empty: an ``init_parts`` of ``base`` or of ``overrides`` (the
    command line's, which apply to every stage of a recipe) is the first stage's. One set by the
    stage's own updates (and not replaced by ``overrides``) is a ``ConfigError``: it would be
    ignored."""
    cfg = apply_updates(dataclasses.replace(base, stages=()), stage.updates, overrides or {})
    chained = bool(stage.init_from_previous and previous_run_dir)
    # a stage that starts from the previous one takes all its params from there (train.init_parts,
    # the pretrained parts the first stage started from, would undo what that stage trained)
    if chained and cfg.train.init_parts:
        if _sets_train_field(stage.updates, "init_parts") and not (
                overrides and _sets_train_field(overrides, "init_parts")):
            raise ConfigError(
                f"stage {stage.name!r}: train.init_parts={dict(cfg.train.init_parts)} is set by its updates, "
                f"but the stage starts from the previous stage's run ({previous_run_dir}), which holds all its "
                f"params: only the first stage of a recipe, or a stage with init_from_previous: false, loads "
                f"train.init_parts (a chained stage clears the base config's). Set it on the first stage or the "
                f"base config, or set init_from_previous: false on stage {stage.name!r}")
    # likewise train.init_fresh, unless the stage sets its own: the previous stage trained them
    fresh = () if chained and not _sets_train_field(stage.updates, "init_fresh") else cfg.train.init_fresh
    train = dataclasses.replace(cfg.train, run_dir=str(Path(base.train.run_dir) / stage.name),
                                init_from=previous_run_dir if chained else cfg.train.init_from,
                                init_parts={} if chained else cfg.train.init_parts, init_fresh=fresh,
                                checkpoint=dataclasses.replace(cfg.train.checkpoint, dir=None))
    return dataclasses.replace(cfg, name=f"{base.name}/{stage.name}", train=train)


def stage_configs(cfg: ExperimentConfig, only: Optional[str] = None,
                  overrides: Optional[dict] = None) -> list[tuple[StageConfig, ExperimentConfig]]:
    """``(stage, its config)`` for every stage of ``cfg.stages`` in order (or just ``only``),
    each initialised from the previous stage's run dir; ``overrides`` as in ``stage_config``.
    Every stage's config is built, so a typo in stage 3 fails before stage 1 runs."""
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stages: names must be unique, got {names}")
    if only is not None and only not in names:
        raise ConfigError(f"--stage {only!r}: no such stage; the recipe has {names}")
    out, prev = [], None
    for stage in cfg.stages:
        out.append((stage, stage_config(cfg, stage, prev, overrides)))
        prev = out[-1][1].train.run_dir
    return [(stage, scfg) for stage, scfg in out if only in (None, stage.name)]


def run_stages(cfg: ExperimentConfig, run_one: Callable[[ExperimentConfig], object],
               only: Optional[str] = None, overrides: Optional[dict] = None) -> list:
    """Runs every stage of ``cfg.stages`` in order (or just ``only``) with ``run_one(stage_cfg)``;
    ``overrides`` as in ``stage_config``."""
    results = []
    for stage, scfg in stage_configs(cfg, only, overrides):
        log.info("stage %s: run dir %s, init from %s", stage.name, scfg.train.run_dir, scfg.train.init_from)
        results.append(run_one(scfg))
        if getattr(results[-1], "status", None) == "preempted":
            # the next stage must not start from this one's unfinished checkpoint; rerunning
            # the recipe resumes this stage, then goes on
            log.warning("stage %s was preempted; later stages not started", stage.name)
            break
    return results


# ---- hand-over between stages -------------------------------------------------------------------

def load_params_into(state: TrainState, shardings: TrainState, ckpt_dir: str | Path,
                     fresh: Sequence[str] = (), *, prefix: Optional[str] = None,
                     fresh_matched: Optional[set] = None) -> TrainState:
    """``state`` with its params replaced by the newest good checkpoint's in ``ckpt_dir``
    (strict: see the module docstring); each array lands in ``state``'s sharding. Params whose
    path matches a regex in ``fresh`` (``train.init_fresh``) keep ``state``'s values, and the
    checkpoint's params they match are read and dropped (a new adapter between a pretrained
    ViT and LLM whose checkpoint has another projector).

    ``prefix`` (``train.init_parts``): only the params under ``<prefix>.`` are replaced (and
    checked), the others keep ``state``'s values. The checkpoint is of that part alone (a
    converted CLIP vision tower for ``"vision"``, a converted Llama for ``"decoder"``: its param
    ``p`` is the model's ``<prefix>.p``), or of a whole model that has the part (its params under
    ``<prefix>.``; the rest are read and dropped). ``fresh`` matches the model's full paths.

    A regex of ``fresh`` that matches no param of the model or of the checkpoint is an error (a
    typo), unless ``fresh_matched`` (a set) is given: the regexes that matched are added to it,
    for a caller loading several checkpoints with the same ``fresh`` to check them all at once."""
    ours_all = flat_params(state.all_params())
    under = f"{prefix}." if prefix else ""
    if prefix and not any(k.startswith(under) for k in ours_all):
        parts = sorted({k.split(".", 1)[0] for k in ours_all})
        raise StageHandoverError(f"train.init_parts: the model has no params under {prefix!r} "
                                 f"(its top-level parts: {parts})")
    ours = {k: v for k, v in ours_all.items() if k.startswith(under)}
    our_shardings = {**flat_params(shardings.params), **flat_params(shardings.frozen)}
    mesh = next(iter(our_shardings.values())).mesh
    new_ok = [re.compile(r) for r in NEW_ADAPTERS]
    keep = [re.compile(r) for r in fresh]
    kept = lambda k: any(r.search(k) for r in keep)  # noqa: E731
    plan: dict = {}

    def make_target(meta_ckpt):
        # the checkpoint's params by our names (None: read and dropped)
        whole = not prefix or any(k.startswith(under) for k in meta_ckpt)
        plan["ours"] = names = {k: (k if k.startswith(under) else None) if whole else under + k for k in meta_ckpt}
        meta = {names[k]: v for k, v in meta_ckpt.items() if names[k] is not None}
        unmatched = [r.pattern for r in keep if not any(r.search(k) for k in [*ours_all, *meta])]
        if fresh_matched is not None:
            fresh_matched.update(r.pattern for r in keep if r.pattern not in unmatched)
        elif unmatched:
            raise StageHandoverError(f"train.init_fresh: {unmatched} match no param of the model or of "
                                     f"{ckpt_dir} (a typo?)")
        merge, unexpected, misshaped = [], [], []
        for k, (shape, _) in meta.items():
            if kept(k):
                continue
            if k in ours:
                if tuple(ours[k].shape) != shape:
                    misshaped.append(f"{k}: checkpoint {shape} vs model {tuple(ours[k].shape)}")
            elif (m := _LORA.match(k)) and f"{m.group(1)}.kernel" in ours:
                merge.append(k)
            else:
                unexpected.append(f"{k} {shape}")
        missing = [k for k in ours if k not in meta and not kept(k) and not any(r.search(k) for r in new_ok)]
        if missing or unexpected or misshaped:
            lines = [f"{ckpt_dir}: checkpoint does not fit this model"
                     f"{f' under {prefix!r}' if prefix else ''} ({len(missing)} missing, "
                     f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped)"]
            lines += [f"  missing:    {k}" for k in missing[:20]]
            lines += [f"  unexpected: {k}" for k in unexpected[:20]]
            lines += [f"  mis-shaped: {k}" for k in misshaped[:20]]
            raise StageHandoverError("\n".join(lines))
        plan["merge"] = merge
        rep = NamedSharding(mesh, P())
        # our params keep the model's dtypes (a bfloat16 checkpoint is read as float32 params)
        target = {}
        for k, (shape, dtype) in meta_ckpt.items():
            o = names[k]
            use = o is not None and o in ours and not kept(o)
            # what is read and dropped (another part of a whole model's checkpoint: maybe the
            # whole LLM) is spread over the mesh, not a full copy on every device
            target[k] = jax.ShapeDtypeStruct(shape, ours[o].dtype if use else dtype,
                                             sharding=our_shardings.get(o, rep) if use else _spread(shape, mesh))
        return target

    field = "train.init_parts" if prefix else "train.init_from"
    found = Checkpointer(ckpt_dir, read_only=True).restore_params(make_target)
    if found is None:
        raise StageHandoverError(f"{field}: no checkpoint in {ckpt_dir}")
    loaded_ckpt, saved_cfg, step = found
    loaded = {plan["ours"][k]: v for k, v in loaded_ckpt.items() if plan["ours"][k] is not None}
    merged = {k: v for k, v in _merge_lora(loaded, plan["merge"], saved_cfg, ckpt_dir).items() if not kept(k)}
    new_adapters = [k for k in ours if k not in loaded and not kept(k)]
    new = {k: merged.get(k, v) for k, v in ours_all.items()}
    log.info("init %sfrom %s step %d: %d params loaded, %d fresh adapters, %d kept fresh (train.init_fresh), "
             "%d LoRA adapters merged", f"{prefix} " if prefix else "", ckpt_dir, step,
             len(ours) - len(new_adapters) - sum(map(kept, ours)), len(new_adapters), sum(map(kept, ours)),
             len(plan["merge"]) // 2)
    put = lambda like, sh: jax.device_put(unflatten_like(like, new), sh)  # noqa: E731
    return state.replace(params=put(state.params, shardings.params), frozen=put(state.frozen, shardings.frozen))


def _spread(shape: tuple[int, ...], mesh) -> NamedSharding:
    """A sharding of ``shape`` over all of ``mesh``'s devices along its largest dimension they
    divide (replicated if none does): for arrays that are read only to be dropped."""
    dims = sorted((d, i) for i, d in enumerate(shape) if d % mesh.size == 0)
    if mesh.size == 1 or not dims:
        return NamedSharding(mesh, P())
    spec = [None] * len(shape)
    spec[dims[-1][1]] = tuple(mesh.axis_names)
    return NamedSharding(mesh, P(*spec))


def _merge_lora(loaded: dict, keys: list[str], saved_cfg: Optional[dict], where) -> dict:
    if not keys:
        return loaded
    try:
        lora = saved_cfg["model"]["lora"]
        scale = float(lora["alpha"]) / int(lora["rank"])
    except (TypeError, KeyError, ZeroDivisionError):
        raise StageHandoverError(f"{where}: has LoRA factors to merge but no saved model.lora config "
                                 "(alpha, rank) to scale them") from None
    out = {k: v for k, v in loaded.items() if k not in keys}
    for base in sorted({_LORA.match(k).group(1) for k in keys}):
        kern = f"{base}.kernel"
        out[kern] = jax.jit(lambda w, a, b: w + scale * (a @ b), out_shardings=loaded[kern].sharding)(
            loaded[kern], loaded[f"{base}.lora.a"], loaded[f"{base}.lora.b"])
    return out


__all__ = ["infmllm_stages", "stage_config", "stage_configs", "run_stages", "load_params_into", "StageHandoverError",
           "NEW_ADAPTERS"]
