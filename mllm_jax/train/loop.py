"""The training loop: one pure jitted train step and eval step, and ``fit`` around them.

    result = fit(cfg, model_fn, loss_fn, data, eval_data=lambda: eval_iter())

- ``loss_fn(model, batch, rngs) -> (loss, {part: value})``; ``rngs`` is ``None`` in eval.
- ``data``: an iterator of process-local numpy batches with ``get_state()`` / ``set_state()``.
- The step is a pure function of ``(TrainState, batch)``, jitted once with the state's
  shardings as in/out shardings and the state buffers donated. Gradient accumulation scans
  over micro-batches inside it (micro-batch ``j`` = rows ``j::k``, so no data moves between
  devices). A step whose loss or gradient norm is not finite leaves params and optimiser state
  untouched and is counted; ``train.max_bad_steps`` in a row stop the run with an error.
- Metrics are fetched one step late, so the host never waits for the step it just queued.
- The eval step and ``evaluate`` live in ``train/evaluation.py`` (re-exported here): each eval
  metric is pooled over the eval batches by what it is a mean over (tokens, pairs, examples).
- SIGTERM / SIGINT: the current step finishes, a checkpoint is written, ``fit`` returns with
  ``status="preempted"`` (the CLI exits with 128 + signal). A second SIGINT aborts at once.
- Multi-process: the processes agree once per step, in one small all-gather after it, on
  whether any was signalled, whether any one's data ended, and the next batch's sequence
  lengths (``distributed.next_step_on_every_process``).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax import sharding as shd
from mllm_jax.config import ExperimentConfig, save_config, to_dict
from mllm_jax.objectives.lm import NTP_DENOMINATOR
from mllm_jax.train import distributed
from mllm_jax.train.checkpoint import Checkpointer, find_checkpoint_dir
from mllm_jax.train.evaluation import COUNT_SUFFIXES, evaluate, make_eval_step
from mllm_jax.train.flops import device_peak_flops, train_flops, train_flops_of
from mllm_jax.train.metrics import MetricsWriter, Progress, Throughput
from mllm_jax.train.optim import build_optimizer, path_str
from mllm_jax.train.state import TrainState, abstract_train_state, count_params, create_train_state

log = logging.getLogger(__name__)

# ``loss_fn(model, batch, rngs) -> (loss, parts)``: parts are named scalars, logged as
# ``loss/<name>``; under gradient accumulation they are averaged over the micro-batches, except
# counts (named ``*_tokens`` or ``*_pairs``), which are summed. ``evaluate`` says how it pools
# them over eval batches.
LossFn = Callable[[nnx.Module, dict, Optional[nnx.Rngs]], tuple[jax.Array, dict]]


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive steps with a non-finite loss or gradient."""


# ---- the steps ----------------------------------------------------------------------------------

