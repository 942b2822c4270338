"""Next-token and contrastive losses: hand-computed cases, chunked == dense, sharded == 1 device."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax import sharding as S
from mllm_jax.objectives.contrastive import (contrastive_loss, infonce_chunked, infonce_dense, siglip_chunked,
                                             siglip_dense)
from mllm_jax.objectives.lm import next_token_loss


def test_next_token_loss_hand_computed():
    # position 0: p(label=2) = 2/(1+1+2) = 1/2 -> ln 2; position 1: uniform over 3 -> ln 3; position 2 masked
    logits = jnp.array([[[0.0, 0.0, math.log(2.0)], [5.0, 5.0, 5.0], [100.0, -100.0, 0.0]]])
    labels = jnp.array([[2, 1, 1]])
    mask = jnp.array([[1, 1, 0]])
    loss, parts = next_token_loss(logits, labels, mask)
    assert float(loss) == pytest.approx((math.log(2) + math.log(3)) / 2, rel=1e-6)
    assert float(parts["ntp_tokens"]) == 2
    # z-loss: lse at position 0 is ln 4, at position 1 is 5 + ln 3
    loss_z, parts_z = next_token_loss(logits, labels, mask, z_loss=1e-2)
    z = (math.log(4) ** 2 + (5 + math.log(3)) ** 2) / 2
    assert float(parts_z["z_loss"]) == pytest.approx(z, rel=1e-6)
    assert float(loss_z) == pytest.approx(float(loss) + 1e-2 * z, rel=1e-6)


def test_next_token_loss_ignores_labels_at_masked_positions():
    """Masked positions may hold an ignore label (HF's -100) or any out-of-vocabulary id: the
    loss and its gradient are torch's cross-entropy with ``ignore_index`` (the gather used to
    fill NaN there, and NaN * 0 made the loss NaN)."""
    import torch
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    labels = np.array([[1, -100, 4, -100], [-100, 0, 3, 2]])
    mask = labels != -100
    ref = torch.nn.functional.cross_entropy(torch.tensor(logits).reshape(-1, 5),
                                            torch.tensor(labels).reshape(-1), ignore_index=-100)
    for bad in (-100, 5, 10_000):
        lab = jnp.asarray(np.where(mask, labels, bad))
        loss, g = jax.value_and_grad(lambda lg: next_token_loss(lg, lab, jnp.asarray(mask))[0])(
            jnp.asarray(logits))
        assert float(loss) == pytest.approx(float(ref), rel=1e-6)
        assert bool(jnp.all(jnp.isfinite(g)))


def test_infonce_hand_computed():
    a = jnp.eye(2)
    loss, parts = infonce_dense(a, a, jnp.log(1.0))
    # each row: logits (1, 0) with the positive first -> log(e + 1) - 1
    assert float(loss) == pytest.approx(math.log(math.e + 1) - 1, rel=1e-6)
    assert float(parts["contrastive_acc"]) == 1.0
    # scale 2, b rows swapped: positives now have logit 0 and the negative 2
    loss2, _ = infonce_dense(a, a[::-1], jnp.log(2.0))
    assert float(loss2) == pytest.approx(math.log(1 + math.exp(2)), rel=1e-6)


def test_siglip_hand_computed():
    a = jnp.eye(2)
    t, bias = 3.0, -1.0
    loss, _ = siglip_dense(a, a, jnp.log(t), jnp.asarray(bias))
    # positives: t*1 + b = 2 -> -log s(2); negatives: z=-1 * (0 + b) = 1 -> -log s(1); 2 + 2 terms / B=2
    ls = lambda x: -math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    assert float(loss) == pytest.approx((2 * ls(2.0) + 2 * ls(1.0)) / 2, rel=1e-6)


def _emb(key, n, d):
    x = jax.random.normal(key, (n, d))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_chunked_equals_dense_with_gradients(kind):
    a, b = _emb(jax.random.key(0), 32, 16), _emb(jax.random.key(1), 32, 16)
    ls, bias = jnp.log(10.0), jnp.asarray(-2.0)

    def f(chunk):
        def loss(a, b, ls, bias):
            return contrastive_loss(a, b, kind=kind, log_scale=ls, bias=bias, chunk=chunk)[0]
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(a, b, ls, bias)

    (vd, gd), (vc, gc) = f(None), f(8)
    np.testing.assert_allclose(float(vc), float(vd), rtol=1e-5)
    for x, y in zip(gc, gd):     # the bias / scale gradients are float32 sums of 32 x 32 terms (~20)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of chunk 5"):
        contrastive_loss(a, b, kind=kind, log_scale=ls, bias=bias, chunk=5)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_padding_rows_leave_the_loss_of_the_real_rows(kind, chunk):
    """An epoch's padded last batch: with ``valid``, the loss, its parts and the gradients of the
    real rows equal those of the real rows alone; padding rows get zero gradient."""
    a, b = _emb(jax.random.key(0), 8, 16), _emb(jax.random.key(1), 8, 16)
    valid = jnp.asarray([1, 1, 0, 1, 1, 0, 0, 1], bool)
    keep = np.flatnonzero(np.asarray(valid))
    ls, bias = jnp.log(10.0), jnp.asarray(-2.0)

    def f(a, b, valid, chunk):
        return contrastive_loss(a, b, kind=kind, log_scale=ls, bias=bias, chunk=chunk, valid=valid)

    vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True), static_argnums=3)   # not op by op
    (vp, pp), (ga, gb) = vg(a, b, valid, chunk)
    (vr, pr), (ra, rb) = vg(a[keep], b[keep], None, None)
    np.testing.assert_allclose(float(vp), float(vr), rtol=1e-6)
    for k in pp:   # the chunked InfoNCE has no contrastive_acc
        np.testing.assert_allclose(float(pp[k]), float(pr[k]), rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(np.asarray(ga)[keep], np.asarray(ra), atol=1e-6)
    np.testing.assert_allclose(np.asarray(gb)[keep], np.asarray(rb), atol=1e-6)
    assert not np.asarray(ga)[~np.asarray(valid)].any() and not np.asarray(gb)[~np.asarray(valid)].any()
    # without the mask the padding rows change the loss: the check above is not vacuous
    assert abs(float(f(a, b, None, chunk)[0]) - float(vr)) > 1e-3


@pytest.mark.parametrize("fn", [lambda a, b: infonce_chunked(a, b, jnp.log(5.0), 4)[0],
                                lambda a, b: siglip_chunked(a, b, jnp.log(5.0), jnp.asarray(-1.0), 4)[0],
                                lambda a, b: infonce_dense(a, b, jnp.log(5.0))[0]])
def test_sharded_batch_equals_single_device(fn):
    a, b = _emb(jax.random.key(2), 16, 8), _emb(jax.random.key(3), 16, 8)
    mesh = S.make_mesh(data=4, fsdp=2, tensor=1)
    sa, sb = S.shard_batch({"a": np.asarray(a), "b": np.asarray(b)}, mesh).values()
    g1 = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(a, b)
    g8 = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(sa, sb)
    np.testing.assert_allclose(float(g8[0]), float(g1[0]), rtol=1e-6)
    for x, y in zip(g8[1], g1[1]):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
