"""One device mesh ``('data', 'fsdp', 'tensor')`` and the logical-axis rules that map onto it.

Every parameter carries logical axis names (``nnx.with_partitioning(init, ('embed', 'mlp'))``,
stored by Flax as the ``out_sharding`` metadata). Nothing is sharded eagerly at construction:
``create_sharded_model`` builds the abstract model with ``nnx.eval_shape``, maps the logical
names to mesh axes through ``rules``, checks that every sharded dimension divides its mesh axes,
and materialises the parameters directly into their shards under ``jax.jit`` (never
load-then-shard). The same code runs on 1 CPU, 8 fake CPU devices, a GPU host and a TPU pod.

Axis types are ``Auto`` on purpose: the train/eval steps are ``jax.jit`` functions with explicit
in/out shardings and a few activation constraints (``constrain``); GSPMD propagates the rest.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis (or tuple of axes, or None = replicated)
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("lora_rank", None),
    ("norm", None),
    ("patch", None),
    ("channels", None),
    ("position", None),
    ("prompts", None),
)


class ShardingError(ValueError):
    """A dimension does not divide the mesh axes it is sharded over (message names the array)."""


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """Builds the ``('data','fsdp','tensor')`` mesh; one of the sizes may be -1 (fill the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ShardingError("make_mesh: at most one of data/fsdp/tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"make_mesh: data, fsdp, tensor = {sizes}: each must be >= 1 (or one of them -1)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ShardingError(f"make_mesh: {n} devices are not divisible by {known} (= product of the fixed axes)")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ShardingError(
            f"make_mesh: data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {math.prod(sizes)} "
            f"but {n} devices are available")
    try:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # non-physical layouts (fake CPU devices, odd shapes)
        arr = np.array(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules = DEFAULT_RULES) -> P:
    """Maps logical axis names to a ``PartitionSpec``; a mesh axis is used at most once."""
    if not names:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ShardingError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        axes = table[name]
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes_t = tuple(a for a in axes_t if a not in used)
        used.update(axes_t)
        out.append(None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t)
    return P(*out)


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    if isinstance(entry, str):
        return mesh.shape[entry]
    return math.prod(mesh.shape[a] for a in entry)


def check_divisible(path: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
    for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        k = _axis_size(mesh, entry)
        if size % k:
            raise ShardingError(
                f"{path}: dimension {dim} of shape {tuple(shape)} has size {size}, which mesh axis "
                f"{entry!r} of size {k} does not divide (mesh {dict(mesh.shape)}). Change the model "
                "dimension, the mesh shape, or the logical-axis rule.")


def check_units(path: str, shape: Sequence[int], spec: P, units: Sequence[int | None], mesh: Mesh) -> None:
    """A sharded dimension that packs ``units[dim]`` whole units (attention heads; see
    ``layers.mark_units``) must split them evenly: a head is never cut across devices."""
    for dim, (n, entry) in enumerate(zip(units, tuple(spec) + (None,) * len(shape))):
        k = _axis_size(mesh, entry)
        if n and n % k:
            raise ShardingError(
                f"{path}: dimension {dim} of shape {tuple(shape)} packs {n} heads, which mesh axis "
                f"{entry!r} of size {k} does not divide (mesh {dict(mesh.shape)}); a head would be split "
                "across devices. Use a head count divisible by the tensor axis, or a smaller tensor axis.")


def _path_str(path) -> str:
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        parts.append(str(key))
    return ".".join(parts)


def state_shardings(state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """``NamedSharding`` for every variable in an (abstract) ``nnx.State``, divisibility checked."""
    def one(path, var):
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        shape = getattr(value, "shape", ())
        spec = logical_to_spec(names, rules) if names else P()
        if len(spec) > len(shape):
            raise ShardingError(f"{_path_str(path)}: {len(spec)} logical names for shape {tuple(shape)}")
        check_divisible(_path_str(path), shape, spec, mesh)
        units = var.get_metadata().get("units") if isinstance(var, nnx.Variable) else None
        if units:
            check_units(_path_str(path), shape, spec, units, mesh)
        s = NamedSharding(mesh, spec)
        return var.replace(s) if isinstance(var, nnx.Variable) else s
    return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded_model(ctor: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Builds ``ctor()`` with every parameter created directly in its shard on ``mesh``."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(ctor)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh, rules)

    @jax.jit
    def init():
        with nnx.use_eager_sharding(False):
            return nnx.split(ctor())[1]

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Moves an existing (e.g. just loaded) model's variables onto the mesh by the rules."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    state = jax.device_put(state, shardings)
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dim over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def shard_batch(batch, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """``device_put`` a host batch (pytree of arrays, batch-major) onto the mesh, checked."""
    def put(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        s = batch_sharding(mesh, x.ndim, rules) if x.ndim else NamedSharding(mesh, P())
        if x.ndim:
            check_divisible(f"batch.{_path_str(path)}", x.shape, s.spec, mesh)
        return jax.device_put(x, s)
    return jax.tree.map_with_path(put, batch)


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


# ---- activation constraints ------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mllm_jax_activation_mesh", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
    """Within this context (at trace time), ``constrain`` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, rules) if mesh is not None else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Iterable[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside ``activation_sharding``."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(tuple(names), rules)
    for size, entry in zip(x.shape, spec):
        if size % _axis_size(mesh, entry):
            return x  # do not force an indivisible layout on an activation; let GSPMD choose
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


__all__ = [
    "MESH_AXES", "DEFAULT_RULES", "ShardingError", "make_mesh", "logical_to_spec",
    "check_divisible", "check_units", "state_shardings", "create_sharded_model", "shard_model",
    "batch_sharding", "shard_batch", "replicate", "activation_sharding", "constrain",
]
