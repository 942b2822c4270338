"""A thin wrapper over Orbax's ``CheckpointManager`` (all Orbax use in the project is here).

One step directory holds four items:

    params/  every param (trainable and frozen), a flat ``{dotted.path: array}`` dict, so the
             layout does not depend on the freeze mask (a later stage can train other params)
    train/   optimiser state, non-param variables, step, RNG, NaN-guard counters
    data/    the data iterator's state, one JSON file per process (``process_<i>-of-<n>.json``,
             as grain's own Orbax handler writes it), so a resumed run sees the same batches
    config/  the resolved ``ExperimentConfig`` (JSON)

Retention keeps the last ``keep_last`` steps and, when ``keep_best`` > 0, the best
``keep_best`` by ``best_metric``. Saves are asynchronous (``async_save``). Restores go into an
abstract, sharded target (any mesh shape or device count). Orbax writes each step into a
temporary directory and renames it when complete, so an interrupted save never looks like a
checkpoint; a finished step whose files cannot be read (missing, truncated or undecodable) is
reported with a warning naming it and the previous step is used; once an older step has
restored, the broken ones are set aside as ``<step>.corrupt`` (kept for inspection, out of the
way of the saves that follow; Orbax neither lists nor deletes them). If no step restores, nothing
is moved and the error lists every failure. Any other failure is raised as it is and moves
nothing (running out of memory, a permission, network or timeout error, an interrupt, a bug); a
step that does not fit the restore target (a changed model or optimiser config) raises
``CheckpointMismatchError`` naming the leaves and both shapes, and one whose data state was
written by another number of processes raises ``DataStateMismatchError`` (restore with
``with_data=False`` to resume everything else).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mllm_jax.config import CheckpointConfig
from mllm_jax.convert.hf import flat_params
from mllm_jax.train.state import TrainState, unflatten_like

log = logging.getLogger(__name__)


_READ_ONLY_NOTICES = ("Given directory is read only", "CheckpointManagerOptions.read_only=True")


def _not_read_only_notice(record: logging.LogRecord) -> bool:
    """Drops Orbax's warnings that a manager is read-only: ours (eval, init_from, generate) are
    read-only on purpose, and two warnings printed on every restore."""
    return not str(record.msg).startswith(_READ_ONLY_NOTICES)


logging.getLogger("absl").addFilter(_not_read_only_notice)


class NoValidCheckpointError(RuntimeError):
    """Every checkpoint in the directory failed to restore."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's leaves do not match the restore target's paths or shapes."""


class DataStateMismatchError(CheckpointMismatchError):
    """A checkpoint's data-iterator state was written by a different number of processes."""


class _BrokenStep(Exception):
    """Carries an error that says a step's files are bad (the step is skipped)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


# errors that say nothing about the files: the same read can succeed later or elsewhere
_NOT_THE_FILES = (PermissionError, TimeoutError, ConnectionError, InterruptedError, BlockingIOError)
_NOT_THE_FILES_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED",
                         "UNAUTHENTICATED", "ABORTED", "CANCELLED")


def _unwrap(e: BaseException) -> BaseException:
    """Orbax wraps an array's read error in a plain ``Exception``: its cause."""
    while type(e) is Exception and e.__cause__ is not None:
        e = e.__cause__
    return e


