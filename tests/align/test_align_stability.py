"""Extreme settings: tiny gamma and long sequences in float32; log-GAK at length 1024 (slow)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tslearn.backend import instantiate_backend
from tslearn.metrics._gak import _log_unnormalized_gak

from mllm_jax.align import gak, softdtw


def test_softdtw_float32_tiny_gamma_length_1024():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 1024, 2)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(1, 1024, 2)), jnp.float32)
    v, g = jax.jit(jax.value_and_grad(lambda a, b: softdtw(a, b, 1e-3).sum()))(x, y)
    assert np.isfinite(float(v)) and bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(g).max()) > 0
    # gamma -> 0 approaches DTW: the value is a lower bound of the cost of the diagonal path
    assert float(v) <= float(jnp.sum((x - y) ** 2)) + 1e-2


@pytest.mark.slow
def test_log_gak_length_1024_against_tslearn_log_space():
    """tslearn's linear recursion overflows past ~400 steps and falls back to log space; ours
    (rescaled linear sweep, float32, no fallback) must agree with that. Slow (13 s warm, more in
    a fresh venv where tslearn's numba kernels compile); the default suite's long-sequence check
    is the 128 x 128 gradient of test_gak_auto_is_exact_where_the_linear_sweep_loses_mass_silently
    (the 64 x 57 and 150 x 150 gradient test below is slow too)."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(1, 1024, 2)), rng.normal(size=(1, 1000, 2))
    be = instantiate_backend("numpy")
    ref = _log_unnormalized_gak(x[0], y[0], 1.0, be)
    refn = ref - 0.5 * (_log_unnormalized_gak(x[0], x[0], 1.0, be)
                        + _log_unnormalized_gak(y[0], y[0], 1.0, be))
    kw = dict(method="linear", log=True)
    f = jax.jit(lambda a, b: (gak(a, b, 1.0, normalize=False, **kw), gak(a, b, 1.0, **kw),
                              jax.grad(lambda a: gak(a, b, 1.0, **kw).sum())(a)))
    lk, lkn, g = f(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    assert np.isfinite(ref) and abs(float(lk[0]) - ref) / abs(ref) < 1e-5
    assert abs(float(lkn[0]) - refn) / abs(refn) < 1e-4
    assert bool(jnp.all(jnp.isfinite(g)))


def test_gak_tiny_sigma_does_not_underflow():
    """Every local kernel value underflows float32 (z ~ 1e3) but the default (log) GAK stays
    exact: float32 matches the float64 computation (before, this compared the default method
    with method="log", i.e. with itself)."""
    rng = np.random.default_rng(2)
    xs, ys = rng.normal(size=(2, 30, 3)), rng.normal(size=(2, 40, 3))
    got = gak(jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32), 0.02, normalize=False, log=True)
    with jax.enable_x64(True):
        ref = gak(jnp.asarray(xs), jnp.asarray(ys), 0.02, normalize=False, log=True, method="log")
        assert ref.dtype == jnp.float64
        ref = np.asarray(ref)
    assert np.isfinite(np.asarray(got)).all() and ref.max() < -1e3      # far below float32's exp range
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)