def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _ntp_denominators(batch, micro, grad_accum: int):
    """``micro`` with ``NTP_DENOMINATOR`` (one per micro-batch) in every stream of ``batch`` that
    has a ``loss_mask``: the whole stream's token count / ``grad_accum``. The next-token loss of a
    micro-batch divides its token sum by it, so the mean over micro-batches is the token mean over
    the whole batch, as without accumulation (a mean of per-micro-batch means is not, when the
    micro-batches hold different numbers of answer tokens)."""
    if not isinstance(batch, dict):
        return micro
    out = {k: _ntp_denominators(v, micro[k], grad_accum) if isinstance(v, dict) else micro[k]
           for k, v in batch.items()}
    if "loss_mask" in batch:
        n = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        out[NTP_DENOMINATOR] = jnp.full((grad_accum,), n / grad_accum)
    return out


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    grad_accum: int = 1, mesh=None, rules: shd.Rules = shd.DEFAULT_RULES,
                    skip_with_cond: Optional[bool] = None):
    """``step(state, batch) -> (state, metrics)``, pure (jit it with ``jit_train_step``).

    A non-finite step leaves params, optimiser state and ``extra`` unchanged, through a
    ``lax.cond`` (``skip_with_cond``; default: on CPU) or a select of new and old values
    (elsewhere); the two give the same numbers.
    """
    if skip_with_cond is None:
        skip_with_cond = jax.default_backend() == "cpu"

    def loss_and_grad(state: TrainState, extra, batch, key):
        def f(params):
            model = nnx.merge(state.graphdef, params, state.frozen, extra)
            loss, parts = loss_fn(model, batch, nnx.Rngs(key))
            new_extra = nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))
            return loss.astype(jnp.float32), (parts, new_extra)
        (loss, (parts, new_extra)), grads = jax.value_and_grad(f, has_aux=True)(state.params)
        return loss, parts, new_extra, grads

    def accumulate(state: TrainState, batch, key):
        if grad_accum == 1:
            return loss_and_grad(state, state.extra, batch, key)
        def split(x):
            if x.shape[0] % grad_accum:
                raise ValueError(f"batch dimension {x.shape[0]} is not divisible by grad_accum={grad_accum}")
            return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
        micro = _ntp_denominators(batch, jax.tree.map(split, batch), grad_accum)
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(lambda: loss_and_grad(state, state.extra, first, key))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0], shapes[1], shapes[3]))

        def body(carry, xs):
            (loss_acc, parts_acc, g_acc), extra = carry
            mb, i = xs
            loss, parts, extra, g = loss_and_grad(state, extra, mb, jax.random.fold_in(key, i))
            return (_tree_add((loss_acc, parts_acc, g_acc), (loss, parts, g)), extra), None

        ((loss, parts, grads), extra), _ = jax.lax.scan(body, (zeros, state.extra),
                                                        (micro, jnp.arange(grad_accum)))
        scale = 1.0 / grad_accum
        parts = {k: v if k.endswith(COUNT_SUFFIXES) else v * scale for k, v in parts.items()}   # counts add up
        return loss * scale, parts, extra, jax.tree.map(lambda g: g * scale, grads)

    def step(state: TrainState, batch):
        with shd.activation_sharding(mesh, rules):
            key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            loss, parts, extra, grads = accumulate(state, batch, key)
            gnorm = optax.global_norm(grads)
            ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)

            def update(params, opt_state, extra, new_extra, grads):
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, new_extra

            def skip(params, opt_state, extra, new_extra, grads):
                return params, opt_state, extra

            def select(*args):
                return jax.tree.map(lambda n, o: jnp.where(ok, n, o), update(*args), skip(*args))
            # On CPU a conditional: with the state donated, XLA:CPU compiles the select of new
            # and old values with a copy of every optimiser moment first (the param update and
            # the in-place moment update both read the old moments), each step. Elsewhere the
            # select: a GPU conditional reads its predicate on the host (a sync every step).
            guarded = functools.partial(jax.lax.cond, ok, update, skip) if skip_with_cond else select
            params, opt_state, extra = guarded(state.params, state.opt_state, state.extra, extra, grads)
            bad = jnp.where(ok, 0, state.bad_streak + 1).astype(jnp.int32)
            skipped = state.skipped + (~ok).astype(jnp.int32)
            new_state = state.replace(params=params, opt_state=opt_state, extra=extra, step=state.step + 1,
                                      bad_streak=bad, skipped=skipped)
        metrics = {"loss": loss, **{f"loss/{k}": v for k, v in parts.items()}, "grad_norm": gnorm,
                   "lr": schedule(state.step - state.skipped), "finite": ok, "bad_streak": bad, "skipped": skipped}
        return new_state, metrics
    return step


# XLA:CPU (jaxlib 0.10) runs every dot and most reductions through YNNPACK (its default fusion
# types INDIVIDUAL_DOT and REDUCE). At the small float32 shapes of a 2-core host its dots are
# slower than Eigen's GEMMs: train step lm-tiny -14 %, lm-small -4 %, lm-base -2 %, mllm-tiny
# within noise with Eigen's (experiments/bench/train_step.py). bfloat16 dots need YNNPACK:
# Eigen converts them to float32 (lm-small-bf16 +70 %). Hence, on CPU, a model with no
# bfloat16 part keeps YNNPACK for the reductions only (a reduction's fusion may take in the dot
# feeding it, as the attention softmax backward's).
CPU_FLOAT32_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def step_compiler_options(state: TrainState, override: Optional[dict] = None) -> Optional[dict]:
    """XLA compiler options for the jitted train and eval steps (``jax.jit(...,
    compiler_options=)``): ``override`` (``train.xla_options``) if given (``{}``: XLA's
    defaults); otherwise ``CPU_FLOAT32_OPTIONS`` on XLA:CPU when no module of the model computes
    in bfloat16 (a ``dtype`` attribute), else ``None``. ``state`` may be abstract."""
    if override is not None:
        return dict(override) or None
    if jax.default_backend() != "cpu" or computes_in_bf16(state):
        return None
    return dict(CPU_FLOAT32_OPTIONS)


