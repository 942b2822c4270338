"""Training recipes as weighted sums of named loss parts, over named data streams.

Each recipe is ``builder(cfg: ExperimentConfig) -> loss_fn(model, batch, rngs) -> (loss, parts)``
(registered in ``mllm_jax.train.registry.OBJECTIVES``). Multi-stream batches are
``{stream: batch}`` (``ExperimentConfig.streams``); a stream of paired views is
``{"image": batch, "text": batch}``.

================  =========================  ============================================================
recipe            streams                    loss
================  =========================  ============================================================
generative        gen                        next-token (answers only)
sugar             gen, disc                  ntp_weight * L_ntp(gen) + structure_weight * L_struct(disc)
                                             (+ disc_ntp_weight * L_ntp(disc))   [Sugar, METHODS.md §1]
vladva            con (views), gen (long)    contrastive_weight * L_con(con) + ntp_weight * L_ntp(gen)
                                             [VladVA, METHODS.md §2]
contrastive       con (views)                contrastive_weight * L_con(con)
================  =========================  ============================================================

A stream a recipe names but the batch lacks is skipped (the ablations "w/o data_g" / "w/o
data_d" are configs without that stream); a recipe with none of its streams is an error.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from mllm_jax.config import ExperimentConfig
from mllm_jax.models import pooling
from mllm_jax.models.mllm import MLLM, slice_embeddings
from mllm_jax.objectives.contrastive import contrastive_loss
from mllm_jax.objectives.lm import NTP_DENOMINATOR, next_token_loss
from mllm_jax.objectives.structure import structure_loss

Array = jax.Array
LossFn = Callable[..., tuple[Array, dict]]


def forward(model: MLLM, b: dict, *, hidden: bool = False, logits: bool = True):
    """The MLLM on one batch of the data pipeline's format."""
    return model(b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b.get("pixel_values"),
                 image_mask=b.get("image_mask"), positions=b.get("positions"),
                 output_hidden_states=hidden, return_logits=logits)


def _stream(batch: dict, name: str) -> Optional[dict]:
    if name in batch and isinstance(batch[name], dict):
        return batch[name]
    if name == "gen" and "input_ids" in batch:  # a single-stream batch is the generative stream
        return batch
    return None


def _ntp(model, b, z_loss, prefix: str = ""):
    out = forward(model, b)
    loss, parts = next_token_loss(out.logits, b["labels"], b["loss_mask"], z_loss=z_loss,
                                  denominator=b.get(NTP_DENOMINATOR))
    return loss, {f"{prefix}{k}": v for k, v in parts.items()}


def _combine(terms: list[tuple[float, Array, dict]], recipe: str, wanted: str) -> tuple[Array, dict]:
    if not terms:
        raise ValueError(f"objective {recipe!r}: the batch has none of its streams ({wanted})")
    loss = sum(w * l for w, l, _ in terms)
    parts = {}
    for _, _, p in terms:
        parts.update(p)
    return loss, parts


def generative(cfg: ExperimentConfig) -> LossFn:
    oc = cfg.objective

    def loss_fn(model, batch, rngs=None):
        g = _stream(batch, "gen")
        terms = [] if g is None else [(1.0, *_ntp(model, g, oc.z_loss))]
        return _combine(terms, "generative", "gen")
    return loss_fn


def sugar(cfg: ExperimentConfig) -> LossFn:
    """Sugar: L = ntp_weight * L_g + structure_weight * L_d (METHODS.md §1)."""
    oc, sc = cfg.objective, cfg.objective.structure

    def loss_fn(model, batch, rngs=None):
        terms = []
        g = _stream(batch, "gen")
        if g is not None and oc.ntp_weight:
            terms.append((oc.ntp_weight, *_ntp(model, g, oc.z_loss)))
        d = _stream(batch, "disc") if "disc" in batch else None
        if d is not None:
            out = forward(model, d, hidden=sc.layer != -1, logits=bool(oc.disc_ntp_weight))
            emb = slice_embeddings(out, d["slice_ids"], d["slice_is_image"], d["slice_mask"].shape[1],
                                   layer=sc.layer, head=model.embed_head)
            ld, parts = structure_loss(emb, d, sc)
            terms.append((oc.structure_weight, ld, parts))
            if oc.disc_ntp_weight:
                l2, p2 = next_token_loss(out.logits, d["labels"], d["loss_mask"],
                                         denominator=d.get(NTP_DENOMINATOR))
                terms.append((oc.disc_ntp_weight, l2, {f"disc_{k}": v for k, v in p2.items()}))
        return _combine(terms, "sugar", "gen, disc")
    return loss_fn


