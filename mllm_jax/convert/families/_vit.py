"""The converter shared by the CLIP and SigLIP vision towers (registered by
``clip_vision.py`` and ``siglip_vision.py``).

transformers 5.x saves ``CLIPVisionModel`` / ``SiglipVisionModel`` tensors without a prefix
(``embeddings.patch_embedding.weight``); older checkpoints and full CLIP/SigLIP/LLaVA towers
carry ``vision_model.`` in front, which loading accepts. Saving writes the 5.x names.

The CLIP tower also reads the folder's ``preprocessor_config.json`` (a ``CLIPImageProcessor``'s;
``_preprocess.vision_from_hf``): the released ones resize the shorter edge to 224 (bicubic) and
crop the central 224, which ``ImageSpec`` then reproduces exactly (transformers' PIL backend).
SigLIP towers read theirs too (a ``SiglipImageProcessor``'s: the released ones stretch to
``image_size``, bicubic, mean / std 0.5). Without the file images are stretched to
``image_size`` (bilinear). Saving writes the file that describes the config's ``ImageSpec``.
"""
from __future__ import annotations

import numpy as np

from mllm_jax.config import VisionConfig
from mllm_jax.convert.families._common import clip_encoder_layer, layer_norm, linear
from mllm_jax.convert.families._preprocess import PROCESSORS, vision_from_hf, vision_to_hf
from mllm_jax.convert.hf import Entry, Family


def _in_proj_to_ours(w: np.ndarray) -> np.ndarray:
    """torch MultiheadAttention ``in_proj_weight [3D, D]`` (rows q|k|v, each ``[out, in]``) -> ``[D, 3, D]``."""
    d = w.shape[1]
    return np.ascontiguousarray(w.reshape(3, d, d).transpose(2, 0, 1))


def _in_proj_to_hf(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.transpose(1, 2, 0).reshape(3 * k.shape[0], k.shape[0]))


def entries(cfg: VisionConfig) -> list[Entry]:
    clip = cfg.variant == "clip"
    t = [Entry("embeddings.patch_embedding.kernel", "embeddings.patch_embedding.weight", "conv"),
         Entry("embeddings.position_embedding", "embeddings.position_embedding.weight")]
    if clip:
        t += [Entry("embeddings.class_embedding", "embeddings.class_embedding")]
        t += layer_norm("pre_layrnorm", "pre_layrnorm")
    else:
        t += [Entry("embeddings.patch_embedding.bias", "embeddings.patch_embedding.bias")]
    for i in range(cfg.num_layers):
        o, h = f"layers.{i}", f"encoder.layers.{i}"
        t += clip_encoder_layer(o, h)
    t += layer_norm("post_layernorm", "post_layernorm")
    if not clip and cfg.use_head:
        t += [Entry("head.probe", "head.probe", to_ours=lambda x: x.reshape(-1),
                    to_hf=lambda x: x.reshape(1, 1, -1)),
              Entry("head.attention.in_proj_kernel", "head.attention.in_proj_weight",
                    to_ours=_in_proj_to_ours, to_hf=_in_proj_to_hf),
              Entry("head.attention.in_proj_bias", "head.attention.in_proj_bias",
                    to_ours=lambda x: x.reshape(3, -1), to_hf=lambda x: x.reshape(-1))]
        t += linear("head.attention.out_proj", "head.attention.out_proj")
        t += layer_norm("head.layernorm", "head.layernorm")
        t += linear("head.mlp.fc1", "head.mlp.fc1") + linear("head.mlp.fc2", "head.mlp.fc2")
    return t


def make_family(variant: str) -> Family:
    from mllm_jax.models.vision import VisionTower

    arch = "CLIPVisionModel" if variant == "clip" else "SiglipVisionModel"
    model_type = f"{variant}_vision_model"

    def config_from_hf(hf: dict, tensors: set) -> VisionConfig:
        return VisionConfig.from_hf(hf)

    def config_to_hf(cfg: VisionConfig) -> dict:
        return {**cfg.to_hf(), "architectures": [arch]}

    defaults, processor = PROCESSORS[variant]
    pre = dict(preprocessor_from_hf=lambda cfg, pp, source: vision_from_hf(cfg, pp, source, resizable_table=False,
                                                                         defaults=defaults),
               preprocessor_to_hf=lambda cfg: vision_to_hf(cfg, processor))
    return Family(
        name=f"{variant}_vision", architectures=(arch,), model_types=(model_type,),
        config_from_hf=config_from_hf, config_to_hf=config_to_hf,
        build=lambda cfg, rngs: VisionTower(cfg, rngs=rngs), entries=entries,
        ignore=(r"(^|\.)embeddings\.position_ids$",), hf_prefixes=("vision_model.",), **pre)
