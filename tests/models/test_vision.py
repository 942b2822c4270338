"""VisionTower behaviour beyond HF parity (tests/convert/test_hf_parity_encoders.py)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mllm_jax.config import VisionConfig
from mllm_jax.models.vision import VisionTower

CFG = VisionConfig(variant="siglip", use_head=True, image_size=16, patch_size=4, hidden_size=32,
                   intermediate_size=64, num_layers=1, num_heads=4)


def test_remat_keeps_gradients():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)
    model = VisionTower(CFG, rngs=nnx.Rngs(0))
    grads = []
    for remat in (False, True):
        model.config = dataclasses.replace(model.config, remat=remat)  # static: a new graphdef
        graphdef, state = nnx.split(model)

        def loss(state):
            return jnp.sum(nnx.merge(graphdef, state)(x).pooled ** 2)

        assert ("remat" in str(jax.make_jaxpr(loss)(state))) == remat
        grads.append(jax.jit(jax.grad(loss))(state))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_wrong_pixel_shape_names_it():
    tower = nnx.eval_shape(lambda: VisionTower(CFG, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 16, 16\); expected \[B, 16, 16, 3\] \(NHWC"):
        tower(jnp.zeros((2, 3, 16, 16)))
