"""Toy models and data for the training-system tests (stand-ins until the real decoder, MLLM
and data pipeline land). Importable from subprocesses run in the repo root as ``tests.toy``.

- ``ToyLM``: a Llama-architecture decoder from ``models.layers`` (same param names as
  ``models/decoder.py`` will have), configured by ``MLLMConfig.decoder``.
- ``ToyMLLM``: ``vision`` (patch Dense + MLP) -> ``projector`` -> ``decoder`` (a ToyLM); the
  first ``tokens_per_image`` positions of each sequence are the image's tokens.
- ``toy_data``: a grain ``MapDataset`` over seeded synthetic sequences (arithmetic progressions
  mod V, so the loss can fall), batched globally and sliced to this process's rows.
"""
from __future__ import annotations

import os
import signal
from typing import NamedTuple, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.config import DecoderConfig, ExperimentConfig, dtype_of
from mllm_jax.models import layers
from mllm_jax.models.lora import apply_lora
from mllm_jax.train import flops as F
from mllm_jax.train.registry import ModelSpec


class Out(NamedTuple):
    logits: jax.Array


class Block(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = layers.Attention(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
            qkv_bias=cfg.attention_bias, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
            dtype=dt, rngs=rngs)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act,
                                   use_bias=cfg.mlp_bias, dtype=dt, rngs=rngs)

    def __call__(self, x, mask, positions):
        h, _ = self.self_attn(self.input_layernorm(x), mask=mask, positions=positions)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class ToyLM(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        dt = dtype_of(cfg.dtype)
        self.config = cfg
        self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        layers.Dense(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"),
                                     use_bias=False, dtype=dt, rngs=rngs))

    def __call__(self, input_ids=None, attention_mask=None, *, inputs_embeds=None) -> Out:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        am = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
        positions = jnp.maximum(jnp.cumsum(am, axis=-1) - 1, 0)
        mask = layers.causal_mask(t)[None] & layers.padding_mask(am)
        for blk in self.layers:
            x = blk(x, mask, positions)
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return Out(logits.astype(jnp.float32))


class ToyVision(nnx.Module):
    def __init__(self, patch_dim: int, dim: int, *, rngs: nnx.Rngs):
        self.patch_embed = layers.Dense(patch_dim, dim, axes=("patch", "embed"), rngs=rngs)
        self.norm = layers.LayerNorm(dim)
        self.mlp = layers.MLP(dim, 2 * dim, rngs=rngs)

    def __call__(self, patches):
        h = self.patch_embed(patches)
        return h + self.mlp(self.norm(h))


