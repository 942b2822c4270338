"""The train state and its abstract (shape / dtype / sharding) twin.

``TrainState`` is one pytree of plain arrays, split from an ``nnx.Module`` once:

    graphdef    static: the module structure (``nnx.merge(graphdef, params, frozen, extra)``)
    params      trainable ``nnx.Param``s (by the freeze mask)      -> differentiated, optimised
    frozen      the other ``nnx.Param``s                            -> closed over, never updated
    extra       every non-Param variable (RNG streams, counters)    -> threaded through the step
    opt_state   optax state over ``params`` only
    step        int32[]; rng uint32[2] (raw key data; per-step keys are ``fold_in(rng, step)``)
    bad_streak  int32[] consecutive non-finite steps; skipped int32[] all skipped steps

Shardings come from the params' logical axis names (``mllm_jax.sharding``); the optimiser
state inherits them because optax maps over the annotated ``nnx.Variable``s. Nothing is ever
materialised unsharded: ``create_train_state`` initialises under ``jax.jit`` with
``out_shardings``; ``abstract_train_state`` (``jax.eval_shape``) allocates nothing and is
what checkpoints are restored into and what ``plan`` measures.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mllm_jax import sharding as shd
from mllm_jax.config import OptimConfig
from mllm_jax.train.optim import check_freeze_mask, path_str, trainable_filter


@struct.dataclass
class TrainState:
    graphdef: Any = struct.field(pytree_node=False)
    params: nnx.State
    frozen: nnx.State
    extra: nnx.State
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    bad_streak: jax.Array
    skipped: jax.Array

    def model(self) -> nnx.Module:
        """The live module, in eval mode (no dropout: for evaluation / export; not for use inside
        a loop). ``.train()`` on it switches dropout back on."""
        model = nnx.merge(self.graphdef, self.params, self.frozen, self.extra)
        model.eval()
        return model

    def all_params(self) -> nnx.State:
        """Trainable and frozen params together, in the module's layout."""
        return nnx.merge_state(self.params, self.frozen)


ModelFn = Callable[[], nnx.Module]


def split_model(model: nnx.Module, cfg: OptimConfig):
    """``(graphdef, params, frozen, extra)`` as annotated (Variable) states; checks the mask."""
    graphdef, params, frozen, extra = nnx.split(model, trainable_filter(cfg), nnx.Param, ...)
    all_paths = [path_str(p) for p, _ in nnx.to_flat_state(nnx.merge_state(params, frozen))]
    check_freeze_mask(all_paths, cfg)
    return graphdef, params, frozen, extra


