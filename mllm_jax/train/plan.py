"""``plan``: size a run for a mesh this machine does not have, without allocating anything.

The abstract train state comes from ``jax.eval_shape`` of the model (params, frozen params,
optimiser state, each leaf's ``NamedSharding`` on an ``AbstractMesh``), so the numbers are
the ones the real run will have: parameter counts by module, bytes per device for params,
gradients and optimiser state under the sharding rules, an activation estimate, FLOPs per
step, and the step time implied by an MFU on named accelerators. A sharded dimension that
the mesh does not divide fails with the param's name and shape.

    python -m mllm_jax plan --config experiments/configs/vila7b_sugar.yaml --mesh 1,256,1 --global-batch 256
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from mllm_jax import sharding as shd
from mllm_jax.config import ExperimentConfig
from mllm_jax.train import flops as F
from mllm_jax.train.optim import build_optimizer, check_freeze_mask, path_str, trainable_filter
from mllm_jax.train.registry import model_spec
from mllm_jax.train.state import abstract_from_states, abstract_model, shape_only_rngs

GiB = 2 ** 30


@dataclasses.dataclass
class Plan:
    mesh: dict[str, int]
    source: str                                  # how the abstract params were obtained
    params_by_module: dict[str, int]
    total_params: int
    trainable_params: int
    bytes_per_device: dict[str, float]           # params, grads, opt_state, activations (estimate)
    flops_per_step: float
    tokens_per_step: int
    step_time_s: dict[str, float]                # accelerator -> seconds at `mfu`
    fits: dict[str, bool]                        # accelerator -> total bytes/device <= HBM
    mfu: float

    def to_text(self) -> str:
        n = math.prod(self.mesh.values())
        lines = [f"mesh {self.mesh} = {n} devices   (params from {self.source})", "",
                 f"{'module':<34}{'params':>16}"]
        for k, v in self.params_by_module.items():
            lines.append(f"  {k:<32}{v:>16,}")
        lines += [f"  {'total':<32}{self.total_params:>16,}",
                  f"  {'trainable':<32}{self.trainable_params:>16,}", "", "bytes per device:"]
        for k, v in self.bytes_per_device.items():
            lines.append(f"  {k:<32}{v / GiB:>13.2f} GiB")
        lines += ["", f"tokens per step {self.tokens_per_step:,};  training FLOPs per step {self.flops_per_step:.3e}",
                  f"step time at MFU {self.mfu:.0%}:"]
        for k, t in self.step_time_s.items():
            hbm = F.ACCELERATORS[k][1] / GiB
            fit = "fits" if self.fits[k] else "DOES NOT FIT"
            lines.append(f"  {k:<10}{t:>10.3f} s   ({self.tokens_per_step / t:,.0f} tokens/s; {fit} in {hbm:.0f} GiB)")
        return "\n".join(lines)


def table_state(specs: Sequence[F.ParamSpec]) -> nnx.State:
    """An abstract param state (``nnx.Param`` of ``ShapeDtypeStruct`` with logical axes and head
    units, as ``models.layers`` annotates them) from a table."""
    def param(s: F.ParamSpec) -> nnx.Param:
        p = nnx.Param(jax.ShapeDtypeStruct(s.shape, jnp.float32), out_sharding=tuple(s.axes), eager_sharding=False)
        if s.units:
            p.set_metadata("units", tuple(s.units))
        return p
    return nnx.from_flat_state([(tuple(int(p) if p.isdigit() else p for p in s.path.split(".")), param(s))
                                for s in specs])


def abstract_params(cfg: ExperimentConfig):
    """``(graphdef | None, annotated abstract params, extra, source)`` for ``cfg``'s model."""
    spec = model_spec(cfg.model_name)
    try:
        model = abstract_model(lambda: spec.build(cfg, shape_only_rngs(0)))
    except ImportError:
        # a model whose code cannot be imported here: its arithmetic parameter table, when it has
        # one (tests/train/test_train_plan.py checks the MLLM's table against eval_shape)
        if spec.param_table is None:
            raise
        return None, table_state(spec.param_table(cfg)), nnx.State({}), "arithmetic parameter table"
    graphdef, params, extra = nnx.split(model, nnx.Param, ...)
    return graphdef, params, extra, "jax.eval_shape of the model"