class ToyMLLM(nnx.Module):
    """``pixel_values: float32[B, 1, H, W, C]`` -> patches -> vision -> projector -> decoder."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        v = cfg.vision
        self.config = cfg
        self.patch = v.patch_size
        self.vision = ToyVision(v.patch_size ** 2 * v.num_channels, v.hidden_size, rngs=rngs)
        self.projector = layers.Dense(v.hidden_size, cfg.decoder.hidden_size, axes=("mlp", "embed"), rngs=rngs)
        self.decoder = ToyLM(cfg.decoder, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None) -> Out:
        img = pixel_values[:, 0]
        b, h, w, c = img.shape
        p = self.patch
        patches = img.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
        feats = self.projector(self.vision(patches))
        n = feats.shape[1]
        emb = self.decoder.embed_tokens(input_ids)
        emb = jnp.concatenate([feats.astype(emb.dtype), emb[:, n:]], axis=1)
        return self.decoder(attention_mask=attention_mask, inputs_embeds=emb)


def _lm_flops(cfg: ExperimentConfig, shapes: dict) -> float:
    b, t = shapes["input_ids"]
    return F.decoder_forward_flops(cfg.model.decoder, b, t)


def _build_mllm(cfg: ExperimentConfig, rngs: nnx.Rngs) -> ToyMLLM:
    model = ToyMLLM(cfg.model, rngs=rngs)
    if cfg.model.lora.rank > 0:
        apply_lora(model, cfg.model.lora, rngs)
    return model


TOY_LM = ModelSpec(build=lambda cfg, rngs: ToyLM(cfg.model.decoder, rngs=rngs), forward_flops=_lm_flops)
TOY_MLLM = ModelSpec(build=_build_mllm)


# ---- data ---------------------------------------------------------------------------------------

class ToyIterator:
    """Wraps a grain ``DatasetIterator``. For tests, by batch index: ``nan_batches`` get
    ``scale = nan`` (a non-finite loss through ``scaled_ntp``), ``drop_batches`` are skipped,
    fetching batch ``sigterm_at`` sends this process SIGTERM, and the data ends after
    ``num_batches`` (as with ``data.num_epochs``). Its batches can be padded to agreed sequence
    lengths (pad id 0) as the project pipeline's."""

    def __init__(self, it, nan_batches=(), drop_batches=(), sigterm_at=None, num_batches=None):
        self._it, self._nan, self._drop = it, set(nan_batches), set(drop_batches)
        self._sigterm_at, self._num_batches = sigterm_at, num_batches
        self._index = 0

    def seq_lengths(self, batch):
        from mllm_jax.data.pipeline import seq_lengths
        return seq_lengths(batch)

    def pad_seq_lengths(self, batch, lengths):
        from mllm_jax.data.pipeline import pad_seq_lengths
        return pad_seq_lengths(batch, lengths, 0)

    def blank_like(self, batch):
        """Padding rows (no target tokens), ``scale`` 1 as in every toy batch."""
        from mllm_jax.data.pipeline import blank_like
        return {**blank_like(batch, 0), "scale": np.ones_like(batch["scale"])}

    def __iter__(self):
        return self

    def __next__(self):
        if self._num_batches is not None and self._index >= self._num_batches:
            raise StopIteration
        while self._index in self._drop:
            next(self._it)
            self._index += 1
        if self._index == self._sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        batch = dict(next(self._it))
        if self._index in self._nan:
            batch["scale"] = np.full_like(batch["scale"], np.nan)
        self._index += 1
        return batch

    def get_state(self):
        return {"grain": self._it.get_state(), "index": self._index}

    def set_state(self, state):
        self._it.set_state(state["grain"])
        self._index = state["index"]


def toy_data(cfg: ExperimentConfig, *, split: str = "train", process_index: int = 0, process_count: int = 1):
    """Process-local batches ``{input_ids, labels, loss_mask, attention_mask: int32[b, T],
    scale: float32[b]}`` (+ ``pixel_values: float32[b, 1, H, W, C]`` when
    ``data_options.images`` is set), ``b = data.batch_size`` per process, ``T =
    max(data.seq_buckets)``. The global batch is the process-ordered concatenation, the same
    rows whatever the process count."""
    d = cfg.data
    opts = dict(cfg.data_options)
    local, T, V = d.batch_size, max(d.seq_buckets), cfg.model.decoder.vocab_size
    B = local * process_count
    n = int(opts.get("num_examples", 64))
    rng = np.random.default_rng([d.seed, 0 if split == "train" else 1])
    start = rng.integers(0, V, size=(n, 1))
    stride = rng.integers(1, 4, size=(n, 1))
    seqs = ((start + stride * np.arange(T + 1)[None]) % V).astype(np.int32)
    images = None
    if opts.get("images"):
        v = cfg.model.vision
        images = rng.normal(size=(n, 1, v.image_size, v.image_size, v.num_channels)).astype(np.float32)

    def example(i):
        ex = {"input_ids": seqs[i, :-1], "labels": seqs[i, 1:], "loss_mask": np.ones(T, np.int32),
              "attention_mask": np.ones(T, np.int32), "scale": np.float32(1.0)}
        if images is not None:
            ex["pixel_values"] = images[i]
        return ex

    lo = process_index * local
    # row_lengths: row r of every global batch ends after row_lengths[r] tokens (masks 0 beyond);
    # each process's batch is then cut to its own rows' longest, as the pipeline's buckets are
    ends = opts.get("row_lengths")

    def rows(b):
        b = {k: v[lo:lo + local] for k, v in b.items()}
        if ends is None:
            return b
        mine = np.asarray(ends[lo:lo + local])
        keep = np.arange(T)[None] < mine[:, None]
        b["attention_mask"], b["loss_mask"] = b["attention_mask"] * keep, b["loss_mask"] * keep
        return {k: v[:, :mine.max()] if k in ("input_ids", "labels", "loss_mask", "attention_mask") else v
                for k, v in b.items()}
    ds = (grain.MapDataset.range(n).shuffle(seed=d.seed).repeat().map(example)
          .batch(B, drop_remainder=True).map(rows))
    num_batches, sigterm_at = opts.get("num_batches"), opts.get("sigterm_at")
    if isinstance(num_batches, (list, tuple)):  # one per process: processes whose data ends at different steps
        num_batches = num_batches[process_index]
    if isinstance(sigterm_at, (list, tuple)):   # one per process: a signal to one process only
        sigterm_at = sigterm_at[process_index]
    return ToyIterator(iter(ds), nan_batches=opts.get("nan_batches", ()), drop_batches=opts.get("drop_batches", ()),
                       sigterm_at=sigterm_at, num_batches=num_batches)


