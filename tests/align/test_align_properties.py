"""Invariants of mllm_jax.align that need no reference implementation: padding, bands, the
divergence, the custom derivative against autodiff of the forward sweep, chunked sweeps,
jit / vmap / grad, sharding, and hand-computable cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax.align import (_wavefront as wf, gak, gak_from_log_kernel, gak_pairwise, softdtw,
                            softdtw_divergence, softdtw_divergence_pairwise, softdtw_from_cost,
                            softdtw_pairwise)
from mllm_jax.align.softdtw import _COST, _forward, sdtw_core
from mllm_jax.sharding import make_mesh


def _pad(x, n):
    return np.concatenate([x, 100 * np.ones((n - len(x),) + x.shape[1:])])  # junk padding


def test_hand_computed_softdtw_and_gak():
    # one element each: sdtw = cost, K = k
    x, y = jnp.array([[[1.0, 2.0]]]), jnp.array([[[3.0, 2.0]]])
    assert np.isclose(float(softdtw(x, y, 0.1)[0]), 4.0)
    z = 4.0 / (2 * 2.0 ** 2)
    k = np.exp(-z) / (2 - np.exp(-z))
    assert np.isclose(float(gak(x, y, 2.0, normalize=False)[0]), k, rtol=1e-6)
    # 1 x 2 table, costs c1, c2: only one path -> sdtw = c1 + c2 exactly, any gamma
    c = jnp.array([[[1.5, 2.5]]])
    assert np.isclose(float(softdtw_from_cost(c, 0.7)[0]), 4.0)
    # 2 x 2 table of zeros: 3 paths (two of length 3, one of length 2) -> -gamma log 3
    assert np.isclose(float(softdtw_from_cost(jnp.zeros((1, 2, 2)), 0.5)[0]), -0.5 * np.log(3))
    # GAK with k = 1 everywhere counts the alignment paths of a 4 x 5 table: the Delannoy
    # number D(3, 4) = sum_k C(3, k) C(4, k) 2^k = 1 + 24 + 72 + 32 = 129
    assert np.isclose(float(jnp.exp(gak_from_log_kernel(jnp.zeros((1, 4, 5))))[0]), 129)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_padded_equals_unpadded(dtype):
    rng = np.random.default_rng(0)
    lx, ly, n, m = [7, 3, 1], [4, 6, 2], 8, 6
    xs = [rng.normal(size=(k, 3)) for k in lx]
    ys = [rng.normal(size=(k, 3)) for k in ly]
    X = np.stack([_pad(s, n) for s in xs]); Y = np.stack([_pad(s, m) for s in ys])
    xm = np.arange(n) < np.array(lx)[:, None]
    ym = np.arange(m) < np.array(ly)[:, None]

    def f(a, b, am=None, bm=None):
        return (softdtw(a, b, 0.3, am, bm),
                gak(a, b, 1.5, x_mask=am, y_mask=bm, log=True, method="linear"),
                jax.grad(lambda a: softdtw(a, b, 0.3, am, bm).sum())(a))

    tol = 1e-12 if dtype == jnp.float64 else 1e-6
    with jax.enable_x64(dtype == jnp.float64):
        v, kv, g = jax.jit(f)(jnp.asarray(X, dtype), jnp.asarray(Y, dtype), jnp.asarray(xm),
                              jnp.asarray(ym))
        for i in range(3):
            v1, k1, g1 = jax.jit(f)(jnp.asarray(xs[i][None], dtype), jnp.asarray(ys[i][None], dtype))
            np.testing.assert_allclose(v[i], v1[0], rtol=tol)
            np.testing.assert_allclose(kv[i], k1[0], rtol=tol, atol=tol)
            np.testing.assert_allclose(g[i, :lx[i]], g1[0], rtol=10 * tol, atol=10 * tol)
            assert np.all(np.asarray(g[i, lx[i]:]) == 0)


def test_full_band_equals_no_band():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x, y = jnp.asarray(rng.normal(size=(3, 9, 2))), jnp.asarray(rng.normal(size=(3, 12, 2)))
        a, b, c, d = jax.jit(lambda x, y: (
            softdtw(x, y, 0.4), softdtw(x, y, 0.4, band=12),
            gak(x, y, 1.0), gak(x, y, 1.0, triangular=10 ** 9)))(x, y)  # T -> inf: weights -> 1
    np.testing.assert_allclose(a, b, rtol=1e-13)
    np.testing.assert_allclose(c, d, rtol=1e-7)


def test_divergence_zero_on_diagonal_and_nonnegative():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 10, 3)))
    y = jnp.asarray(rng.normal(size=(6, 13, 3)))
    with jax.enable_x64(True):
        x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
        dxx, dxy, dp, dpxy = jax.jit(lambda x, y: (
            softdtw_divergence(x, x, 0.5), softdtw_divergence(x, y, 0.5),
            softdtw_divergence_pairwise(x, None, 0.5), softdtw_divergence_pairwise(x, y, 0.5)))(x, y)
    np.testing.assert_allclose(dxx, 0, atol=1e-10)
    assert np.all(np.asarray(dxy) > 0)
    np.testing.assert_allclose(np.diagonal(dp), 0, atol=1e-10)
    assert np.all(np.asarray(dp) >= -1e-10)
    np.testing.assert_allclose(np.diagonal(dpxy), dxy, rtol=1e-10)


def test_custom_derivative_equals_autodiff_of_the_forward_sweep():
    """(Chunked sweeps are checked against single ones below.)"""
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        c = jnp.asarray(rng.random(size=(3, 13, 17)) * 4)
        lens = jnp.array([13, 9, 4]), jnp.array([17, 17, 11])
        for x_len, y_len in [(None, None), lens]:
            view, lim, plan, _ = wf.prepare(c, x_len, y_len, None, wf.big(c.dtype))
            ours = jax.jit(jax.grad(lambda v: sdtw_core(v, lim, plan, _COST).sum()))(view)
            auto = jax.jit(jax.grad(lambda v: _forward(v, lim, plan, _COST, False)[0].sum()))(view)
            np.testing.assert_allclose(ours, auto, atol=1e-12)


@pytest.mark.slow  # > 5 s on 2 cores: `make test-slow`
def test_chunked_sweeps_equal_single_sweep(monkeypatch):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 40, 2)))
    y = jnp.asarray(rng.normal(size=(2, 31, 2)))
    xm = jnp.arange(40) < jnp.array([40, 25])[:, None]

    def run():
        return jax.jit(lambda x, y: (
            jax.value_and_grad(lambda x: softdtw(x, y, 0.2, x_mask=xm).sum())(x),
            jax.value_and_grad(lambda x: gak(x, y, 1.0, triangular=12, log=True,
                                             method="linear").sum())(x)))(x, y)

    with jax.enable_x64(True):
        one = run()
        monkeypatch.setattr(wf, "MIN_CELLS_TO_CHUNK", 0)
        monkeypatch.setattr(wf, "MAX_CHUNKS", 3)
        assert len(wf.plan_chunks(31, 40, max_chunks=3).chunks) > 1
        many = run()
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_jit_vmap_grad_and_pairwise_consistency():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 3, 6, 2)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(2, 3, 8, 2)), jnp.float32)

    def f(a, b):
        return (softdtw(a, b, 0.5), jax.grad(lambda a: gak(a, b, 1.0, method="linear").sum())(a),
                softdtw_pairwise(a, b, 0.5), gak_pairwise(a, b, 1.0, method="linear"),
                gak(a, b, 1.0, method="linear"))

    batched = jax.jit(jax.vmap(f))(x, y)
    for i in range(2):
        single = jax.jit(f)(x[i], y[i])
        for a, b in zip(batched, single):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(jnp.diagonal(single[2]), single[0], rtol=1e-6)
        np.testing.assert_allclose(jnp.diagonal(single[3]), single[4], rtol=1e-5)
    # gamma is an ordinary, differentiable input: d sdtw / d gamma by finite differences
    with jax.enable_x64(True):
        c = jnp.asarray(rng.random(size=(2, 5, 7)), jnp.float64)
        f = jax.jit(lambda g: softdtw_from_cost(c, g).sum())
        dg = jax.grad(f)(0.7)
        fd = (f(0.7 + 1e-6) - f(0.7 - 1e-6)) / 2e-6
    np.testing.assert_allclose(dg, fd, rtol=1e-6)


def test_batch_sharded_over_the_mesh():
    mesh = make_mesh(data=8, fsdp=1)
    assert mesh.size == 8
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(8, 12, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 10, 4)), jnp.float32)
    sh = NamedSharding(mesh, P(("data", "fsdp")))
    xs, ys = jax.device_put(x, sh), jax.device_put(y, sh)

    def f(a, b):
        return (softdtw(a, b, 0.3), gak(a, b, 2.0),
                jax.grad(lambda a: softdtw(a, b, 0.3).sum()
                         + gak_pairwise(a, b, 2.0, method="linear").sum())(a))

    ref = jax.jit(f)(x, y)
    out = jax.jit(f)(xs, ys)
    assert not out[0].sharding.is_fully_replicated   # the batch stays split over the devices
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_masks_must_be_prefixes():
    x = jnp.zeros((1, 4, 2))
    with pytest.raises(ValueError, match="prefix"):
        softdtw(x, x, 1.0, x_mask=jnp.array([[True, False, True, True]]))
    with pytest.raises(ValueError, match="at least one"):
        gak(x, x, 1.0, y_mask=jnp.zeros((1, 4), bool))
    with pytest.raises(ValueError, match="sigma"):
        softdtw(x, x, 1.0, cost="neg_log_kernel")


def test_non_positive_gamma_or_sigma_is_refused():
    """softdtw(gamma=0) returned 0 and gak(sigma=0) NaN, silently."""
    x = jnp.zeros((1, 3, 2))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="gamma must be > 0"):
            softdtw(x, x, gamma=bad)
        with pytest.raises(ValueError, match="sigma must be > 0"):
            gak(x, x, bad)