def _real_rows(views: dict) -> Optional[Array]:
    """``bool[B]``: the rows that are samples in both views (padding rows of an epoch's last batch
    have ``sample_index == -1``); None when the views carry no ``sample_index``."""
    idx = [views[k]["sample_index"] for k in ("image", "text") if "sample_index" in views[k]]
    return functools.reduce(jnp.logical_and, [i >= 0 for i in idx]) if idx else None


def embed_views(model: MLLM, views: dict, cfg: ExperimentConfig) -> tuple[Array, Array]:
    """L2-normalised embeddings ``float32[B, D]`` of the ``image`` and ``text`` views (pooled as
    ``objective.contrastive.pooling``: ``prompt`` = the summary prompt's last token)."""
    cc = cfg.objective.contrastive
    out = []
    for name in ("image", "text"):
        b = views[name]
        o = forward(model, b, hidden=cc.layer != -1, logits=False)
        e = pooling.pool(MLLM.select_layer(o, cc.layer), b["attention_mask"], cc.pooling).astype(jnp.float32)
        out.append(e * jax.lax.rsqrt(jnp.maximum(jnp.sum(e * e, -1, keepdims=True), 1e-12)))
    return out[0], out[1]


def _scale_and_bias(model: MLLM, cfg: ExperimentConfig) -> tuple[Array, Array]:
    cc = cfg.objective.contrastive
    if cc.learn_temperature:
        if model.logit_scale is None:
            raise ValueError("objective.contrastive.learn_temperature needs model.contrastive_temperature set "
                             "(it creates the learned logit_scale / logit_bias params)")
        return model.logit_scale[...], model.logit_bias[...]
    return jnp.asarray(-jnp.log(cc.init_temperature), jnp.float32), jnp.asarray(cc.init_bias, jnp.float32)


def _vladva(cfg: ExperimentConfig, with_ntp: bool, name: str) -> LossFn:
    oc, cc = cfg.objective, cfg.objective.contrastive

    def loss_fn(model, batch, rngs=None):
        terms = []
        views = batch.get("con")
        if views is not None:
            ei, et = embed_views(model, views, cfg)
            scale, bias = _scale_and_bias(model, cfg)
            lc, parts = contrastive_loss(ei, et, kind=cc.kind, log_scale=scale, bias=bias, chunk=cc.chunk,
                                         valid=_real_rows(views))
            parts = {**parts, "temperature": jax.lax.stop_gradient(jnp.exp(-scale))}
            terms.append((oc.contrastive_weight, lc, parts))
        g = _stream(batch, "gen") if with_ntp and oc.ntp_weight else None
        if g is not None:
            terms.append((oc.ntp_weight, *_ntp(model, g, oc.z_loss)))
        return _combine(terms, name, "con" + (", gen" if with_ntp else ""))
    return loss_fn


def vladva(cfg: ExperimentConfig) -> LossFn:
    """VladVA: contrastive on short-caption views + next-token on long captions (METHODS.md §2)."""
    return _vladva(cfg, True, "vladva")


def contrastive(cfg: ExperimentConfig) -> LossFn:
    """Contrastive only (no next-token loss)."""
    return _vladva(cfg, False, "contrastive")


for _f in (generative, sugar, vladva, contrastive):
    _f.takes_model = True  # builds loss_fn(model, batch, rngs), not criterion(outputs, batch)

__all__ = ["generative", "sugar", "vladva", "contrastive", "embed_views", "forward"]
