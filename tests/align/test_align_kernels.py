"""Local kernels and Sugar's target kernels (triple kernel, pooled cosine)."""
import jax
import jax.numpy as jnp
import numpy as np
from tslearn.metrics import gak as tgak, sigma_gak as t_sigma_gak

from mllm_jax.align import (cosine_distance, gak_log_kernel, pooled_cosine, sigma_gak, softdtw,
                            sqeuclidean, triple_kernel)
from mllm_jax.align.kernels import IMAGE, TEXT


def test_local_costs_batched_and_pairwise():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 4, 5)), rng.normal(size=(2, 6, 5))
    d = ((x[:, None, :, None] - y[None, :, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(sqeuclidean(jnp.asarray(x), jnp.asarray(y), pairwise=True), d,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sqeuclidean(jnp.asarray(x[:2]), jnp.asarray(y)), d[[0, 1], [0, 1]],
                               rtol=1e-5, atol=1e-5)
    xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=-1, keepdims=True)
    cos = 1 - np.einsum("pid,qjd->pqij", xn, yn)
    np.testing.assert_allclose(cosine_distance(jnp.asarray(x), jnp.asarray(y), pairwise=True), cos,
                               atol=1e-6)
    z = d / (2 * 1.3 ** 2)
    np.testing.assert_allclose(gak_log_kernel(jnp.asarray(x), jnp.asarray(y), 1.3, pairwise=True),
                               -z - np.log(2 - np.exp(-z)), rtol=1e-5, atol=1e-6)
    # soft-DTW with the cosine cost equals soft-DTW of the precomputed cosine table
    with jax.enable_x64(True):
        v = softdtw(jnp.asarray(x[:2]), jnp.asarray(y), 0.1, cost="cosine")
        v2 = softdtw(jnp.asarray(x[:2]), jnp.asarray(y), 0.1,
                     cost=lambda a, b, pw: cosine_distance(a, b, pw))
    np.testing.assert_allclose(v, v2, rtol=1e-12)


def test_sigma_gak_matches_tslearn_with_all_points():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 8, 3))
    ref = t_sigma_gak(x, n_samples=40, random_state=0)   # 40 = all points, drawn without repeats
    assert np.isclose(sigma_gak(x), ref)


def _scene(rng, b=5, s=4):
    feats = {"image": rng.normal(size=(b, s, 6)), "text": rng.normal(size=(b, s, 5)),
             "shared": rng.normal(size=(b, s, 4))}
    modality = rng.integers(0, 2, size=(b, s))
    lengths = np.array([4, 2, 3, 1, 4])[:b]
    mask = np.arange(s) < lengths[:, None]
    return feats, modality, mask, lengths


def test_triple_kernel_against_naive_gak_with_switched_local_kernel():
    rng = np.random.default_rng(2)
    feats, modality, mask, lengths = _scene(rng)
    sigma = 0.7
    with jax.enable_x64(True):
        out = triple_kernel({k: jnp.asarray(v) for k, v in feats.items()}, jnp.asarray(modality),
                            jnp.asarray(mask), sigma=sigma)
    unit = {k: v / np.linalg.norm(v, axis=-1, keepdims=True) for k, v in feats.items()}

    def local(p, i, q, j):
        a, b = modality[p, i], modality[q, j]
        space = "image" if a == b == IMAGE else "text" if a == b == TEXT else "shared"
        z = ((unit[space][p, i] - unit[space][q, j]) ** 2).sum() / (2 * sigma ** 2)
        return np.exp(-z) / (2 - np.exp(-z))

    def k(p, q):
        n, m = lengths[p], lengths[q]
        M = np.zeros((n + 1, m + 1)); M[0, 0] = 1
        for i in range(n):
            for j in range(m):
                M[i + 1, j + 1] = local(p, i, q, j) * (M[i, j] + M[i, j + 1] + M[i + 1, j])
        return M[n, m]

    ref = np.array([[k(p, q) / np.sqrt(k(p, p) * k(q, q)) for q in range(5)] for p in range(5)])
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-10)
    np.testing.assert_allclose(np.diagonal(out), 1, rtol=1e-12)
    np.testing.assert_allclose(out, np.asarray(out).T, rtol=1e-12)


def test_triple_kernel_on_single_modality_is_tslearn_gak():
    """All slices text: the triple kernel is tslearn's normalised GAK on the unit text features."""
    rng = np.random.default_rng(3)
    feats, _, _, _ = _scene(rng)
    mask = np.ones((5, 4), bool)
    out = triple_kernel({k: jnp.asarray(v) for k, v in feats.items()}, jnp.zeros((5, 4), int),
                        jnp.asarray(mask), sigma=0.9)
    t = feats["text"] / np.linalg.norm(feats["text"], axis=-1, keepdims=True)
    ref = np.array([[tgak(t[p], t[q], sigma=0.9) for q in range(5)] for p in range(5)])
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5)


def test_pooled_cosine():
    rng = np.random.default_rng(4)
    f = rng.normal(size=(3, 4, 5))
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
    pooled = np.stack([f[i][mask[i]].mean(0) for i in range(3)])
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(pooled_cosine(jnp.asarray(f), jnp.asarray(mask)), pooled @ pooled.T,
                               rtol=1e-5, atol=1e-6)
