"""HF ``Dinov2Model`` <-> ``mllm_jax.models.vision.VisionTower`` (variant "dinov2").

The table follows the names ``Dinov2Model.save_pretrained`` writes in transformers 5.x, which are
also those of the released checkpoints (facebook/dinov2-*): ``encoder.layer.{i}.norm1``,
``attention.attention.{query,key,value}``, ``attention.output.dense``, ``layer_scale1.lambda1``,
``mlp.fc1`` / ``mlp.fc2`` or, with ``use_swiglu_ffn`` (giant), the fused ``mlp.weights_in`` and
``mlp.weights_out``; ``embeddings.cls_token [1, 1, D]``, ``embeddings.position_embeddings
[1, 1 + S*S, D]``, ``layernorm`` (our ``post_layernorm``). ``Dinov2ForImageClassification``
folders load too (``dinov2.`` prefix stripped, ``classifier.*`` skipped).

The mask token (``embeddings.mask_token``, used only by masked-image pretraining) is skipped on
load; saving writes ``use_mask_token: false`` so that transformers expects none.
``dinov2_with_registers`` folders are refused (``VisionConfig.from_hf``), as are
``qkv_bias: false`` and non-square sizes.

The folder's ``preprocessor_config.json`` (a ``BitImageProcessor``'s), when present, gives the
side images are fed at (``crop_size``, or ``size`` without centre cropping) and the mean / std;
without it the tower runs at ``config.image_size`` with ImageNet's mean / std, which the
released DINOv2 processors use. ``do_normalize: false`` gives a zero mean and unit std (the
processor then feeds ``x / 255``); ``do_rescale: false`` or a ``rescale_factor`` other than 1/255
is refused (``ImageSpec`` always scales by 1/255). Only those are read: ``ImageSpec`` resizes the whole image to
that side (bilinear), where the released processors resize the shorter edge to 256 (bicubic)
and crop the central 224 (as for CLIP, whose processor also crops, ImageSpec does not). Saving
writes one that describes our own preprocessing (``ImageSpec``'s plain resize to ``image_size``),
so save -> load keeps the config.
"""
from __future__ import annotations

import dataclasses
import math

from mllm_jax.config import ConfigError, VisionConfig
from mllm_jax.convert.families._common import layer_norm, linear
from mllm_jax.convert.hf import Entry, Family, register


def entries(cfg: VisionConfig) -> list[Entry]:
    d = cfg.hidden_size
    t = [Entry("embeddings.patch_embedding.kernel", "embeddings.patch_embeddings.projection.weight", "conv"),
         Entry("embeddings.patch_embedding.bias", "embeddings.patch_embeddings.projection.bias"),
         Entry("embeddings.class_embedding", "embeddings.cls_token",
               to_ours=lambda x: x.reshape(d), to_hf=lambda x: x.reshape(1, 1, d)),
         Entry("embeddings.position_embedding", "embeddings.position_embeddings",
               to_ours=lambda x: x.reshape(-1, d), to_hf=lambda x: x.reshape(1, -1, d))]
    for i in range(cfg.num_layers):
        o, h = f"layers.{i}", f"encoder.layer.{i}"
        t += layer_norm(f"{o}.layer_norm1", f"{h}.norm1")
        for mine, theirs in (("q_proj", "attention.attention.query"), ("k_proj", "attention.attention.key"),
                             ("v_proj", "attention.attention.value"), ("o_proj", "attention.output.dense")):
            t += linear(f"{o}.self_attn.{mine}", f"{h}.{theirs}")
        t += [Entry(f"{o}.layer_scale1.lambda1", f"{h}.layer_scale1.lambda1"),
              Entry(f"{o}.layer_scale2.lambda1", f"{h}.layer_scale2.lambda1")]
        t += layer_norm(f"{o}.layer_norm2", f"{h}.norm2")
        if cfg.use_swiglu_ffn:
            t += linear(f"{o}.mlp.weights_in", f"{h}.mlp.weights_in") + linear(f"{o}.mlp.weights_out",
                                                                              f"{h}.mlp.weights_out")
        else:
            t += linear(f"{o}.mlp.fc1", f"{h}.mlp.fc1") + linear(f"{o}.mlp.fc2", f"{h}.mlp.fc2")
    t += layer_norm("post_layernorm", "layernorm")
    return t