@pytest.mark.slow  # ~33 s cold; a 128 x 128 GAK gradient stays in the default suite (test_gak_auto_is_exact_...)
def test_gak_gradient_over_long_sequences_matches_the_log_sweep():
    """The linear-space backward pass renormalises its running path sums: N(0,1) data in 16-d
    (log k ~ -16 per cell), 64 x 57 cells, float64 -> the log-space method's gradient (the sums
    used to flush to 0 after a few dozen diagonals: relative error 0.57). Also float32 on unit
    vectors at sigma=0.5, 150 x 150 (error 1.0 before)."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x, y = rng.normal(size=(1, 64, 16)), rng.normal(size=(1, 57, 16))

        def grad(method, dt, a, b, s):
            f = lambda v: gak(v, jnp.asarray(b, dt), s, log=True, method=method).sum()  # noqa: E731
            return np.asarray(jax.jit(jax.grad(f))(jnp.asarray(a, dt)))   # one compile, not op by op
        ref = grad("log", jnp.float64, x, y, 1.0)
        np.testing.assert_allclose(grad("linear", jnp.float64, x, y, 1.0), ref, atol=1e-9 * np.abs(ref).max())
        u, v = rng.normal(size=(2, 1, 150, 8))
        u, v = u / np.linalg.norm(u, axis=-1, keepdims=True), v / np.linalg.norm(v, axis=-1, keepdims=True)
        ref = grad("log", jnp.float64, u, v, 0.5)
    got = grad("linear", jnp.float32, u, v, 0.5)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()


def test_gak_auto_is_exact_where_the_linear_sweep_loses_mass_silently():
    """The per-diagonal rescaled linear sweep drops cells far below their diagonal's largest
    even when most alignments pass through them; ``K`` stays finite, so nothing flags it.
    float32 against tslearn (float64, log space): (a) 1-d integers, sigma^2 = 1/2 (k = e^-(x-y)^2
    / (2 - e^-(x-y)^2)): the linear sweep gave log K = -245.6 instead of -192.0 and a gradient
    of 4e24; (b) N(0, 1) in 32-d, sigma = 1, 128 x 128: log K off by 3.1, and the gradient of the
    normalised log-GAK (where the backward sweep loses mass the same way) off by 20 times its
    largest entry."""
    be = instantiate_backend("numpy")
    s = float(np.sqrt(0.5))
    x = np.array([[1.0, 15, 11, 15, 14]])[..., None]
    y = np.array([[10.0, 7, 4, 14, 5, 11]])[..., None]
    kw = dict(normalize=False, log=True)
    v, g = jax.jit(jax.value_and_grad(lambda a: gak(a, jnp.asarray(y, jnp.float32), s, **kw).sum()))(
        jnp.asarray(x, jnp.float32))
    ref = _log_unnormalized_gak(x[0], y[0], s, be)
    h, eye = 1e-5, np.eye(5)[..., None]
    fd = [(_log_unnormalized_gak(x[0] + h * e, y[0], s, be)
           - _log_unnormalized_gak(x[0] - h * e, y[0], s, be)) / (2 * h) for e in eye]
    assert abs(float(v) - ref) < 1e-4 * abs(ref)
    np.testing.assert_allclose(np.asarray(g)[0, :, 0], fd, rtol=1e-4, atol=1e-3)

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(1, 128, 32)), rng.normal(size=(1, 128, 32))
    ref = _log_unnormalized_gak(x[0], y[0], 1.0, be)
    got = gak(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), 1.0, **kw)
    assert abs(float(got[0]) - ref) < 1e-5 * abs(ref)      # float32 rounding: ~1e-3 of 4e3

    def grad(dt, **kw):
        return np.asarray(jax.jit(jax.grad(lambda a: gak(a, jnp.asarray(y, dt), 1.0, log=True, **kw).sum()))(
            jnp.asarray(x, dt)))
    with jax.enable_x64(True):
        ref = grad(jnp.float64, method="log")
    assert np.abs(grad(jnp.float32) - ref).max() < 1e-3 * np.abs(ref).max()   # was 20x


def test_gak_linear_one_row_table_is_the_product_of_its_local_kernels():
    """One element against several: a single alignment, ``log K = sum_j log k(x_0, y_j)``
    (hand-computed), in both dtypes (the log sweep has its own tests). Each ``log k = -400`` is
    far below float32's (and, at ``-1600``, float64's) exp range: the linear sweep took its
    scale from the empty diagonal -1 / the non-feeding diagonal t-2 and returned ``-inf``."""
    for dt, dist2 in ((jnp.float32, 200.0), (jnp.float64, 800.0)):
        with jax.enable_x64(dt == jnp.float64):
            sigma = 0.5
            z = dist2 / (2 * sigma ** 2)
            lk = -z - np.log(2 - np.exp(-z))
            x = jnp.zeros((1, 1, 1), dt)
            y = jnp.full((1, 3, 1), np.sqrt(dist2), dt)
            for method in ("linear",):
                for a, b in ((x, y), (y, x)):
                    v = gak(a, b, sigma, normalize=False, log=True, method=method)
                    np.testing.assert_allclose(np.asarray(v), [3 * lk], rtol=1e-6)
                g = jax.grad(lambda v: gak(v, y, sigma, normalize=False, log=True,
                                           method=method).sum())(x + 0.1)
                # d/dx sum_j log k(x, y_j), log k = -z - log(2 - e^-z), z = (x - y)^2 / (2 s^2)
                zz = (0.1 - np.sqrt(dist2)) ** 2 / (2 * sigma ** 2)
                dz = (0.1 - np.sqrt(dist2)) / sigma ** 2
                ref = 3 * dz * (-1 - np.exp(-zz) / (2 - np.exp(-zz)))
                np.testing.assert_allclose(np.asarray(g).ravel(), [ref], rtol=1e-5)
