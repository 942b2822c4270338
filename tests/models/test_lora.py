"""LoRA: zero-initialised B changes nothing; merged == unmerged; regex selection; soft prompts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.config import LoRAConfig
from mllm_jax.models.layers import Attention, Dense, GatedMLP
from mllm_jax.models.lora import LoRAParam, SoftPrompt, apply_lora, merge_lora, unmerge_lora


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.attn = Attention(32, 4, 2, rope_theta=1e4, rngs=rngs)
        self.mlp = GatedMLP(32, 64, rngs=rngs)

    def __call__(self, x):
        pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        h, _ = self.attn(x, positions=pos)
        return self.mlp(x + h)


def _x():
    return jax.random.normal(jax.random.key(3), (2, 5, 32))


def test_zero_b_changes_nothing_and_merge_equals_unmerged():
    m = _Tiny(nnx.Rngs(0))
    y0 = m(_x())
    paths = apply_lora(m, LoRAConfig(rank=4, alpha=8, target=r"(q_proj|v_proj|down_proj)$"), nnx.Rngs(1))
    assert paths == ["attn.q_proj", "attn.v_proj", "mlp.down_proj"]
    np.testing.assert_array_equal(np.asarray(m(_x())), np.asarray(y0))
    # give B non-zero values: output changes, and merging reproduces the adapter's output
    for p in paths:
        d = eval("m." + p)
        d.lora.b[...] = jax.random.normal(jax.random.key(len(p)), d.lora.b.shape) * 0.1
    y1 = m(_x())
    assert float(jnp.abs(y1 - y0).max()) > 1e-3
    kernel_before = np.asarray(m.attn.q_proj.kernel[...])
    assert merge_lora(m) == 3
    np.testing.assert_allclose(np.asarray(m(_x())), np.asarray(y1), atol=1e-5)
    # hand check of the merged kernel: W + (alpha / r) * A @ B
    lora = m.attn.q_proj.lora
    np.testing.assert_allclose(np.asarray(m.attn.q_proj.kernel[...]),
                               kernel_before + 2.0 * np.asarray(lora.a[...]) @ np.asarray(lora.b[...]), atol=1e-6)
    assert unmerge_lora(m) == 3
    np.testing.assert_allclose(np.asarray(m.attn.q_proj.kernel[...]), kernel_before, atol=1e-6)
    np.testing.assert_allclose(np.asarray(m(_x())), np.asarray(y1), atol=1e-5)


def test_lora_params_are_selectable_and_sharded_by_name():
    m = _Tiny(nnx.Rngs(0))
    apply_lora(m, LoRAConfig(rank=2, target=r"q_proj$"), nnx.Rngs(1))
    lora_state = nnx.state(m, LoRAParam)
    leaves = jax.tree.leaves(lora_state)
    assert [x.shape for x in leaves] == [(32, 2), (2, 32)]
    names = [v.get_metadata()["out_sharding"] for v in jax.tree.leaves(lora_state, is_leaf=lambda v: isinstance(v, nnx.Variable))]
    assert names == [("embed", "lora_rank"), ("lora_rank", "heads")]


def test_bad_regex_target_is_an_error():
    with pytest.raises(ValueError, match="matched no Dense layer; paths look like"):
        apply_lora(_Tiny(nnx.Rngs(0)), LoRAConfig(rank=2, target=r"qproj$"), nnx.Rngs(1))


def test_merge_remove_drops_adapters():
    m = _Tiny(nnx.Rngs(0))
    apply_lora(m, LoRAConfig(rank=2, target=r"v_proj$"), nnx.Rngs(1))
    merge_lora(m, remove=True)
    assert m.attn.v_proj.lora is None and not jax.tree.leaves(nnx.state(m, LoRAParam))


def test_remove_after_a_plain_merge_drops_the_adapters_without_merging_twice():
    """merge_lora(m) then merge_lora(m, remove=True) (what save_pretrained's error tells a user
    with merged adapters to call): the adapters go, and the kernel keeps one copy of the update."""
    m = _Tiny(nnx.Rngs(0))
    apply_lora(m, LoRAConfig(rank=2, target=r"v_proj$"), nnx.Rngs(1))
    m.attn.v_proj.lora.b[...] = jax.random.normal(jax.random.key(5), m.attn.v_proj.lora.b.shape) * 0.1
    y = m(_x())
    merge_lora(m)
    merged = np.asarray(m.attn.v_proj.kernel[...])
    merge_lora(m, remove=True)
    assert m.attn.v_proj.lora is None and not jax.tree.leaves(nnx.state(m, LoRAParam))
    np.testing.assert_array_equal(np.asarray(m.attn.v_proj.kernel[...]), merged)
    np.testing.assert_allclose(np.asarray(m(_x())), np.asarray(y), atol=1e-5)


def test_lora_dropout_only_in_training():
    d = Dense(8, 8, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    class Wrap(nnx.Module):
        def __init__(self):
            self.d = d
    w = Wrap()
    apply_lora(w, LoRAConfig(rank=2, dropout=0.5, target="d$"), nnx.Rngs(params=1, dropout=2))
    d.lora.b[...] = jnp.ones_like(d.lora.b[...])
    x = jnp.ones((4, 8))
    w.eval()
    np.testing.assert_array_equal(np.asarray(d(x)), np.asarray(d(x)))
    w.train()
    assert not np.array_equal(np.asarray(d(x)), np.asarray(d(x)))  # fresh dropout masks


def test_soft_prompt_shape():
    sp = SoftPrompt(3, 16, rngs=nnx.Rngs(0))
    out = sp(5)
    assert out.shape == (5, 3, 16) and np.array_equal(np.asarray(out[0]), np.asarray(out[4]))