def _shardable(tree, mesh: Mesh | None = None, rules: shd.Rules = shd.DEFAULT_RULES):
    """Drops the logical names of optimiser-state leaves whose rank differs from their param's
    (Adafactor's factored moments): those are replicated. With ``mesh`` (optimiser state only:
    the params were checked strictly under the same names), also those of leaves whose shape the
    mesh does not divide: Adafactor's ``(1,)`` placeholder moments of a 1-D param (a bias sharded
    over 'fsdp' or 'tensor') are replicated instead of failing the divisibility check."""
    def fix(v):
        if isinstance(v, nnx.Variable):
            names = v.get_metadata().get("out_sharding")
            shape = getattr(v.get_value(), "shape", ())
            if names and len(names) != len(shape):
                return v.replace(out_sharding=None)
            if names and mesh is not None:
                try:
                    shd.check_divisible("", shape, shd.logical_to_spec(names, rules), mesh)
                except shd.ShardingError:
                    return v.replace(out_sharding=None)
        return v
    return jax.tree.map(fix, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _pure_shardings(tree, mesh, rules, *, opt_state: bool = False):
    return nnx.as_pure(shd.state_shardings(_shardable(tree, mesh if opt_state else None, rules), mesh, rules))


def abstract_from_states(graphdef, params, frozen, extra, tx: optax.GradientTransformation,
                         mesh: Mesh, rules: shd.Rules = shd.DEFAULT_RULES) -> tuple[TrainState, TrainState]:
    """``(abstract, shardings)`` from annotated abstract states: ``abstract`` holds
    ``jax.ShapeDtypeStruct``s carrying their ``NamedSharding``."""
    opt = jax.eval_shape(tx.init, params)
    rep = NamedSharding(mesh, P())
    shardings = TrainState(graphdef, _pure_shardings(params, mesh, rules), _pure_shardings(frozen, mesh, rules),
                           _pure_shardings(extra, mesh, rules), _pure_shardings(opt, mesh, rules, opt_state=True),
                           rep, rep, rep, rep)
    shapes = TrainState(graphdef, *(nnx.as_pure(t) for t in (params, frozen, extra, opt)),
                        jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32),
                        jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return abstract, shardings


def shape_only_rngs(seed: int = 0) -> nnx.Rngs:
    """``nnx.Rngs`` for a model built under ``eval_shape`` only, with numpy counters (same keys).
    Each update of a traced counter makes flax ask the tracer for ``.sharding``, and JAX's
    error text for that walks the whole trace: quadratic in the number of params (the 7B
    LLaVA of vila7b_sugar.yaml: 9.4 s -> 1.5 s on 2 cores)."""
    rngs = nnx.Rngs(seed)
    for _, stream in rngs.items():
        stream.count = nnx.RngCount(np.zeros(np.shape(stream.count[...]), np.uint32), tag=stream.tag)
    return rngs


def abstract_model(model: nnx.Module | ModelFn) -> nnx.Module:
    """An abstract module (ShapeDtypeStruct values): built with ``nnx.eval_shape`` from a
    constructor, so no memory is allocated, or taken from an existing module's shapes."""
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(model)


def abstract_train_state(model: nnx.Module | ModelFn, tx: optax.GradientTransformation, cfg: OptimConfig,
                         mesh: Mesh, rules: shd.Rules = shd.DEFAULT_RULES) -> tuple[TrainState, TrainState]:
    """``(abstract, shardings)`` of the train state for ``model`` (a module or a constructor)."""
    return abstract_from_states(*split_model(abstract_model(model), cfg), tx, mesh, rules)


def create_train_state(model: nnx.Module | ModelFn, tx: optax.GradientTransformation, cfg: OptimConfig,
                       mesh: Mesh, *, seed: int, rules: shd.Rules = shd.DEFAULT_RULES
                       ) -> tuple[TrainState, TrainState]:
    """A fresh train state placed on ``mesh``, and its shardings.

    From a constructor, every parameter is created directly in its shard under ``jax.jit``;
    from a module (e.g. one just loaded from HF), its arrays are moved into their shards.
    """
    abstract, shardings = abstract_train_state(model, tx, cfg, mesh, rules)

    def finish(params, frozen, extra):
        return TrainState(abstract.graphdef, params, frozen, extra, tx.init(params),
                          jnp.zeros((), jnp.int32), jax.random.key_data(jax.random.key(seed)),
                          jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    if isinstance(model, nnx.Module):
        _, params, frozen, extra = nnx.as_pure(split_model(model, cfg))
        parts = jax.device_put((params, frozen, extra), (shardings.params, shardings.frozen, shardings.extra))
        return jax.jit(finish, out_shardings=shardings)(*parts), shardings

    def init():
        with nnx.use_eager_sharding(False):
            _, params, frozen, extra = nnx.as_pure(split_model(model(), cfg))
        return finish(params, frozen, extra)
    return jax.jit(init, out_shardings=shardings)(), shardings


def count_params(state: nnx.State | dict) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state))


def unflatten_like(like: nnx.State, flat: dict[str, Any]) -> nnx.State:
    """The state with ``like``'s structure whose leaves are ``flat[dotted.path]`` (the inverse
    of ``convert.hf.flat_params``)."""
    return nnx.from_flat_state([(p, flat[path_str(p)]) for p, _ in nnx.to_flat_state(like)])


__all__ = ["TrainState", "split_model", "abstract_from_states", "abstract_model", "shape_only_rngs",
           "abstract_train_state", "create_train_state", "count_params", "unflatten_like"]
