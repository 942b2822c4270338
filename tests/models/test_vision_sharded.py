"""Encoders on a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices give the numbers of
one device; a head count the tensor axis does not divide is a ShardingError."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mllm_jax import sharding as S
from mllm_jax.config import TextEncoderConfig, VisionConfig
from mllm_jax.convert.hf import flat_params, load_pretrained, save_pretrained
from mllm_jax.models.text_encoder import TextEncoder
from mllm_jax.models.vision import VisionTower

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

VIT = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)


@pytest.fixture(scope="module")
def mesh():
    return S.make_mesh(data=2, fsdp=2, tensor=2)


def _forward(model, inputs, mesh=None):
    """Jitted forward over the split state (activation constraints active when sharded)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, *inputs):
        with S.activation_sharding(mesh):
            out = nnx.merge(graphdef, state)(*inputs, output_hidden_states=True)
        return out.last_hidden_state, out.pooled, out.hidden_states

    if mesh is not None:
        inputs = S.shard_batch(inputs, mesh)
    return jax.device_get(f(state, *inputs))


def _assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["clip", "siglip"])
def test_vision_tower_sharded_matches_one_device(mesh, variant, tmp_path):
    cfg = VisionConfig(variant=variant, use_head=variant == "siglip", **VIT)
    sharded = S.create_sharded_model(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)), mesh)
    q = sharded.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P("fsdp", "tensor") and len(q.sharding.device_set) == 8
    # the single-device reference gets the very same weights through an HF checkpoint
    save_pretrained(sharded, tmp_path)
    single = load_pretrained(tmp_path)
    assert len(single.layers[0].self_attn.q_proj.kernel[...].sharding.device_set) == 1
    pixels = np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype(np.float32)
    _assert_close(_forward(sharded, (pixels,), mesh), _forward(single, (pixels,)))
    # loading straight into shards gives the same arrays with the same layout
    loaded = flat_params(load_pretrained(tmp_path, mesh=mesh))
    for path, want in flat_params(sharded).items():
        assert loaded[path].sharding == want.sharding, path
        np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(want), err_msg=path)


def test_text_encoder_sharded_matches_one_device(mesh):
    cfg = TextEncoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            max_position_embeddings=16, add_pooler=True)
    sharded = S.create_sharded_model(lambda: TextEncoder(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(sharded)  # the same weights, gathered onto one device
    single = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state))
    assert len(single.layers[0].mlp.fc1.kernel[...].sharding.device_set) == 1
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (4, 8)).astype(np.int32)
    mask = (np.arange(8)[None] < np.array([[8], [5], [3], [8]])).astype(np.int32)
    _assert_close(_forward(sharded, (ids, mask), mesh), _forward(single, (ids, mask)))


def test_heads_not_dividing_tensor_axis(mesh, tmp_path):
    # 3 heads of 16: every dimension is even, yet tensor=2 would cut a head in half
    cfg = VisionConfig(variant="clip", **{**VIT, "hidden_size": 48, "num_heads": 3})
    msg = r"self_attn\.[kqvo]_proj\.\w+: dimension \d .* packs 3 heads.*'tensor' of size 2"
    with pytest.raises(S.ShardingError, match=msg):
        S.create_sharded_model(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)), mesh)
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=48, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=3)
    transformers.CLIPVisionModel(hf).save_pretrained(tmp_path)
    with pytest.raises(S.ShardingError, match="packs 3 heads"):
        load_pretrained(tmp_path, mesh=mesh)
    # the same model is fine on a mesh without a tensor axis
    abstract = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)))
    S.state_shardings(nnx.state(abstract), S.make_mesh(data=2, fsdp=4, tensor=1))