def _square_size(value, where: str) -> int:
    """A processor size: an int, or a ``{"height", "width"}`` dict with equal sides."""
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, dict) and "height" in value and "width" in value:
        if value["height"] != value["width"]:
            raise ConfigError(f"{where}={value} is not square; only square inputs are supported")
        return int(value["height"])
    raise ConfigError(f"{where}={value}: expected an int or {{'height': n, 'width': n}} (a square crop); "
                      "'shortest_edge' alone gives non-square inputs, which are not supported")


def preprocessor_from_hf(cfg: VisionConfig, pp: dict, source: str) -> VisionConfig:
    """``cfg`` with the input side and mean / std of a ``preprocessor_config.json``."""
    if pp.get("do_center_crop", True):
        side = _square_size(pp.get("crop_size", 224), f"{source}: crop_size")
    else:
        side = _square_size(pp.get("size"), f"{source}: size (do_center_crop is false)")
    if side % cfg.patch_size:
        raise ConfigError(f"{source}: an input side of {side} px is not a multiple of patch_size={cfg.patch_size}")
    # ImageSpec always scales by 1/255 (do_rescale with transformers' default factor); another
    # scaling would feed the tower other values than transformers' processor does
    factor = pp.get("rescale_factor", 1 / 255)
    if not pp.get("do_rescale", True) or not math.isclose(float(factor), 1 / 255, rel_tol=1e-6):
        raise ConfigError(f"{source}: do_rescale={pp.get('do_rescale', True)}, rescale_factor={factor} is not "
                          "supported; images are always scaled by 1/255 (do_rescale: true, rescale_factor: 1/255)")
    table = cfg.position_image_size or cfg.image_size
    kw = dict(image_size=side, position_image_size=None if side == table else table)
    if not pp.get("do_normalize", True):      # transformers' processor then leaves x / 255 as it is
        kw.update(image_mean=(0.0,) * cfg.num_channels, image_std=(1.0,) * cfg.num_channels)
        return dataclasses.replace(cfg, **kw)
    for key in ("image_mean", "image_std"):
        if pp.get(key) is not None:
            v = pp[key]
            v = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * cfg.num_channels))
            if len(v) != cfg.num_channels:
                raise ConfigError(f"{source}: {key}={list(v)} has {len(v)} values for {cfg.num_channels} channels")
            kw[key] = v
    return dataclasses.replace(cfg, **kw)


def preprocessor_to_hf(cfg: VisionConfig) -> dict:
    """What ``ImageSpec`` does (resize to ``image_size``, bilinear; scale by 1/255; normalise),
    as a ``BitImageProcessor`` config."""
    return {"image_processor_type": "BitImageProcessor", "do_resize": True,
            "size": {"height": cfg.image_size, "width": cfg.image_size}, "resample": 2,
            "do_center_crop": False, "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std), "do_convert_rgb": True}


def _build(cfg: VisionConfig, rngs):
    from mllm_jax.models.vision import VisionTower
    return VisionTower(cfg, rngs=rngs)


FAMILY = register(Family(
    name="dinov2_vision",
    # Dinov2WithRegisters* is listed so that its folders reach VisionConfig.from_hf's clear refusal
    architectures=("Dinov2Model", "Dinov2ForImageClassification", "Dinov2WithRegistersModel",
                   "Dinov2WithRegistersForImageClassification"),
    model_types=("dinov2", "dinov2_with_registers"),
    config_from_hf=lambda hf, tensors: VisionConfig.from_hf(hf),
    config_to_hf=lambda cfg: {**cfg.to_hf(), "architectures": ["Dinov2Model"]},
    build=_build, entries=entries,
    ignore=(r"^embeddings\.mask_token$", r"^classifier\."), hf_prefixes=("dinov2.",),
    preprocessor_from_hf=preprocessor_from_hf, preprocessor_to_hf=preprocessor_to_hf))