def computes_in_bf16(state: TrainState) -> bool:
    """Whether a module of the model computes in bfloat16 (a ``dtype`` attribute) or holds
    bfloat16 params (the activations they make are too). ``state`` may be abstract."""
    model = nnx.merge(state.graphdef, state.params, state.frozen, state.extra)
    if any(_is_bf16(getattr(m, "dtype", None)) for _, m in nnx.iter_modules(model)):
        return True
    return any(_is_bf16(getattr(x, "dtype", None)) for x in jax.tree.leaves((state.params, state.frozen)))


def warn_if_bf16_emulated(state: TrainState) -> bool:
    """Logs a warning (and returns True) when the model computes in bfloat16 on a CPU without
    native bfloat16 products (``cpu_forms.cpu_native_bf16``): there it runs slower than in
    float32 (measured on an AVX2-only 2-core EPYC: lm-small 394 vs 326 ms per step)."""
    from mllm_jax.models.cpu_forms import cpu_native_bf16
    if jax.default_backend() != "cpu" or cpu_native_bf16() is not False or not computes_in_bf16(state):
        return False
    log.warning("the model computes in bfloat16, but this CPU has no native bfloat16 products (no "
                "avx512_bf16 / amx_bf16 / bf16 flag in /proc/cpuinfo): XLA:CPU converts them to float32, "
                "slower than computing in float32. Set train.compute_dtype=float32 unless bfloat16 is "
                "what you are checking")
    return True


def _is_bf16(dtype) -> bool:
    """``dtype`` (a jnp/numpy dtype or scalar type, or a name such as ``"bfloat16"``, as
    ``nnx.Linear(dtype="bfloat16")`` keeps it) is bfloat16."""
    if dtype is None:
        return False
    try:
        return jnp.dtype(dtype) == jnp.bfloat16
    except Exception:                      # not a dtype (a module's own `dtype` of another kind)
        return False


def jit_train_step(step, shardings: TrainState, mesh, compiler_options: Optional[dict] = None):
    """Jits ``step`` with the state's shardings in and out, and the state donated
    (``compiler_options``: see ``step_compiler_options``)."""
    return jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, NamedSharding(mesh, P())),
                   donate_argnums=(0,), compiler_options=compiler_options)


# ---- preemption ---------------------------------------------------------------------------------

