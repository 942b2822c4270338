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

The folder's ``preprocessor_config.json`` (a ``BitImageProcessor``'s), when present, gives how
images are prepared (``_preprocess.vision_from_hf``): the released processors' shortest edge
256 (``resize_shortest_edge``), bicubic, central 224 crop (``image_size``), ImageNet's mean /
std, which ``ImageSpec`` then reproduces exactly as transformers' PIL-backend
``BitImageProcessorPil`` does. The tower runs at the crop's side with its 518-px position table
interpolated. Without the file the tower runs at ``config.image_size`` with ImageNet's mean /
std and images are stretched to it (bilinear). Saving writes the file that describes the
config's ``ImageSpec``, so save -> load keeps the config.
"""
from __future__ import annotations

from mllm_jax.config import VisionConfig
from mllm_jax.convert.families._common import layer_norm, linear
from mllm_jax.convert.families._preprocess import vision_from_hf, vision_to_hf
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


def preprocessor_from_hf(cfg: VisionConfig, pp: dict, source: str) -> VisionConfig:
    """``cfg`` with the input side, resize, resample and mean / std of a ``preprocessor_config.json``."""
    return vision_from_hf(cfg, pp, source, resizable_table=True)


def preprocessor_to_hf(cfg: VisionConfig) -> dict:
    """What ``ImageSpec`` does for ``cfg``, as a ``BitImageProcessor`` config."""
    return vision_to_hf(cfg, "BitImageProcessor")


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