def tiny_experiment(**updates) -> ExperimentConfig:
    """A toy-LM experiment config (tiny shapes, no TensorBoard/progress bar) plus dotted updates.

    The lr is constant after one warmup step (lr 0: Adam's moments start without a sign-like
    first update, which would amplify float rounding), so that runs of different lengths
    compile to the same step program and share the compilation cache."""
    from mllm_jax.config import apply_updates
    base = {
        "model_name": "tests.toy:TOY_LM",
        "model.decoder.vocab_size": 64, "model.decoder.hidden_size": 32, "model.decoder.intermediate_size": 64,
        "model.decoder.num_layers": 1, "model.decoder.num_heads": 4, "model.decoder.num_kv_heads": 2,
        "data_pipeline": "tests.toy:toy_data", "data.batch_size": 8, "data.seq_buckets": [16],
        "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
        "train.steps": 5, "train.log_every": 1, "train.tensorboard": False,
        "train.progress": False, "train.optim.lr": 1e-2, "train.optim.schedule": "constant",
        "train.optim.warmup_steps": 1,
        "train.checkpoint.async_save": False,
    }
    base.update(updates)
    return apply_updates(ExperimentConfig(), base)


def tiny_mllm_experiment(**updates) -> ExperimentConfig:
    """``tiny_experiment`` with the toy MLLM (8x8 images, 4 patches of 4x4, 16-d vision)."""
    base = {"model_name": "tests.toy:TOY_MLLM", "model.vision.image_size": 8, "model.vision.patch_size": 4,
            "model.vision.hidden_size": 16, "model.vision.intermediate_size": 32, "model.vision.num_heads": 2,
            "data_options": {"images": True}, "objective.name": "tests.toy:scaled_ntp"}
    base.update(updates)
    return tiny_experiment(**base)


def scaled_ntp(cfg: Optional[ExperimentConfig] = None):
    """NTP criterion times ``mean(batch['scale'])`` (1 normally; NaN in injected batches)."""
    from mllm_jax.objectives.lm import next_token_loss
    from mllm_jax.train.registry import logits_of

    def criterion(outputs, batch):
        loss, _ = next_token_loss(logits_of(outputs), batch["labels"], batch["loss_mask"])
        loss = loss * jnp.mean(batch["scale"])
        return loss, {"ntp": loss}
    return criterion


def one_device_mesh():
    from mllm_jax import sharding as shd
    return shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def fit_toy(cfg: ExperimentConfig, *, mesh=None, model_fn=None, criterion=None, **kw):
    """``fit`` on the toy model/data of ``cfg`` (one device unless ``mesh``), loss ``scaled_ntp``."""
    from mllm_jax.train.loop import fit
    from mllm_jax.train.registry import make_loss_fn, model_spec
    spec = model_spec(cfg.model_name)
    model_fn = model_fn or (lambda: spec.build(cfg, nnx.Rngs(cfg.train.seed)))
    return fit(cfg, model_fn, make_loss_fn(criterion or scaled_ntp()), toy_data(cfg),
               mesh=mesh if mesh is not None else one_device_mesh(), **kw)


def params_np(state) -> dict[str, np.ndarray]:
    """``{dotted.path: numpy array}`` of every param of a TrainState."""
    from mllm_jax.convert.hf import flat_params
    return {k: np.asarray(jax.device_get(v)) for k, v in flat_params(state.all_params()).items()}