class StopSignal:
    """Turns SIGTERM / SIGINT into a flag checked between steps (a second SIGINT aborts)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


# ---- fit ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class FitResult:
    state: TrainState
    history: list[dict]          # one entry per train step (host floats)
    eval_history: list[dict]
    status: str                  # "completed" | "preempted"
    signum: Optional[int]
    checkpoint_dir: Path


def fit(cfg: ExperimentConfig, model: nnx.Module | Callable[[], nnx.Module], loss_fn: LossFn, data, *,
        eval_data: Optional[Callable[[], Iterator]] = None, eval_hooks: Sequence[Callable] = (),
        forward_flops: Optional[Callable[[dict], float]] = None,
        flops_parts: Optional[Callable[[dict], list]] = None, mesh=None,
        rules: shd.Rules = shd.DEFAULT_RULES) -> FitResult:
    """Trains ``model`` (a module or a constructor) for ``cfg.train.steps`` steps, resuming from
    the newest good checkpoint in the run's checkpoint dir if there is one.

    ``forward_flops(global batch shapes) -> FLOPs`` enables MFU (training FLOPs: 3x); with
    ``flops_parts(shapes) -> [flops.FlopsPart]`` instead, MFU counts the backward pass that the
    trainable params need (``flops.train_flops_of``; less under LoRA or a frozen tower).
    ``eval_data()`` returns a fresh eval iterator each time the eval hook runs (every
    ``train.eval_every`` steps).
    """
    tc = cfg.train
    primary = jax.process_index() == 0
    run_dir = Path(tc.run_dir)
    mesh = mesh if mesh is not None else shd.make_mesh(*cfg.mesh.shape)
    tx, schedule = build_optimizer(tc.optim, tc.steps)
    ckpt = Checkpointer(tc.checkpoint.dir or run_dir / "checkpoints", tc.checkpoint)
    cfg_dict = to_dict(cfg)
    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    abstract, shardings = abstract_train_state(model, tx, tc.optim, mesh, rules)
    restored = ckpt.restore(abstract, with_data=tc.checkpoint.restore_data)
    if restored is not None:
        state, data_state, start = restored
        if data_state is not None:
            data.set_state(data_state)
        elif not tc.checkpoint.restore_data:
            log.warning("resumed from %s at step %d with the data pipeline started afresh "
                        "(train.checkpoint.restore_data=false)", ckpt.step_dir(start), start)
        log.info("resumed from %s at step %d", ckpt.step_dir(start), start)
    else:
        state, _ = create_train_state(model, tx, tc.optim, mesh, seed=tc.seed, rules=rules)
        from mllm_jax.train.stages import StageHandoverError, load_params_into
        # init_from, then each part (a part's own checkpoint wins); with several checkpoints a
        # train.init_fresh regex need only match the model or one of them
        loads = ([(None, tc.init_from)] if tc.init_from else []) + list(tc.init_parts.items())
        matched = set() if len(loads) > 1 else None
        for part, path in loads:
            state = load_params_into(state, shardings, find_checkpoint_dir(path), tc.init_fresh, prefix=part,
                                     fresh_matched=matched)
        if matched is not None and (unmatched := [r for r in tc.init_fresh if r not in matched]):
            raise StageHandoverError(f"train.init_fresh: {unmatched} match no param of the model or of "
                                     f"{[p for _, p in loads]} (a typo?)")
    del model

    writer = MetricsWriter(run_dir, enabled=primary, tensorboard=tc.tensorboard,
                           resume_step=start if restored is not None else None)
    progress = Progress(tc.steps, int(state.step), enabled=primary and tc.progress)
    options = step_compiler_options(abstract, tc.xla_options)
    if primary:
        warn_if_bf16_emulated(abstract)
    train_step = jit_train_step(make_train_step(loss_fn, tx, schedule, grad_accum=tc.optim.grad_accum,
                                                mesh=mesh, rules=rules), shardings, mesh, options)
    eval_step = (jax.jit(make_eval_step(loss_fn, mesh, rules), compiler_options=options)
                 if eval_data or eval_hooks else None)
    history, eval_history = [], []
    step = int(state.step)
    last_saved = step if restored is not None else None
    thr = Throughput(_mesh_peak_flops(cfg, mesh))
    trained = frozenset(path_str(p) for p, _ in nnx.to_flat_state(abstract.params))
    cost = _step_cost(forward_flops, count_params(abstract.all_params()), flops_parts, trained)
    pending: Optional[tuple[int, Any, tuple[int, float]]] = None

    unlogged: list = []          # the latest drained step's metrics, when log_every skipped them

    def drain(p, last=False):
        s, m, (tokens, flops) = p
        m = {k: v.item() for k, v in jax.device_get(m).items()}
        history.append({"step": s, **m})
        if m["bad_streak"] >= tc.max_bad_steps:
            raise NonFiniteLossError(
                f"{m['bad_streak']} consecutive steps (up to step {s}) had a non-finite loss or gradient "
                f"(loss={m['loss']}, grad_norm={m['grad_norm']}); each was skipped, params are unchanged "
                f"since step {s - m['bad_streak']}. Lower train.optim.lr, check the data feeding those steps, "
                f"or raise train.max_bad_steps (now {tc.max_bad_steps}).")
        if not m["finite"]:
            log.warning("step %d: non-finite loss/grad (loss=%s, grad_norm=%s): update skipped (%d skipped so far)",
                        s, m["loss"], m["grad_norm"], m["skipped"])
        if len(history) == 1:
            thr.reset()  # the first step includes compilation
        else:
            thr.tick(tokens, flops)
        unlogged[:] = [(s, m)]
        if (tc.log_every and s % tc.log_every == 0) or s == tc.steps or last:
            m.update(thr.measure())
            writer.write(s, m)
            unlogged.clear()
        progress.update(1, m)

    status, signum, step_eval = "completed", None, None
    multi = jax.process_count() > 1
    end_state = None     # the data state to save when this process fetched a batch it will not train on
    try:
        with StopSignal() as stop:
            # one agreement per step, after it, with the next batch (a signal before step 1: after it)
            if step < tc.steps:
                before = data.get_state() if multi else None
                host_batch, ended, _ = distributed.next_step_on_every_process(data)
            while step < tc.steps:
                # data.num_epochs reached (here or on another process): save and stop like a finished run
                if ended:
                    log.warning("the training data ended at step %d of train.steps=%d (data.num_epochs)%s; "
                                "stopping there", step, tc.steps, "" if host_batch is None else " on another process")
                    if host_batch is not None:
                        end_state = before
                    break
                batch = distributed.global_batch(host_batch, mesh, rules)
                state, metrics = train_step(state, batch)
                step += 1
                if pending is not None:
                    drain(pending)
                pending = (step, metrics, cost(batch))
                step_eval = None
                if eval_step is not None and tc.eval_every and step % tc.eval_every == 0:
                    drain(pending)
                    pending = None
                    step_eval = evaluate(eval_step, state, eval_data() if eval_data else iter(()),
                                         tc.eval_steps, mesh, rules, eval_hooks)
                    eval_history.append({"step": step, **step_eval})
                    writer.write(step, step_eval)
                    thr.reset()
                if tc.checkpoint.every_steps and step % tc.checkpoint.every_steps == 0:
                    ckpt.save(state, data_state=data.get_state(), config=cfg_dict, metrics=step_eval)
                    last_saved = step
                signalled = stop.signum is not None      # read once: what the others are told
                fetch = step < tc.steps                  # (a signalled process fetches nothing more)
                before = data.get_state() if fetch and multi and not signalled else None
                host_batch, ended, stopping = distributed.next_step_on_every_process(data, signalled, fetch=fetch)
                if stopping and last_saved != step:      # with the data state of the batches trained on
                    ckpt.save(state, data_state=before if before is not None else data.get_state(),
                              config=cfg_dict, metrics=step_eval)
                    last_saved = step
                if stopping:
                    status, signum = "preempted", stop.signum
                    break
            if pending is not None:
                drain(pending, last=True)
            elif unlogged and unlogged[0][0] == step:      # drained early, for an eval at this step
                writer.write(step, unlogged[0][1])
            if last_saved != step:     # with the metrics of an eval at this step, if one ran
                ckpt.save(state, data_state=end_state if end_state is not None else data.get_state(),
                          config=cfg_dict, metrics=step_eval)
    finally:
        ckpt.close()
        writer.close()
        progress.close()
    if status == "preempted":
        log.warning("stopped by signal %s at step %d; checkpoint saved in %s", signum, step, ckpt.directory)
    return FitResult(state, history, eval_history, status, signum, ckpt.directory)


def _step_cost(forward_flops, n_params: int, flops_parts=None, trained: frozenset = frozenset()):
    """``batch -> (tokens, training FLOPs)`` from the global batch's shapes (buckets may change
    them from step to step): ``flops_parts`` with the ``trained`` param paths, else 3x
    ``forward_flops``, else 3x ``2 * params * tokens``. A multi-stream batch (``{stream:
    batch}``, views nested deeper) sums over its sub-batches. Counted once per distinct shapes
    (a few buckets), not every step: the FLOPs functions walk the model's param table."""
    counted: dict = {}

    def one(shapes: dict) -> tuple[int, float]:
        key = tuple(sorted(shapes.items()))
        if key not in counted:
            t = int(np.prod(shapes["input_ids"])) if "input_ids" in shapes else next(iter(shapes.values()))[0]
            if flops_parts is not None:
                f = train_flops_of(flops_parts(shapes), trained)
            else:
                f = train_flops(forward_flops(shapes) if forward_flops else 2.0 * n_params * t)
            counted[key] = (t, f)
        return counted[key]

    def leaves(batch):
        if any(isinstance(v, dict) for v in batch.values()):
            for v in batch.values():
                if isinstance(v, dict):
                    yield from leaves(v)
        else:
            yield batch

    def cost(batch):
        tokens, flops = 0, 0.0
        for b in leaves(batch):
            t, f = one({k: tuple(v.shape) for k, v in b.items()})
            tokens, flops = tokens + t, flops + f
        return tokens, flops
    return cost


def _mesh_peak_flops(cfg: ExperimentConfig, mesh) -> Optional[float]:
    peak = cfg.train.peak_flops
    if peak is None:
        try:
            peak, _ = device_peak_flops(mesh.devices.flat[0])
        except KeyError as e:
            log.warning("%s", e)
            return None
    return peak * mesh.size


__all__ = ["make_train_step", "make_eval_step", "jit_train_step", "step_compiler_options", "CPU_FLOAT32_OPTIONS",
           "fit", "evaluate", "FitResult", "NonFiniteLossError", "StopSignal"]
