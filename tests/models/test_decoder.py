"""Decoder behaviour beyond HF parity: cache semantics, remat, compute dtype, axis names, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.config import DecoderConfig
from mllm_jax.models.decoder import Decoder

CFG = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, rope_theta=100.0)


@pytest.fixture(scope="module")
def model():
    return Decoder(CFG, rngs=nnx.Rngs(0))


@nnx.jit
def forward(m, ids, mask=None, cache=None, cache_index=None):
    return m(ids, attention_mask=mask, cache=cache, cache_index=cache_index)


def test_cache_in_chunks_equals_full_forward(model):
    """Prefill 5 slots, then 2, then 1 through the cache == one forward over all 8 tokens, with a
    left-padded row (its padding slots are never attended to)."""
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 8)), jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], jnp.int32)
    full = forward(model, ids, mask).logits
    cache = model.init_cache(2, 8)
    assert cache[0].k.shape == (2, CFG.num_kv_heads, 8, CFG.resolved_head_dim)
    chunks = []
    for start, stop in ((0, 5), (5, 7), (7, 8)):
        slots = jnp.where(jnp.arange(8) < stop, mask, 0)   # slots written so far
        out = forward(model, ids[:, start:stop], slots, cache, jnp.int32(start))
        cache = out.cache
        chunks.append(out.logits)
    got = jnp.concatenate(chunks, axis=1)
    valid = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(full)[valid], atol=1e-5)


def test_remat_gives_the_same_loss_and_grads(model):
    ids = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 6)), jnp.int32)
    graphdef, state = nnx.split(model)
    remat = Decoder(DecoderConfig(**{**CFG.__dict__, "remat": True}), rngs=nnx.Rngs(0))
    rgraphdef, _ = nnx.split(remat)

    def loss(state, gd):
        logits = nnx.merge(gd, state)(ids).logits
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])
    l0, g0 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, graphdef)
    l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, rgraphdef)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6), g1, g0)


def test_bfloat16_compute_keeps_float32_params(model):
    bf = Decoder(DecoderConfig(**{**CFG.__dict__, "dtype": "bfloat16"}), rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf, nnx.Param)))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 6)), jnp.int32)
    out = forward(bf, ids)
    assert out.logits.dtype == jnp.float32 and out.last_hidden_state.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.logits, forward(model, ids).logits, atol=0.05)


def test_every_param_has_logical_axis_names(model):
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, (path, names)


def test_input_errors(model):
    ids = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=model.embed(ids))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\), expected \(2, 4\)"):
        model(ids, attention_mask=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="needs cache_index"):
        model(ids, cache=model.init_cache(2, 8))
    with pytest.raises(ValueError, match="writing 4 tokens at cache_index=6 overflows the cache's 8 slots"):
        model(ids, cache=model.init_cache(2, 8), cache_index=6)      # was clamped: earlier slots overwritten
    with pytest.raises(ValueError, match="expected \\(2, 8\\) \\(batch, cache slots"):
        model(ids, attention_mask=jnp.ones((2, 4)), cache=model.init_cache(2, 8), cache_index=0)
