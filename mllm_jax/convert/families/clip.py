"""HF ``CLIPModel`` (``model_type`` "clip": ``vision_config`` + ``text_config`` +
``projection_dim``) <-> ``mllm_jax.models.clip.ClipModel``.

The vision rows are the CLIP vision tower's own table (``_vit.entries``) under
``vision_model.``; the text tower's are HF's names with ``encoder.layers`` -> ``layers``.
The ``position_ids`` buffers some checkpoints store are ignored. Saving writes the names
transformers 5.x writes (which ``CLIPModel.from_pretrained`` reads back).

The folder's ``preprocessor_config.json`` (``CLIPImageProcessor``; ``_preprocess.vision_from_hf``)
sets the vision config's preprocessing: the released ones resize the shorter edge to the tower's
side (bicubic) and crop its centre, which ``ImageSpec`` (and so the ``clip`` teacher) then
reproduces exactly as transformers' PIL backend does. Saving writes the file back.
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from mllm_jax.config.clip import ClipConfig, ClipTextConfig
from mllm_jax.convert.families import _vit
from mllm_jax.convert.families._common import clip_encoder_layer, layer_norm, linear
from mllm_jax.convert.families._preprocess import vision_from_hf, vision_to_hf
from mllm_jax.convert.hf import Entry, Family, register


def text_entries(cfg: ClipTextConfig, ours: str = "text_model", hf: str = "text_model") -> list[Entry]:
    t = [Entry(f"{ours}.embeddings.{n}.embedding", f"{hf}.embeddings.{n}.weight")
         for n in ("token_embedding", "position_embedding")]
    for i in range(cfg.num_layers):
        o, h = f"{ours}.layers.{i}", f"{hf}.encoder.layers.{i}"
        t += clip_encoder_layer(o, h)
    t += layer_norm(f"{ours}.final_layer_norm", f"{hf}.final_layer_norm")
    return t


def entries(cfg: ClipConfig) -> list[Entry]:
    t = [Entry(f"vision_model.{e.ours}", f"vision_model.{e.hf}", e.kind, e.to_ours, e.to_hf)
         for e in _vit.entries(cfg.vision)]
    t += text_entries(cfg.text)
    t += linear("visual_projection", "visual_projection", bias=False)
    t += linear("text_projection", "text_projection", bias=False)
    t.append(Entry("logit_scale", "logit_scale"))
    return t


def _build(cfg: ClipConfig, rngs: nnx.Rngs):
    from mllm_jax.models.clip import ClipModel
    return ClipModel(cfg, rngs=rngs)


FAMILY = register(Family(
    name="clip", architectures=("CLIPModel",), model_types=("clip",),
    config_from_hf=lambda hf, tensors: ClipConfig.from_hf(hf), config_to_hf=ClipConfig.to_hf, build=_build,
    entries=entries, ignore=(r"(^|\.)embeddings\.position_ids$",),
    preprocessor_from_hf=lambda cfg, pp, source: dataclasses.replace(
        cfg, vision=vision_from_hf(cfg.vision, pp, source, resizable_table=False)),
    preprocessor_to_hf=lambda cfg: vision_to_hf(cfg.vision, "CLIPImageProcessor")))
