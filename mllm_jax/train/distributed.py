"""Multi-host setup and process-local data.

On a TPU pod every host runs the same command; ``initialize()`` with nothing set lets
``jax.distributed.initialize`` discover the pod (and SLURM / Open MPI / Kubernetes clusters)
by itself. On GPU clusters without such discovery, give the coordinator explicitly, by flags
or environment variables (flags win)::

    MLLM_JAX_COORDINATOR=10.0.0.1:1234 MLLM_JAX_NUM_PROCESSES=4 MLLM_JAX_PROCESS_ID=$RANK \\
        python -m mllm_jax train --config ...

Each process loads only its own rows of the global batch (``process_index`` of
``process_count``, contiguous, in process order); ``global_batch`` stitches them into one
``jax.Array`` sharded over the mesh's batch axes without any host sending data to another.
Only process 0 writes logs, metrics and the config; every process takes part in checkpoints.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mllm_jax import sharding as shd

log = logging.getLogger(__name__)

ENV_COORDINATOR = "MLLM_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MLLM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MLLM_JAX_PROCESS_ID"
# What jax.distributed.initialize() reads to find the cluster by itself (jax._src.clusters).
_SLURM_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OMPI_ENV = "OMPI_MCA_orte_hnp_uri"
_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "JOBSET_NAME", "MEGASCALE_COORDINATOR_ADDRESS")


def detected_launcher() -> Optional[str]:
    """The multi-process launch this process is part of, as ``jax.distributed.initialize()``
    would discover it: ``"slurm"`` (an ``srun`` step of more than one task), ``"openmpi"``
    (``mpirun`` with ORTE, more than one rank), ``"tpu"`` (TPU pod / JobSet), or None.

    A SLURM allocation alone (``salloc`` or ``sbatch`` shell, no ``srun`` step) or a one-task
    step is a single process: JAX would find no step node list there, or one process."""
    env = os.environ
    if all(k in env for k in _SLURM_ENV) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if _OMPI_ENV in env and int(env.get("OMPI_COMM_WORLD_SIZE", "2")) > 1:
        return "openmpi"
    if any(k in env for k in _TPU_ENV):
        return "tpu"
    return None


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, auto: Optional[bool] = None,
               cpu_collectives: str = "gloo") -> bool:
    """Starts ``jax.distributed`` when this is a multi-process run; returns whether it did.

    Arguments default to ``$MLLM_JAX_COORDINATOR`` / ``$MLLM_JAX_NUM_PROCESSES`` /
    ``$MLLM_JAX_PROCESS_ID``. With none of them set, initialises only where JAX can discover
    a multi-process launch itself (``detected_launcher()``: TPU pod or JobSet, a SLURM ``srun``
    step or Open MPI ``mpirun`` of more than one process), unless ``auto`` says otherwise.
    Must run before anything touches the devices.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if auto is None:
        auto = detected_launcher() is not None
    if not explicit and not auto:
        return False
    if explicit and (coordinator is None or num_processes is None or process_id is None):
        raise ValueError(
            "multi-process launch needs all three of coordinator address, number of processes and "
            f"process id (got coordinator={coordinator!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}); set --coordinator/--num-processes/--process-id or "
            f"${ENV_COORDINATOR}/${ENV_NUM_PROCESSES}/${ENV_PROCESS_ID}")
    # Cross-process collectives between CPU devices (harmless where the devices are GPUs/TPUs).
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if explicit:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (one all-gather in a multi-process run,
    nothing otherwise). Every process must call it at the same point."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))


# One training (or eval) step's agreement among processes is one all-gather of one small int64
# row per process: [stop, ended, n, T_0, ..., T_{n-1}, 0, ...] (``step_row``), reduced on every
# process alike (``agree_step``; for eval, ``next_or_blank_on_every_process``). The lengths are the process's ``it.seq_lengths(batch)`` in key order;
# a row holds STEP_ROW_LENGTHS of them (more: one more all-gather, ``same_seq_lengths``).
STEP_ROW_LENGTHS = 32


