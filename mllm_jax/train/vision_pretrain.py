"""Stage 0 of the embedded default: supervised pretraining of the vision tower on the scene world.

Real MLLM recipes (LLaVA, VILA, InfMLLM, and Sugar on top of VILA) start from a pretrained
CLIP / SigLIP tower. None exists for the scene world's small canvases, and a tower trained from
scratch through the next-token loss alone learns too slowly for a CPU demo (the LLM learns the
answer priors first and the images stay unread). This stage stands in for the CLIP checkpoint:

    the ViT of ``cfg.model.vision`` -> patch grid average-pooled to ``grid x grid`` -> flatten
    -> linear -> sigmoid cross-entropy against ``synthetic.scene_features(scene) > 0``

i.e. multi-label prediction of which scene-graph facts hold (kinds, colours, shapes,
size x kind, cell x colour, cell x shape, the folded relations). ``write_init`` stores the
result as a params-only checkpoint of the *whole* MLLM (the pretrained tower; projector and
decoder freshly initialised from ``train.seed``, exactly as training would create them), which
``train.init_from`` starts from as it would from converted HF weights::

    metrics = pretrain_vision_init(cfg, "results/demo/vision", steps=1000)
    cfg = apply_updates(cfg, {"train.init_from": "results/demo/vision"})

Only images are used, never captions or answers: the evaluation tasks are not seen.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mllm_jax.config import ExperimentConfig, VisionConfig
from mllm_jax.data.pipeline import ImageSpec
from mllm_jax.data.synthetic import SCENE_FEATURE_DIM, SceneWorld, scene_features
from mllm_jax.models.projector import pool_grid

log = logging.getLogger("mllm_jax.vision_pretrain")


class SceneLabelProbe(nnx.Module):
    """``VisionTower`` + a linear multi-label head over its patch grid pooled to ``grid x grid``."""

    def __init__(self, cfg: VisionConfig, *, grid: int = 4, rngs: nnx.Rngs):
        from mllm_jax.models.vision import VisionTower
        s = cfg.grid_size
        if s % grid:
            raise ValueError(f"SceneLabelProbe: grid={grid} does not divide the patch grid side {s}")
        self.cfg, self.side, self.grid = cfg, s, grid
        self.vision = VisionTower(cfg, rngs=rngs)
        self.head = nnx.Linear(cfg.hidden_size * grid * grid, SCENE_FEATURE_DIM, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """``float32[B, H, W, C]`` (normalised) -> logits ``float32[B, SCENE_FEATURE_DIM]``."""
        x = self.vision(pixels).last_hidden_state
        if self.cfg.has_class_token:
            x = x[:, 1:]                                   # drop the class token
        x = pool_grid(x, self.side, self.grid)
        return self.head(x.reshape(x.shape[0], -1))


def label_batch(world: SceneWorld, spec: ImageSpec, split: str, indices) -> tuple[np.ndarray, np.ndarray]:
    """Images of scenes ``indices`` of ``split`` (as the data pipeline prepares them) and their
    labels ``float32[B, SCENE_FEATURE_DIM]`` (1 where the scene-graph feature is present)."""
    scenes = [world.scene(split, int(i)) for i in indices]
    x = np.stack([spec(world.image(split, int(i), s)) for i, s in zip(indices, scenes)])
    y = np.stack([scene_features(s) > 0 for s in scenes]).astype(np.float32)
    return x, y


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnums=(1, 2))
def _step(graphdef, params, opt_state, x, y, tx):
    def loss_fn(p):
        return optax.sigmoid_binary_cross_entropy(nnx.merge(graphdef, p)(x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _eval(graphdef, params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.sigmoid_binary_cross_entropy(logits, y).mean(), jnp.mean((logits > 0) == (y > 0))


def constant_bce(y: np.ndarray, prior: np.ndarray) -> float:
    """The cross-entropy of the best image-blind predictor (each label's training frequency)."""
    p = np.clip(prior, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def pretrain_vision(cfg: ExperimentConfig, *, steps: int, batch_size: int = 32, lr: float = 2e-3,
                    grid: int = 4, eval_size: int = 256, seed: Optional[int] = None,
                    progress: bool = True) -> tuple[SceneLabelProbe, dict]:
    """Trains ``SceneLabelProbe(cfg.model.vision)`` on the train split of ``cfg.data.scene``.
    Returns the probe and held-out metrics on the val split: ``bce``, ``label_acc`` and the
    image-blind baseline ``bce_prior`` (label frequencies of the training scenes seen)."""
    if steps <= 0:
        raise ValueError(f"pretrain_vision: steps={steps}; expected > 0")
    seed = cfg.train.seed if seed is None else seed
    world, spec = SceneWorld(cfg.data.scene), ImageSpec.from_vision(cfg.model.vision)
    probe = SceneLabelProbe(cfg.model.vision, grid=grid, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(probe, nnx.Param)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(30, steps // 2), steps), weight_decay=0.0)
    opt_state = tx.init(params)
    order = np.random.default_rng(seed).permutation(cfg.data.scene.train_size)
    label_sum, seen, t0 = np.zeros(SCENE_FEATURE_DIM), 0, time.perf_counter()
    from tqdm.auto import tqdm
    bar = tqdm(range(steps), desc="vision", disable=not progress)
    for step in bar:
        idx = order[np.arange(step * batch_size, (step + 1) * batch_size) % len(order)]
        x, y = label_batch(world, spec, "train", idx)
        label_sum, seen = label_sum + y.sum(0), seen + len(y)
        params, opt_state, loss = _step(graphdef, params, opt_state, x, y, tx)
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    xv, yv = label_batch(world, spec, "val", np.arange(min(eval_size, cfg.data.scene.val_size)))
    bce, acc = _eval(graphdef, params, xv, yv)
    nnx.update(probe, params)
    metrics = {"steps": steps, "bce": float(bce), "label_acc": float(acc),
               "bce_prior": constant_bce(yv, label_sum / max(seen, 1)), "seconds": time.perf_counter() - t0}
    log.info("vision pretraining: held-out bce %.4f (image-blind %.4f), label accuracy %.4f, %.0f s",
             metrics["bce"], metrics["bce_prior"], metrics["label_acc"], metrics["seconds"])
    return probe, metrics


def write_init(cfg: ExperimentConfig, vision: nnx.Module, directory: str | Path, *,
               metrics: Optional[dict] = None) -> Path:
    """A params-only checkpoint (step 0) of the MLLM of ``cfg.model``: ``vision``'s params, the
    rest as ``MLLM(cfg.model, rngs=nnx.Rngs(cfg.train.seed))`` initialises them."""
    from mllm_jax.convert.hf import flat_params
    from mllm_jax.models.mllm import MLLM
    from mllm_jax.train.checkpoint import Checkpointer
    model = MLLM(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    nnx.update(model.vision, nnx.state(vision, nnx.Param))
    ck = Checkpointer(directory)
    ck.save_params(0, flat_params(model), config={"vision_pretrain": metrics or {}})
    ck.close()
    return Path(directory)


def pretrain_vision_init(cfg: ExperimentConfig, directory: str | Path, *, steps: int, **kw) -> dict:
    """``pretrain_vision`` then ``write_init``; returns the metrics."""
    probe, metrics = pretrain_vision(cfg, steps=steps, **kw)
    write_init(cfg, probe.vision, directory, metrics=metrics)
    return metrics


__all__ = ["SceneLabelProbe", "label_batch", "constant_bce", "pretrain_vision", "write_init", "pretrain_vision_init"]