def _bad_files(e: BaseException) -> bool:
    """Whether ``e``, raised while reading a step, means the step's files are bad: missing files
    (OSError), undecodable JSON/text and TensorStore read errors (ValueError, e.g. ``DATA_LOSS:``,
    ``NOT_FOUND:``)."""
    e = _unwrap(e)
    if isinstance(e, _NOT_THE_FILES):
        return False
    if isinstance(e, ValueError):
        return not str(e).startswith(_NOT_THE_FILES_STATUS)
    return isinstance(e, OSError)


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _leaves(tree) -> dict[str, Any]:
    """``{dotted.path: leaf}``; a flat ``{dotted.path: leaf}`` dict gives the same paths."""
    return {_dotted(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _misfits(saved: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """One line per leaf whose path or shape differs between ``saved`` and ``target`` (both
    ``{path: leaf with .shape and .dtype}``). Dtypes may differ: the restore casts."""
    desc = lambda x: f"{tuple(x.shape)} {np.dtype(x.dtype).name}"  # noqa: E731
    out = [f"{k}: saved {desc(saved[k])}, target {desc(target[k])}" for k in target
           if k in saved and tuple(saved[k].shape) != tuple(target[k].shape)]
    out += [f"{k}: not in the checkpoint (target {desc(target[k])})" for k in target if k not in saved]
    out += [f"{k}: not in the target (saved {desc(saved[k])})" for k in saved if k not in target]
    return out


# ---- per-process data-iterator state ------------------------------------------------------------

_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _data_file_name() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _saved_process_counts(data_dir: Path) -> set[int]:
    """The process counts that wrote the data-state files in ``data_dir`` (empty if none)."""
    if not data_dir.is_dir():
        return set()
    return {int(m.group(2)) for p in data_dir.iterdir() if (m := _DATA_FILE.fullmatch(p.name))}


class DataStateHandler(ocp.CheckpointHandler):
    """Saves ``get_state()`` of each process's data iterator as JSON, one file per process."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        (directory / _data_file_name()).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None):
        path = directory / _data_file_name()
        if not path.exists():  # a count mismatch is caught before (Checkpointer._check_process_count)
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise FileNotFoundError(f"{path}: no data-iterator state for this process (found {found})")
        return json.loads(path.read_text())

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ---- train state <-> checkpoint items -----------------------------------------------------------

def _train_item(state: TrainState) -> dict:
    return {"opt_state": state.opt_state, "extra": _keys_to_data(state.extra), "step": state.step,
            "rng": state.rng, "bad_streak": state.bad_streak, "skipped": state.skipped}


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
    """Typed PRNG keys (nnx RNG streams) are stored as their raw uint32 data."""
    def conv(x):
        if not _is_key(x):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            d = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(d.shape, d.dtype, sharding=x.sharding)
        return jax.random.key_data(x)
    return jax.tree.map(conv, tree)


def _data_to_keys(tree, like):
    return jax.tree.map(lambda x, l: jax.random.wrap_key_data(x) if _is_key(l) else x, tree, like)


# ---- the manager --------------------------------------------------------------------------------

class Checkpointer:
    """Saves and restores ``TrainState`` + data state + config under ``directory``."""

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig = CheckpointConfig(), *,
                 read_only: bool = False):
        from mllm_jax.config.train import check_local_path
        check_local_path("checkpoint directory", str(directory))
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        self._read_only = read_only
        policies = [ocp.checkpoint_managers.LatestN(n=cfg.keep_last)]
        if cfg.keep_best > 0:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m[cfg.best_metric], reverse=cfg.best_mode == "min",
                n=cfg.keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=cfg.async_save, create=not read_only, read_only=read_only,
            # Orbax writes each step's metrics to disk only when best_fn is set (BestN above does
            # the ranking); without it a resumed run forgot them and deleted the best step
            best_fn=(lambda m: m[cfg.best_metric]) if cfg.keep_best > 0 else None, best_mode=cfg.best_mode,
            cleanup_tmp_directories=not read_only)
        handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                    "data": DataStateHandler(), "config": ocp.JsonCheckpointHandler()}
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # -- queries
    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._mgr.latest_step()

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    # -- save
    def save(self, state: TrainState, *, data_state: Any = None, config: Optional[dict] = None,
             metrics: Optional[dict] = None) -> int:
        """Saves at ``state.step`` (asynchronously if configured); returns the step."""
        step = int(jax.device_get(state.step))
        items = {"params": ocp.args.StandardSave(flat_params(state.all_params())),
                 "train": ocp.args.StandardSave(_train_item(state))}
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
        if self.cfg.keep_best > 0 and metrics is not None:
            # a step that cannot be ranked is saved as one without metrics
            if self.cfg.best_metric not in metrics:
                # an eval ran but did not report the metric (a misspelt name): no step could ever rank
                log.warning("step %d: train.checkpoint.best_metric=%r is not among this step's eval metrics %s; "
                            "the step is not a candidate for the best %d", step, self.cfg.best_metric,
                            sorted(metrics), self.cfg.keep_best)
                metrics = None
            elif not np.isfinite(metrics[self.cfg.best_metric]):
                # a NaN would be ranked by sorted(), whose comparisons with NaN are all false: the
                # true best step could be deleted
                log.warning("step %d: %s=%s is not finite; the step is not a candidate for the best %d",
                            step, self.cfg.best_metric, metrics[self.cfg.best_metric], self.cfg.keep_best)
                metrics = None
        self._mgr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        return step

    def save_params(self, step: int, params: dict[str, Any], *, config: Optional[dict] = None) -> None:
        """A params-only step (e.g. converted HF weights) that ``train.init_from`` can start from."""
        items = {"params": ocp.args.StandardSave(dict(params))}
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        self._mgr.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

    # -- restore
    def restore(self, abstract: TrainState, *, with_data: bool = True) -> Optional[tuple[TrainState, Any, int]]:
        """Restores the newest step that restores cleanly into ``abstract`` (its shardings decide
        the placement). Returns ``(state, data_state or None, step)``, or None without checkpoints."""
        def one(step):
            targets = {"params": flat_params(abstract.all_params()), "train": _train_item(abstract)}
            self._check_fits(step, self._saved_leaves(step, targets), {k: _leaves(t) for k, t in targets.items()})
            if with_data:
                self._check_process_count(step)
                data_dir = self.step_dir(step) / "data"
                if not data_dir.is_dir():   # Orbax: a bare KeyError naming no step
                    raise _BrokenStep(FileNotFoundError(f"{data_dir}: no data-iterator state in this step"))
            items = {k: ocp.args.StandardRestore(t) for k, t in targets.items()}
            if with_data:
                items["data"] = DataStateRestore()
            r = self._read(self._mgr.restore, step, args=ocp.args.Composite(**items))
            train = r["train"]
            params = r["params"]
            state = abstract.replace(
                params=unflatten_like(abstract.params, params), frozen=unflatten_like(abstract.frozen, params),
                extra=_data_to_keys(train["extra"], abstract.extra), opt_state=train["opt_state"],
                step=train["step"], rng=train["rng"], bad_streak=train["bad_streak"], skipped=train["skipped"])
            return state, (r["data"] if with_data else None)
        return self._first_good(one)

    def restore_params(self, make_target: Callable[[dict], dict]) -> Optional[tuple[dict, Optional[dict], int]]:
        """Restores params from the newest good step: ``make_target(metadata)`` gets ``{path:
        (shape, dtype)}`` of what that step saved and returns the flat target (``{path:
        jax.ShapeDtypeStruct}`` with shardings, every saved path). Returns ``(params, saved config
        or None, step)``, or None without checkpoints."""
        def one(step):
            meta = self._read(self.params_metadata, step)
            target = make_target(meta)
            self._check_fits(step, {"params": {k: jax.ShapeDtypeStruct(*m) for k, m in meta.items()}},
                             {"params": target})
            r = self._read(self._mgr.restore, step,
                           args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
            return r["params"], self._read(self.saved_config, step)
        return self._first_good(one)

    def params_metadata(self, step: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{path: (shape, dtype)}`` of the params saved at ``step``."""
        meta = self._mgr.item_metadata(step)["params"]
        if meta is None:
            raise FileNotFoundError(f"{self.step_dir(step) / 'params'}: its metadata file is missing")
        tree = getattr(meta, "tree", meta)
        return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in tree.items()}

    def saved_config(self, step: int) -> Optional[dict]:
        """The resolved config saved at ``step`` (a dict), or None if it was not saved."""
        if not (self.step_dir(step) / "config").exists():
            return None
        return self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    @staticmethod
    def _read(fn, step, *args, **kw):
        """``fn(step, ...)``, a read of the step's files; an error meaning they are bad becomes
        ``_BrokenStep``, any other propagates."""
        try:
            return fn(step, *args, **kw)
        except Exception as e:
            if _bad_files(e):
                raise _BrokenStep(_unwrap(e)) from e
            raise

    def _saved_leaves(self, step: int, items) -> dict[str, Optional[dict]]:
        """``{item: {path: metadata}}`` of ``step``; None for an item the step does not have. An
        item whose metadata files are missing or unreadable is left out (the restore judges it)."""
        try:
            meta = self._mgr.item_metadata(step)
        except Exception as e:
            if _bad_files(e):
                return {}
            raise
        out = {}
        for k in items:
            if meta.get(k) is not None:
                out[k] = _leaves(getattr(meta[k], "tree", meta[k]))
            elif not (self.step_dir(step) / k).exists():
                out[k] = None
        return out

    def _check_fits(self, step: int, saved: dict[str, dict], target: dict[str, dict]) -> None:
        """Raises ``CheckpointMismatchError`` unless each item's ``{path: leaf}`` in ``saved``
        (None: the step has no such item) and ``target`` have the same paths and shapes. Items
        not in ``saved`` (their metadata file is missing) are left to the restore to judge."""
        lines = [f"{item}: not saved in this step" for item in target
                 if item in saved and saved[item] is None]
        lines += [f"{item}: {m}" for item in target if saved.get(item) is not None
                  for m in _misfits(saved[item], target[item])]
        if lines:
            more = [f"... and {len(lines) - 20} more"] if len(lines) > 20 else []
            raise CheckpointMismatchError(
                f"checkpoint {self.step_dir(step)} does not fit the state it is restored into (was the "
                "model or optimiser config changed?); nothing on disk was changed:\n  "
                + "\n  ".join(lines[:20] + more))

    def _check_process_count(self, step: int) -> None:
        """Raises ``DataStateMismatchError`` if ``step``'s data state was written only by a
        different number of processes (each process's iterator position is its own: it cannot
        be split or merged for another process count)."""
        counts = _saved_process_counts(self.step_dir(step) / "data")
        n = jax.process_count()
        if counts and n not in counts:
            raise DataStateMismatchError(
                f"checkpoint {self.step_dir(step)}: its data-iterator state was written by "
                f"{'/'.join(map(str, sorted(counts)))} processes and this run has {n}; a data position "
                "cannot be carried over to another process count. Set train.checkpoint.restore_data=false "
                "to resume params, optimiser state and step with the data pipeline started afresh (its "
                "first batches are seen again); nothing on disk was changed.")

    def _first_good(self, restore_one):
        """``restore_one(step)`` of the newest step whose files are good (older steps are tried
        only after a ``_BrokenStep``), then the broken newer steps are set aside."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        errors, bad = [], []
        for step in steps:
            try:
                out = restore_one(step)
            except _BrokenStep as broken:
                e = broken.error
                msg = (f"checkpoint {self.step_dir(step)} could not be restored "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
                errors.append(msg)
                bad.append(step)
                warnings.warn(msg + "; trying the previous checkpoint", RuntimeWarning, stacklevel=3)
                log.warning(msg)
                continue
            if bad:  # only once an older step restored: the newer ones are broken, not the target
                for b in bad:
                    self._set_aside(b)
                self._mgr.reload()
            return (*out, step) if isinstance(out, tuple) else (out, step)
        raise NoValidCheckpointError("no checkpoint in " f"{self.directory} restores:\n  " + "\n  ".join(errors))

    def _set_aside(self, step: int) -> None:
        """Renames a bad step dir to ``<step>.corrupt`` (kept for inspection, out of the way of
        new saves at that step)."""
        if self._read_only:
            return
        if jax.process_index() != 0:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices(f"mllm_jax_set_aside_{step}")
            return
        src = self.step_dir(step)
        dst = src.with_name(f"{step}.corrupt")
        n = 1
        while dst.exists():
            dst, n = src.with_name(f"{step}.corrupt{n}"), n + 1
        src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"mllm_jax_set_aside_{step}")


def find_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A run dir (holding ``checkpoints/``, or whose ``config.yaml`` names another
    ``train.checkpoint.dir``, where ``fit`` wrote them) or a checkpoint dir -> the checkpoint dir."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    return Path(named) if (named := _configured_checkpoint_dir(p / "config.yaml")) else p


def _configured_checkpoint_dir(config_yaml: Path) -> Optional[str]:
    """``train.checkpoint.dir`` of a run's resolved ``config.yaml`` (None if unset or unreadable)."""
    if not config_yaml.is_file():
        return None
    import yaml

    from mllm_jax.config.base import load_yaml     # as load_config reads it
    try:
        cfg = load_yaml(config_yaml.read_text())
        return cfg["train"]["checkpoint"]["dir"] or None
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


__all__ = ["Checkpointer", "NoValidCheckpointError", "CheckpointMismatchError", "DataStateMismatchError",
           "DataStateHandler", "DataStateSave", "DataStateRestore", "find_checkpoint_dir"]
