"""The decoder on 8 fake CPU devices (data x fsdp x tensor) gives the numbers of 1 device."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mllm_jax import sharding
from mllm_jax.config import ConfigError, DecoderConfig
from mllm_jax.convert.hf import flat_params, load_pretrained, save_pretrained
from mllm_jax.generate import generate
from mllm_jax.models.decoder import Decoder

CFG = DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, attention_bias=True, family="qwen2", eos_token_id=None)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    path = save_pretrained(model, tmp_path_factory.mktemp("decoder"))
    return model, path


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, (4, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


_FORWARD = {}


def forward(model, ids, mask, mesh=None):
    """Jitted forward (one compiled function per mesh), activations constrained on ``mesh``."""
    key = None if mesh is None else tuple(mesh.shape.items())
    if key not in _FORWARD:
        @nnx.jit
        def f(m, ids, mask):
            with sharding.activation_sharding(mesh):
                out = m(ids, attention_mask=mask, output_hidden_states=True)
            return out.logits, out.hidden_states
        _FORWARD[key] = f
    if mesh is not None:
        ids, mask = sharding.shard_batch((ids, mask), mesh)
    return _FORWARD[key](model, ids, mask)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_model_matches_one_device(single, shape):
    model, path = single
    mesh = sharding.make_mesh(*shape)
    ids, mask = batch()
    built = sharding.create_sharded_model(lambda: Decoder(CFG, rngs=nnx.Rngs(0)), mesh)
    loaded = load_pretrained(path, mesh=mesh)
    for m, exact in ((built, False), (loaded, True)):
        params = flat_params(m)
        kernel = params["layers.0.self_attn.k_proj.kernel"]
        assert kernel.sharding.spec == P("fsdp", "tensor")
        assert len(kernel.sharding.device_set) == 8
        assert params["embed_tokens.embedding"].sharding.spec == P("tensor", "fsdp")
        for k, v in flat_params(model).items():
            # jitted init may round a normal draw differently from eager init (1 ulp)
            np.testing.assert_allclose(np.asarray(params[k]), np.asarray(v), rtol=0 if exact else 1e-6,
                                       atol=0, err_msg=k)
        graphdef, state = nnx.split(m)
        one_device = nnx.merge(graphdef, jax.device_put(jax.device_get(state), jax.devices()[0]))
        ref_logits, ref_hidden = forward(one_device, ids, mask)
        logits, hidden = forward(m, ids, mask, mesh)
        assert len(logits.sharding.device_set) == 8
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=0)
        for h, r in zip(hidden, ref_hidden):
            np.testing.assert_allclose(np.asarray(h), np.asarray(r), atol=1e-5, rtol=0)


def test_sharded_generate_matches_one_device(single):
    model, path = single
    mesh = sharding.make_mesh(2, 2, 2)
    ids, mask = batch()
    ref = generate(model, ids, attention_mask=mask, max_new_tokens=6)
    loaded = load_pretrained(path, mesh=mesh)
    ids_s, mask_s = sharding.shard_batch((ids, mask), mesh)
    out = generate(loaded, ids_s, attention_mask=mask_s, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))


def test_sharded_bfloat16_is_as_close_to_float32_as_one_device():
    """bfloat16 compute on the (2, 2, 2) mesh (on CPU: the layers' bfloat16 GEMM and attention
    forms, partitioned): its logits are within twice the 1-device bfloat16 error of the float32
    logits (the two bfloat16 runs round at different places, so they need not agree exactly)."""
    import dataclasses
    ids, mask = batch()
    valid = mask.astype(bool)
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    ref, _ = forward(Decoder(CFG, rngs=nnx.Rngs(0)), ids, mask)
    one, _ = forward(Decoder(cfg, rngs=nnx.Rngs(0)), ids, mask)
    mesh = sharding.make_mesh(2, 2, 2)
    eight, _ = forward(sharding.create_sharded_model(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh), ids, mask, mesh)
    err = lambda x: float(np.abs(np.asarray(x, np.float64) - np.asarray(ref, np.float64))[valid].max())  # noqa: E731
    assert 0 < err(one) < 0.1
    assert err(eight) <= 2 * err(one), (err(eight), err(one))


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (6, 3)])
def test_kv_heads_not_dividing_tensor_axis_is_a_sharding_error(heads, kv_heads):
    # (6, 3): kv_heads * head_dim = 24 is even, but 3 heads cannot be split in two
    cfg = DecoderConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_layers=1,
                        num_heads=heads, num_kv_heads=kv_heads)
    mesh = sharding.make_mesh(2, 2, 2)
    with pytest.raises(sharding.ShardingError, match=r"layers\.0\.self_attn\.k_proj\.kernel"):
        sharding.create_sharded_model(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh)


def test_bad_head_config_is_a_config_error():
    with pytest.raises(ConfigError, match="does not divide hidden_size"):
        DecoderConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match="num_kv_heads=3 must divide num_heads=4"):
        DecoderConfig(hidden_size=32, num_heads=4, num_kv_heads=3)


def test_sharded_embedding_lookup_is_not_replicated():
    """Under FSDP the table's embed dim is sharded over "fsdp" and the looked-up rows over the
    batch: the lookup must not replicate its result and re-split it (GSPMD's "involuntary full
    rematerialization", which shows as all-gathers along the batch dim inside the lookup). Each
    device looks up its own rows from the table gathered over fsdp, the vocab shards summed."""
    mesh = sharding.make_mesh(2, 2, 2)
    model = sharding.create_sharded_model(lambda: Decoder(CFG, rngs=nnx.Rngs(0)), mesh)
    ids, _ = batch()
    ids = sharding.shard_batch(ids, mesh)

    @nnx.jit
    def f(m, ids):
        with sharding.activation_sharding(mesh):
            return m.embed(ids)
    text = f.lower(model, ids).compile().as_text()
    gathers_of_rows = [line for line in text.splitlines()
                       if " all-gather(" in line and "_take" in line and "dimensions={0}" in line]
    assert not gathers_of_rows, gathers_of_rows
    out = f(model, ids)
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(out), np.asarray(model.embed_tokens.embedding[...])[np.asarray(ids)],
                               rtol=0, atol=0)