def _module_counts(flat: dict[str, jax.ShapeDtypeStruct]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for path, x in sorted(flat.items(), key=lambda kv: "lora" in kv[0].split(".")):
        parts = path.split(".")
        key = parts[0] if len(parts) < 3 or parts[1].isdigit() else ".".join(parts[:2])
        if "lora" in parts:
            key += " (LoRA)"
        out[key] += int(np.prod(x.shape))
    return dict(out)


def _device_bytes(tree) -> float:
    total = 0.0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += float(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
    return total


def activation_bytes(cfg: ExperimentConfig, mesh: dict[str, int], batch: int, seq_len: int,
                     images_per_sample: int) -> float:
    """Per-device activation memory, estimated (Korthikanti et al. 2022): per layer and token
    ``(34 d + 5 heads T) * bytes/2`` without recomputation, ``2 d * bytes/2`` with ``remat``
    (plus one layer's full set), logits in float32 twice (value and gradient). Batch is split
    over data x fsdp, the rest over tensor."""
    m = cfg.model
    dp, tp = mesh["data"] * mesh["fsdp"], mesh["tensor"]
    b = batch / dp

    def stack(d, heads, layers, t, n_seq, dtype, remat):
        k = jnp.dtype(dtype).itemsize / 2
        full = (34 * d + 5 * heads * t) * k
        per_tok = (2 * d * k * layers + full) if remat else full * layers
        return n_seq * t * per_tok / tp

    dec = m.decoder
    out = stack(dec.hidden_size, dec.num_heads, dec.num_layers, seq_len, b, dec.dtype, dec.remat)
    out += 2 * 4 * b * seq_len * dec.vocab_size / tp
    if cfg.model_name == "mllm" and images_per_sample:
        v = m.vision
        t = v.num_patches + (v.variant == "clip")
        out += stack(v.hidden_size, v.num_heads, v.num_layers, t, b * images_per_sample, v.dtype, v.remat)
    return out


def make_plan(cfg: ExperimentConfig, mesh_shape: Sequence[int], *, global_batch: Optional[int] = None,
              processes: Optional[int] = None, mfu: float = 0.4,
              accelerators: Sequence[str] = ("tpu-v5p", "h100", "h200")) -> Plan:
    """The ``Plan`` of ``cfg`` on a ``(data, fsdp, tensor)`` mesh (any size; nothing allocated).

    The global batch is ``global_batch``, or ``data.batch_size`` (which is per process) times
    ``processes`` (default 1: the batch of a one-process run); give one of the two. Sequences are
    ``max(data.seq_buckets)`` long with ``data.max_images`` images each. With ``streams`` a step
    reads one batch of each stream (its ``data.batch_size`` times ``processes``;
    ``global_batch`` is refused), and the plan counts them all. Under
    ``train.optim.grad_accum`` the step scans over micro-batches, so the activations are those
    of one micro-batch (``global_batch / grad_accum``)."""
    if len(mesh_shape) != 3 or any(int(s) < 1 for s in mesh_shape):
        raise ValueError(f"mesh {tuple(mesh_shape)}: expected 3 sizes (data, fsdp, tensor), each >= 1 "
                         "(plan has no devices to fill a -1 with)")
    if not mfu > 0:
        raise ValueError(f"mfu {mfu}: must be > 0")
    if global_batch is not None and global_batch < 1:
        raise ValueError(f"global batch {global_batch}: must be >= 1")
    if processes is not None and processes < 1:
        raise ValueError(f"processes {processes}: must be >= 1")
    if global_batch is not None and processes is not None:
        raise ValueError(f"global batch {global_batch} and processes {processes}: give one (the global batch is "
                         "data.batch_size per process times the processes)")
    unknown = [a for a in accelerators if a not in F.ACCELERATORS]
    if unknown:
        raise ValueError(f"accelerators {unknown}: unknown; known: {sorted(F.ACCELERATORS)}")
    cfg = cfg.resolved()
    mesh = AbstractMesh(tuple(int(s) for s in mesh_shape), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    graphdef, params, extra, source = abstract_params(cfg)
    optim = cfg.train.optim
    check_freeze_mask([path_str(p) for p, _ in nnx.to_flat_state(params)], optim)
    trainable, frozen = nnx.split_state(params, trainable_filter(optim), ...)
    tx, _ = build_optimizer(optim, max(cfg.train.steps, 1))
    abstract, _ = abstract_from_states(graphdef, trainable, frozen, extra, tx, mesh)

    flat = {path_str(p): v for p, v in nnx.to_flat_state(nnx.as_pure(params))}
    counts = _module_counts(flat)
    # what one step reads: one batch of `data`, or with `streams` one batch of each stream (the
    # step's loss sees them all, so their FLOPs, tokens and activations add up; `data` is unused)
    if cfg.streams and global_batch is not None:
        raise ValueError(f"global batch {global_batch}: the config has streams {[s.name for s in cfg.streams]}, "
                         "each batched by its own data.batch_size (per process); one global batch does not apply. "
                         "Give the number of processes instead (--processes N): each stream's global batch is "
                         "its data.batch_size times N")
    batches = ([(f"stream {s.name!r}: ", s.data) for s in cfg.streams] if cfg.streams
               else [("", cfg.data)])
    mesh_dict = dict(mesh.shape)
    accum = optim.grad_accum      # the step scans over micro-batches: one micro-batch's activations live
    v = cfg.model.vision
    spec = model_spec(cfg.model_name)
    act = flops = 0.0
    trained = {path_str(p) for p, _ in nnx.to_flat_state(trainable)}
    tokens = 0
    for where, data in batches:
        B, T, images = global_batch or data.batch_size * (processes or 1), max(data.seq_buckets), data.max_images
        if B % (mesh_dict["data"] * mesh_dict["fsdp"]):
            raise shd.ShardingError(f"{where}global batch {B} is not divisible by data x fsdp = "
                                    f"{mesh_dict['data'] * mesh_dict['fsdp']} (mesh {mesh_dict})")
        if B % accum:
            raise ValueError(f"{where}global batch {B} is not divisible by train.optim.grad_accum={accum}")
        act += activation_bytes(cfg, mesh_dict, B // accum, T, images)
        shapes = {"input_ids": (B, T), "pixel_values": (B, images, v.image_size, v.image_size, v.num_channels)}
        if spec.flops_parts is not None:      # frozen params: the backward pass it does
            flops += F.train_flops_of(spec.flops_parts(cfg, shapes), trained)
        else:
            flops += F.train_flops(spec.forward_flops(cfg, shapes) if spec.forward_flops
                                   else 2.0 * sum(counts.values()) * B * T)
        tokens += B * T
    bytes_ = {"params": _device_bytes((abstract.params, abstract.frozen)),
              "grads": _device_bytes(abstract.params),
              "opt_state": _device_bytes(abstract.opt_state),
              "activations (estimate)": act}
    bytes_["total"] = sum(bytes_.values())
    n = mesh.size
    times = {a: flops / (n * F.ACCELERATORS[a][0] * mfu) for a in accelerators}
    fits = {a: bytes_["total"] <= F.ACCELERATORS[a][1] for a in accelerators}
    return Plan(mesh_dict, source, counts, sum(counts.values()),
                sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params)),
                bytes_, flops, tokens, times, fits, mfu)


__all__ = ["Plan", "make_plan", "abstract_params", "table_state", "activation_bytes"]
