"""Projectors: LLaVA's MLP against transformers' LlavaMultiModalProjector; the InfMLLM
pool-adapter against hand-computed pooling and a torch (``F.avg_pool2d``) reference."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.config import ProjectorConfig
from mllm_jax.convert.hf import flat_params
from mllm_jax.models.projector import MLPProjector, PoolAdapter

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _copy_linear(dense, linear):
    dense.kernel[...] = jnp.asarray(linear.weight.detach().numpy().T)
    if linear.bias is not None:
        dense.bias[...] = jnp.asarray(linear.bias.detach().numpy())


@pytest.mark.parametrize("act,bias", [("gelu", True), ("gelu_pytorch_tanh", False)])
def test_mlp_projector_matches_llava(act, bias):
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=24, num_attention_heads=4),
        text_config=transformers.LlamaConfig(hidden_size=40, num_attention_heads=4),
        projector_hidden_act=act, multimodal_projector_bias=bias)
    torch.manual_seed(0)
    ref = LlavaMultiModalProjector(cfg).eval()
    ours = MLPProjector(24, 40, ProjectorConfig(kind="mlp", hidden_act=act, bias=bias), rngs=nnx.Rngs(0))
    assert (ours.linear_1.bias is None) == (not bias)
    _copy_linear(ours.linear_1, ref.linear_1)
    _copy_linear(ours.linear_2, ref.linear_2)
    x = np.random.default_rng(0).standard_normal((2, 5, 24)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), want, atol=1e-5)


def _adapter(grid=4, pool=2, layer_norm=False, dim=3, out=5):
    cfg = ProjectorConfig(kind="pool", pool_size=pool, layer_norm=layer_norm)
    return PoolAdapter(dim, out, grid, cfg, rngs=nnx.Rngs(0))


def _bright(grid, r, c, dim=3):
    x = np.zeros((1, grid * grid, dim), np.float32)
    x[0, r * grid + c, 1] = 1.0
    return jnp.asarray(x)


@pytest.mark.parametrize("r,c", [(0, 0), (0, 3), (2, 1), (3, 3), (5, 2)])
def test_pool_adapter_keeps_position(r, c):
    """A single bright patch at grid cell (r, c) lands in output token (r//k)*P + c//k, scaled
    by 1/k^2, and nowhere else: the pool-adapter keeps 2-D position."""
    grid, pool = 6, 3
    k = grid // pool
    ad = _adapter(grid, pool)
    pooled = np.asarray(ad.pool_grid(_bright(grid, r, c)))[0]       # [P*P, D]
    want = np.zeros((pool * pool, 3), np.float32)
    want[(r // k) * pool + c // k, 1] = 1.0 / k ** 2
    np.testing.assert_array_equal(pooled, want)
    # through the whole adapter: exactly that token differs from the all-zero image's tokens
    out = np.asarray(ad(_bright(grid, r, c)))[0]
    base = np.asarray(ad(jnp.zeros((1, grid * grid, 3))))[0]
    changed = np.flatnonzero(np.abs(out - base).max(-1) > 1e-7)
    assert changed.tolist() == [(r // k) * pool + c // k]


def test_pool_adapter_moving_the_patch_moves_the_token():
    grid, pool = 4, 2
    ad = _adapter(grid, pool)
    hot = lambda r, c: int(np.argmax(np.asarray(ad.pool_grid(_bright(grid, r, c)))[0, :, 1]))  # noqa: E731
    assert [hot(0, 0), hot(0, 2), hot(2, 0), hot(3, 3)] == [0, 1, 2, 3]
    assert hot(1, 1) == hot(0, 0) and hot(1, 2) != hot(1, 1)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_pool_adapter_matches_torch_avg_pool(layer_norm):
    """INF-MLLM order: LayerNorm (ln_vision) -> s x s grid -> avg-pool k x k -> Linear, GELU, Linear."""
    import torch.nn.functional as F
    grid, pool, dim, out = 8, 2, 6, 7
    ad = _adapter(grid, pool, layer_norm=layer_norm, dim=dim, out=out)
    rng = np.random.default_rng(0)
    if layer_norm:
        ad.layer_norm.scale[...] = jnp.asarray(rng.standard_normal(dim), jnp.float32)
        ad.layer_norm.bias[...] = jnp.asarray(rng.standard_normal(dim), jnp.float32)
    x = rng.standard_normal((2, grid * grid, dim)).astype(np.float32) * 3 + 1
    t = torch.from_numpy(x)
    w = {k: torch.from_numpy(np.array(v)) for k, v in flat_params(ad).items()}
    if layer_norm:
        t = F.layer_norm(t, (dim,), w["layer_norm.scale"], w["layer_norm.bias"], eps=1e-5)
    t = t.reshape(2, grid, grid, dim).permute(0, 3, 1, 2)                   # NCHW
    t = F.avg_pool2d(t, kernel_size=grid // pool).permute(0, 2, 3, 1).reshape(2, pool * pool, dim)
    t = F.linear(t, w["linear_1.kernel"].T, w["linear_1.bias"])
    t = F.linear(F.gelu(t), w["linear_2.kernel"].T, w["linear_2.bias"])
    np.testing.assert_allclose(np.asarray(ad(jnp.asarray(x))), t.numpy(), atol=1e-5)


def test_pool_adapter_rejects_indivisible_grid():
    with pytest.raises(ValueError, match=r"P=4 does not divide the patch grid side s=6"):
        _adapter(grid=6, pool=4)
    ad = _adapter(grid=4, pool=2)
    with pytest.raises(ValueError, match="got 17 patch tokens, expected grid\\*grid = 4\\*4"):
        ad(jnp.zeros((1, 17, 3)))
