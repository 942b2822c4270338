"""Optimisers, schedules, weight-decay and freeze masks."""
import dataclasses
import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from mllm_jax import sharding as shd
from mllm_jax.config import OptimConfig
from mllm_jax.train.optim import FreezeMaskError, build_optimizer, check_freeze_mask, decay_mask, make_schedule
from mllm_jax.train.state import abstract_train_state
from tests.toy import TOY_LM, fit_toy, tiny_experiment


def test_warmup_cosine_and_linear_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    s = make_schedule(cfg, 110)
    for step, want in [(0, 0.0), (5, 0.5), (10, 1.0), (60, 0.1 + 0.9 * 0.5), (110, 0.1)]:
        assert float(s(step)) == pytest.approx(want, abs=1e-6), step
    assert float(s(35)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 25 / 100)), abs=1e-6)
    lin = make_schedule(OptimConfig(lr=2.0, warmup_ratio=0.1, schedule="linear"), 100)
    assert [float(lin(k)) for k in (0, 10, 55, 100)] == pytest.approx([0.0, 2.0, 1.0, 0.0], abs=1e-6)
    assert float(make_schedule(OptimConfig(lr=0.3, schedule="constant"), 5)(4)) == pytest.approx(0.3)


def test_freeze_mask_errors_name_the_pattern():
    paths = ["vision.a.kernel", "projector.linear_1.kernel", "decoder.layers.0.q_proj.kernel"]
    assert check_freeze_mask(paths, OptimConfig(trainable=(r"^projector\.",))) == ["projector.linear_1.kernel"]
    assert check_freeze_mask(paths, OptimConfig(frozen=(r"^vision\.",))) == paths[1:]
    with pytest.raises(FreezeMaskError, match=r"'\^projecter\\\\\.' matches no parameter"):
        check_freeze_mask(paths, OptimConfig(trainable=(r"^projecter\.",)))
    with pytest.raises(FreezeMaskError, match="no parameter is trainable"):
        check_freeze_mask(paths, OptimConfig(frozen=(".",)))


def test_weight_decay_skips_biases_and_norm_scales():
    one = lambda *s: np.ones(s, np.float32)  # noqa: E731 - float32 params, as models have
    params = nnx.State({"dense": {"kernel": one(2, 2), "bias": one(2)}, "norm": {"scale": one(2)}})
    mask = decay_mask(OptimConfig())(params)
    assert mask["dense"]["kernel"] is True and mask["dense"]["bias"] is False and mask["norm"]["scale"] is False
    tx, _ = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.5, clip_norm=0), 10)
    grads = jax.tree.map(np.zeros_like, params)
    upd, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, upd)
    assert np.allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5) and np.allclose(new["dense"]["bias"], 1.0)


def test_adafactor_matches_optax_and_decays_like_adamw():
    """Without weight decay our adafactor is optax.adafactor (same updates); the decay is scaled
    by the lr as in adamw: zero gradients move a decayed param by lr * wd (optax's
    weight_decay_rate moved it by wd)."""
    rng = np.random.default_rng(0)
    params = nnx.State({"dense": {"kernel": np.ones((130, 4), np.float32), "bias": np.ones((4,), np.float32)}})
    grads = nnx.State({"dense": {"kernel": rng.normal(size=(130, 4)).astype(np.float32),
                                 "bias": rng.normal(size=(4,)).astype(np.float32)}})
    cfg = OptimConfig(name="adafactor", lr=0.1, schedule="constant", clip_norm=0)
    ours, _ = build_optimizer(cfg, 10)
    ref = optax.adafactor(0.1)
    s1, s2 = ours.init(params), ref.init(params)
    for _ in range(3):
        u1, s1 = ours.update(grads, s1, params)
        u2, s2 = ref.update(grads, s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    tx, _ = build_optimizer(dataclasses.replace(cfg, weight_decay=0.5), 10)
    upd, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, upd)
    assert np.allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5) and np.allclose(new["dense"]["bias"], 1.0)


def test_adafactor_factored_moments_are_replicated_not_misnamed(tmp_path):
    """Adafactor keeps per-row/column moments of a 128x128 matrix; they cannot inherit the
    matrix's 2-D logical names, so they are replicated (and nothing raises)."""
    cfg = tiny_experiment(**{"model.decoder.vocab_size": 128, "model.decoder.hidden_size": 128,
                             "train.optim.name": "adafactor"})
    tx, _ = build_optimizer(cfg.train.optim, 5)
    abstract, shardings = abstract_train_state(lambda: TOY_LM.build(cfg, nnx.Rngs(0)), tx, cfg.train.optim,
                                               shd.make_mesh(2, 2, 2))
    shapes = {tuple(x.shape) for x in jax.tree.leaves(abstract.opt_state)}
    assert (128,) in shapes  # a factored moment of the 128x128 embedding
    for x in jax.tree.leaves(abstract.opt_state):
        if x.shape == (128,):
            assert all(axis is None for axis in x.sharding.spec), x.sharding
    res = fit_toy(tiny_experiment(**{"train.run_dir": str(tmp_path / "r"), "train.steps": 2,
                                     "train.optim.name": "adafactor"}))
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_adafactor_placeholder_moments_of_sharded_biases_are_replicated():
    """Adafactor keeps a ``(1,)`` placeholder ``v_row``/``v_col`` for a 1-D param, under that
    param's logical names: a bias sharded over 'fsdp' (``("embed",)``) or 'tensor' (``("mlp",)``)
    must not turn it into a divisibility error (was: ShardingError "v_row.mlp.fc1.bias:
    dimension 0 of shape (1,) has size 1, which mesh axis 'tensor' of size 4 does not divide")."""
    from mllm_jax.models.layers import MLP

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.mlp = MLP(64, 128, rngs=rngs)   # fc1.bias ("mlp",) -> tensor, fc2.bias ("embed",) -> fsdp

    cfg = OptimConfig(name="adafactor", lr=0.1, schedule="constant", clip_norm=0)
    tx, _ = build_optimizer(cfg, 5)
    abstract, shardings = abstract_train_state(lambda: Net(nnx.Rngs(0)), tx, cfg, shd.make_mesh(1, 2, 4))
    params = {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(abstract.params)}
    assert any("fc1" in k and "bias" in k and s == jax.sharding.PartitionSpec("tensor") for k, s in params.items())
    assert any("fc2" in k and "bias" in k and s == jax.sharding.PartitionSpec("fsdp") for k, s in params.items())
    opt = jax.tree_util.tree_leaves_with_path(abstract.opt_state)
    ones = [(jax.tree_util.keystr(p), x) for p, x in opt if x.shape == (1,) and "bias" in jax.tree_util.keystr(p)]
    assert ones, [jax.tree_util.keystr(p) for p, _ in opt]
    for path, x in ones:
        assert all(axis is None for axis in x.sharding.spec), (path, x.sharding)
    # the full-size second moments of the biases keep their param's layout
    full = [x for p, x in opt if x.shape == (128,) and "fc1" in jax.tree_util.keystr(p)]
    assert full and all(x.sharding.spec == jax.sharding.PartitionSpec("tensor") for x in full)