@dataclasses.dataclass(frozen=True)
class StepAgreement:
    """What every process decides from one step's rows: ``stop`` (any process was signalled),
    ``ended`` (any process's data ended), ``longest`` (the longest sequence length per key
    position over all processes, in key order; None where the rows could not hold them all)."""
    stop: bool
    ended: bool
    longest: Optional[tuple[int, ...]]


def step_row(stop: bool, ended: int, lengths: Sequence[int] = ()) -> np.ndarray:
    """One process's part of a step's agreement: ``int64[3 + STEP_ROW_LENGTHS]``, ``[stop,
    ended, len(lengths), lengths..., 0...]`` (lengths past STEP_ROW_LENGTHS are left out;
    ``agree_step`` then says it could not agree on them). ``ended``: 0 / 1 for a training step;
    an eval step's code (0 goes on, 1 ended and feeds blanks, 2 ended and cannot)."""
    row = np.zeros(3 + STEP_ROW_LENGTHS, np.int64)
    kept = list(lengths)[:STEP_ROW_LENGTHS]
    row[:3] = bool(stop), int(ended), len(lengths)
    row[3:3 + len(kept)] = kept
    return row


def _agreed_lengths(rows: np.ndarray) -> Optional[tuple[int, ...]]:
    """The element-wise max of every process's lengths (``step_row``), None where a row could
    not hold them all; processes with different numbers of lengths are an error."""
    counts = rows[:, 2]
    if (counts != counts[0]).any():
        raise ValueError(f"processes have different numbers of sequence lengths in this step's batch "
                         f"({counts.tolist()}, by process): their data pipelines batch differently")
    n = int(counts[0])
    return tuple(int(t) for t in rows[:, 3:3 + n].max(axis=0)) if n <= STEP_ROW_LENGTHS else None


def agree_step(rows: np.ndarray) -> StepAgreement:
    """The decisions of one step from every process's ``step_row`` (``int64[P, 3 +
    STEP_ROW_LENGTHS]``): the same as ``any_process(stop)``, ``any_process(ended)`` and, when
    neither, the element-wise max of the processes' lengths (``same_seq_lengths``)."""
    rows = np.asarray(rows, np.int64)
    stop, ended = bool(rows[:, 0].any()), bool(rows[:, 1].any())
    if stop or ended:        # no step follows: the lengths are not needed (and some may be missing)
        return StepAgreement(stop, ended, None)
    return StepAgreement(False, False, _agreed_lengths(rows))


def _gather(it, batch, stop: bool, code: int) -> tuple[np.ndarray, dict]:
    """One all-gather of this process's ``step_row`` (its lengths: ``it.seq_lengths(batch)``)
    -> ``(rows int64[P, ...], this process's {path: T})``."""
    from jax.experimental import multihost_utils
    mine = it.seq_lengths(batch) if batch is not None and hasattr(it, "seq_lengths") else {}
    row = step_row(stop, code, [mine[k] for k in sorted(mine)])
    return np.asarray(multihost_utils.process_allgather(row), np.int64), mine


def _pad_to_agreed(it, batch, rows: np.ndarray, mine: dict):
    """``batch`` padded to the longest lengths of ``rows`` (as ``same_seq_lengths``)."""
    if not mine:
        return batch
    longest = _agreed_lengths(rows)
    if longest is None:              # more lengths than a row holds: one more all-gather
        return same_seq_lengths(it, batch)
    want = dict(zip(sorted(mine), longest))
    return batch if want == mine else it.pad_seq_lengths(batch, want)


