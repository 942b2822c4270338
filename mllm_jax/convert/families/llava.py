"""HF ``LlavaForConditionalGeneration`` <-> ``mllm_jax.models.mllm.MLLM`` (MLP projector).

Saving writes the names transformers 5.23's ``save_pretrained`` writes
(``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
``language_model.lm_head.weight``); loading also accepts the in-memory 5.x names
(``model.vision_tower.*``, ``model.language_model.*``, ``lm_head.weight``) and towers saved
with a ``vision_model.`` prefix. The vision and decoder rows come from their own families'
tables, so there is one mapping per architecture.

The folder's ``preprocessor_config.json`` (the ``CLIPImageProcessor`` / ``SiglipImageProcessor``
that ``LlavaProcessor`` holds; llava-hf's LLaVA-1.5: shorter edge to 336, bicubic, central 336
crop) sets the vision config's preprocessing (``_preprocess.vision_from_hf``), so ``ImageSpec``
prepares images for training, evaluation and ``generate --hf`` as that processor does; without
the file they are stretched to ``image_size``. Saving writes the file for the config.
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from mllm_jax.config import ConfigError, MLLMConfig
from mllm_jax.convert.families import _vit, llama
from mllm_jax.convert.families._common import linear
from mllm_jax.convert.families._preprocess import PROCESSORS, vision_from_hf, vision_to_hf
from mllm_jax.convert.hf import Entry, Family, register

_RENAMES = (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("vision_tower.vision_model.", "vision_tower."))


def _rename(name: str) -> str:
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    for old, new in _RENAMES:
        if name.startswith(old):
            name = new + name[len(old):]
    return name


def entries(cfg: MLLMConfig) -> list[Entry]:
    if cfg.projector.kind != "mlp":
        raise ConfigError("LLaVA conversion needs projector.kind='mlp' (HF has no pool-adapter)")
    t = [Entry(f"vision.{e.ours}", f"vision_tower.{e.hf}", e.kind, e.to_ours, e.to_hf)
         for e in _vit.entries(cfg.vision)]
    t += linear("projector.linear_1", "multi_modal_projector.linear_1", cfg.projector.bias)
    t += linear("projector.linear_2", "multi_modal_projector.linear_2", cfg.projector.bias)
    t += [Entry(f"decoder.{e.ours}", f"language_model.{e.hf}", e.kind, e.to_ours, e.to_hf)
          for e in llama.entries(cfg.decoder)]
    return t


def _config_from_hf(hf: dict, tensor_names: set) -> MLLMConfig:
    text = hf.get("text_config") or {}
    if text.get("model_type", "llama") not in ("llama", "qwen2"):
        raise ConfigError(f"llava text_config.model_type {text.get('model_type')!r}: only llama/qwen2 decoders")
    return MLLMConfig.from_hf(hf)


def _build(cfg: MLLMConfig, rngs: nnx.Rngs):
    from mllm_jax.models.mllm import MLLM
    return MLLM(cfg, rngs=rngs)


def _config_to_hf(cfg: MLLMConfig) -> dict:
    return cfg.to_hf()


def _preprocessor_from_hf(cfg: MLLMConfig, pp: dict, source: str) -> MLLMConfig:
    return dataclasses.replace(cfg, vision=vision_from_hf(cfg.vision, pp, source, resizable_table=False,
                                                          defaults=PROCESSORS[cfg.vision.variant][0]))


def _preprocessor_to_hf(cfg: MLLMConfig) -> dict:
    return vision_to_hf(cfg.vision, PROCESSORS[cfg.vision.variant][1])


FAMILY = register(Family(
    name="llava", architectures=("LlavaForConditionalGeneration",), model_types=("llava",),
    config_from_hf=_config_from_hf, config_to_hf=_config_to_hf, build=_build, entries=entries,
    ignore=(r"(^|\.)position_ids$", r"rotary_emb\.inv_freq$", r"^language_model\.lm_head\.weight$"),
    hf_rename=_rename, preprocessor_from_hf=_preprocessor_from_hf, preprocessor_to_hf=_preprocessor_to_hf,
    # our additions with no LLaVA counterpart (exported without them, with a warning)
    local_params=(r"^soft_prompt\.", r"^embed_head\.", r"^logit_(scale|bias)$")))
