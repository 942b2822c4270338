"""The eval step and ``evaluate``: each eval metric pooled over the eval batches by what it is a
mean over (tokens, pairs, examples; counts are summed), so it is the metric of the whole eval set.
``fit`` (``train/loop.py``) runs them every ``train.eval_every`` steps."""
from __future__ import annotations

import functools
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp

from mllm_jax import sharding as shd
from mllm_jax.train import distributed
from mllm_jax.train.state import TrainState

COUNT_SUFFIXES = ("_tokens", "_pairs")
EXAMPLES = "examples"     # eval_step's count of the batch's real rows (the fallback weight)


def _examples(batch) -> jax.Array:
    """The real rows of a (global) batch: rows with ``sample_index >= 0`` where it has one (the
    rest pad an epoch's last batch), else all. A batch of streams or views: the largest count."""
    if isinstance(batch, dict) and any(isinstance(v, dict) for v in batch.values()):
        return functools.reduce(jnp.maximum, [_examples(v) for v in batch.values() if isinstance(v, dict)])
    if isinstance(batch, dict) and "sample_index" in batch:
        return jnp.sum(batch["sample_index"] >= 0).astype(jnp.float32)
    return jnp.float32(jax.tree.leaves(batch)[0].shape[0])


def make_eval_step(loss_fn: Callable, mesh=None, rules: shd.Rules = shd.DEFAULT_RULES):
    """``eval_step(state, batch) -> {"loss": .., "loss/<part>": .., "examples": ..}``
    (deterministic: rngs=None; ``loss_fn`` a ``loop.LossFn``); ``examples`` is the batch's real
    rows, a weight for ``evaluate``."""
    def step(state: TrainState, batch):
        with shd.activation_sharding(mesh, rules):
            model = state.model()
            model.eval()
            loss, parts = loss_fn(model, batch, None)
        return {"loss": loss, **{f"loss/{k}": v for k, v in parts.items()}, EXAMPLES: _examples(batch)}
    return step


def _eval_weight(name: str, m: dict) -> Optional[str]:
    """The key of ``m`` (one batch's metrics) whose value weights metric ``name`` in ``evaluate``;
    None for a count."""
    if name.endswith(COUNT_SUFFIXES):
        return None
    if name == "loss":
        shared = {_eval_weight(k, m) for k in m if k.startswith("loss/")} - {None}
        return shared.pop() if len(shared) == 1 else EXAMPLES
    part = name.removeprefix("loss/")
    for mean in ("ntp", "z_loss"):
        tokens = f"loss/{part.removesuffix(mean)}ntp_tokens"
        if part.endswith(mean) and tokens in m:
            return tokens
    return f"{name}_pairs" if f"{name}_pairs" in m else EXAMPLES


def evaluate(eval_step, state: TrainState, batches: Iterator, steps: int, mesh, rules,
             hooks: Sequence[Callable] = ()) -> dict[str, float]:
    """``eval_step``'s metrics over ``steps`` batches (fewer where every process's data ends
    first; a process whose data ended while others go on feeds padding rows, so every process's
    rows count) as the metrics of all of them together (as if one batch held them), plus each hook's
    ``hook(model, step)`` dict. By name, a metric is

        loss/<x>_tokens, loss/<x>_pairs   a count: summed
        loss/<p>ntp, loss/<p>z_loss       a token mean: weighted by that next-token loss's loss/<p>ntp_tokens
        loss/<x> with a loss/<x>_pairs    a mean over pairs: weighted by them
        loss                              weighted as the other parts, when they all share one weight
                                          (a next-token objective's loss: by its tokens)
        anything else                     weighted by ``examples``, the batch's real rows (1 per batch
                                          when ``eval_step`` does not return it): per-example means
                                          (contrastive parts), statistics (structure_corr), and the loss
                                          of a recipe whose terms are means over different things
    """
    acc, n = {}, 0           # metric -> (sum of weight * value, sum of weights, sum of values)
    batch = None
    for _ in range(steps):
        batch, ended = distributed.next_or_blank_on_every_process(batches, batch)   # the same eval steps everywhere
        if ended:
            break
        m = jax.device_get(eval_step(state, distributed.global_batch(batch, mesh, rules)))
        m = {EXAMPLES: 1.0, **{k: float(v) for k, v in m.items()}}
        for k, v in m.items():
            w = m[_eval_weight(k, m)] if not k.endswith(COUNT_SUFFIXES) else 0.0
            sw, sum_w, s = acc.get(k, (0.0, 0.0, 0.0))
            acc[k] = (sw + w * v, sum_w + w, s + v)
        n += 1
    # a count is the sum; a mean over nothing at all (no tokens in any batch) the plain mean
    out = {f"eval/{k}": s if k.endswith(COUNT_SUFFIXES) else sw / sum_w if sum_w else s / n
           for k, (sw, sum_w, s) in acc.items() if k != EXAMPLES}
    if hooks:
        model, step = state.model(), int(state.step)
        for hook in hooks:
            out.update({f"eval/{k}": v for k, v in hook(model, step).items()})
    return out


__all__ = ["make_eval_step", "evaluate", "COUNT_SUFFIXES", "EXAMPLES"]