def next_step_on_every_process(it, stop: bool = False, *, fetch: bool = True) -> tuple[Optional[Any], bool, bool]:
    """A training step's one agreement among processes: ``(batch, ended, stop)``, the same
    ``ended`` and ``stop`` on every process, with at most one all-gather (none in a
    one-process run).

    ``batch`` is ``next(it)`` when ``fetch`` and not ``stop`` (a process that asks to stop
    fetches nothing: all stop), else None, as where ``it`` ended; ``ended``: any process's ``it``
    ended; ``stop``: any process passed ``stop``. When neither, ``batch`` is padded to the
    longest sequence length any process has (as ``same_seq_lengths``) when ``it`` can pad.
    Every process must call it at the same point with the same ``fetch``."""
    batch, ended = None, False
    if fetch and not stop:
        try:
            batch = next(it)
        except StopIteration:
            ended = True
    if jax.process_count() == 1:
        return batch, ended, bool(stop)
    rows, mine = _gather(it, batch, stop, ended)
    agreed = agree_step(rows)
    if agreed.stop or agreed.ended:
        return batch, agreed.ended, agreed.stop
    return _pad_to_agreed(it, batch, rows, mine), False, False


def next_or_blank_on_every_process(it, last) -> tuple[Optional[Any], bool]:
    """For evaluation, which should see every process's rows: ``(batch, False)`` while any
    process's ``it`` goes on, a process whose ``it`` ended getting ``it.blank_like(last)``
    (padding rows only, which every metric gives zero weight; ``last``: its latest batch), then
    ``(None, True)`` on every process. Where ``it`` has no ``blank_like`` or a process ended
    before its first batch, all stop when any ends."""
    if jax.process_count() == 1:
        batch = next(it, None)
        return batch, batch is None
    try:
        batch, code = next(it), 0
    except StopIteration:      # 1: ended, can feed blanks; 2: ended, cannot
        batch, code = None, 1 if last is not None and hasattr(it, "blank_like") else 2
    if code == 1:              # its blank rows take part in the length agreement
        batch = it.blank_like(last)
    rows, mine = _gather(it, batch, False, code)          # one all-gather: codes and lengths
    codes = rows[:, 1]
    if (codes > 0).all() or (codes == 2).any():
        return None, True
    return _pad_to_agreed(it, batch, rows, mine), False


def same_seq_lengths(it, batch):
    """``batch`` padded to the longest sequence length any process has this step (one
    all-gather): each process's pipeline picks the bucket that fits its own rows, and the rows of
    one global array must have one shape on every process. ``it`` has ``seq_lengths(batch) ->
    {path: T}`` and ``pad_seq_lengths(batch, {path: T})`` (``mllm_jax.data.pipeline``)."""
    mine = it.seq_lengths(batch)
    if not mine:
        return batch
    from jax.experimental import multihost_utils
    keys = sorted(mine)
    longest = np.max(multihost_utils.process_allgather(np.asarray([mine[k] for k in keys], np.int64)), axis=0)
    want = {k: int(t) for k, t in zip(keys, np.atleast_1d(longest))}
    return batch if want == mine else it.pad_seq_lengths(batch, want)


def is_primary() -> bool:
    return jax.process_index() == 0


def local_batch_size(global_batch_size: int) -> int:
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by {n} processes")
    return global_batch_size // n


def global_batch(local: dict, mesh: Mesh, rules: shd.Rules = shd.DEFAULT_RULES) -> dict:
    """Process-local numpy batch (rows ``[i*b, (i+1)*b)`` of the global batch on process ``i``)
    -> global ``jax.Array``s, leading dim sharded over the mesh's batch axes."""
    n = jax.process_count()

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(NamedSharding(mesh, P()), x)
        s = shd.batch_sharding(mesh, x.ndim, rules)
        global_shape = (x.shape[0] * n,) + x.shape[1:]
        shd.check_divisible(f"batch.{jax.tree_util.keystr(path)}", global_shape, s.spec, mesh)
        return jax.make_array_from_process_local_data(s, x, global_shape)
    return jax.tree_util.tree_map_with_path(put, local)


__all__ = ["initialize", "detected_launcher", "any_process", "next_step_on_every_process",
           "step_row", "agree_step", "StepAgreement", "STEP_ROW_LENGTHS", "next_or_blank_on_every_process",
           "same_seq_lengths", "is_primary", "local_batch_size", "global_batch", "ENV_COORDINATOR",
           "ENV_NUM_PROCESSES", "ENV_PROCESS_ID"]
