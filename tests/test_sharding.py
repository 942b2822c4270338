"""Mesh construction, logical-axis rules and divisibility errors (8 fake CPU devices)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mllm_jax import sharding as S
from mllm_jax.models.layers import Attention, Dense


def test_make_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    m = S.make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert m.axis_names == S.MESH_AXES
    with pytest.raises(S.ShardingError, match="3\\*1\\*1 = 3 but 8 devices"):
        S.make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(S.ShardingError, match="not divisible by 3"):
        S.make_mesh(data=3, fsdp=-1, tensor=1)
    with pytest.raises(S.ShardingError, match="each must be >= 1"):      # was ZeroDivisionError
        S.make_mesh(data=1, fsdp=-1, tensor=0)


def test_logical_to_spec():
    assert S.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert S.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)  # fsdp used once
    assert S.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    with pytest.raises(S.ShardingError, match="no rule"):
        S.logical_to_spec(("nonsense",))


class _Block(nnx.Module):
    def __init__(self, heads, kv, rngs):
        self.attn = Attention(64, heads, kv, head_dim=8, rope_theta=1e4, rngs=rngs)
        self.out = Dense(64, 24, axes=("embed", "vocab"), rngs=rngs)

    def __call__(self, x):
        pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        h, _ = self.attn(x, positions=pos)
        return self.out(x + h)


def test_sharded_model_matches_single_device():
    mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = S.create_sharded_model(lambda: _Block(4, 2, nnx.Rngs(0)), mesh)
    single = _Block(4, 2, nnx.Rngs(0))
    k = sharded.attn.q_proj.kernel[...]
    assert k.sharding.spec == P("fsdp", "tensor")
    assert len(k.addressable_shards) == 8 and k.addressable_shards[0].data.shape == (32, 16)
    x = jax.random.normal(jax.random.key(0), (4, 5, 64))
    xs = S.shard_batch({"x": np.asarray(x)}, mesh)["x"]
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, x: m(x))(sharded, xs)), np.asarray(single(x)),
                               atol=1e-5, rtol=0)


def test_indivisible_dimension_names_the_param():
    mesh = S.make_mesh(data=1, fsdp=1, tensor=8)
    # the output layer's vocab dim (20) is sharded over 'tensor' (8): both its kernel and bias are wrong
    with pytest.raises(S.ShardingError, match=r"out\.(kernel|bias): dimension \d of shape \((64, )?20,?\) has size 20.*'tensor' of size 8"):
        class Bad(_Block):
            def __init__(self, rngs):
                super().__init__(8, 8, rngs)
                self.out = Dense(64, 20, axes=("embed", "vocab"), rngs=rngs)
        S.create_sharded_model(lambda: Bad(nnx.Rngs(0)), mesh)
    # 2 kv heads of head_dim 8 (= 16 columns) would divide 8 ways, but a head must not be split
    with pytest.raises(S.ShardingError, match=r"attn\.k_proj\.kernel: .* packs 2 heads.*'tensor' of size 8"):
        S.create_sharded_model(lambda: _Block(8, 2, nnx.Rngs(0)), mesh)
    with pytest.raises(S.ShardingError, match=r"batch\.x: dimension 0 of shape \(3, 5\)"):
        S.shard_batch({"x": np.zeros((3, 5))}, S.make_mesh(data=2, fsdp=2, tensor=2))


def test_constrain_is_noop_outside_context_and_pins_inside():
    x = jnp.ones((8, 4, 64))
    assert S.constrain(x, ("activation_batch", "length", "embed")) is x
    mesh = S.make_mesh(data=2, fsdp=2, tensor=2)

    @jax.jit
    def f(x):
        with S.activation_sharding(mesh):
            return S.constrain(x * 2, ("activation_batch", "length", "embed"))
    y = f(x)
    spec = tuple(y.sharding.spec) + (None,) * 3
    assert spec[:3] == (("data", "fsdp"), None, None)
