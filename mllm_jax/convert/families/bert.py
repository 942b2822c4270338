"""HF ``BertModel`` <-> ``mllm_jax.models.text_encoder.TextEncoder``.

Loading also accepts checkpoints of BERT with a head (``BertForMaskedLM``, ``BertForPreTraining``):
their ``bert.`` prefix is stripped and their ``cls.*`` head tensors are skipped, as transformers
does when it loads one into ``BertModel``. The ``embeddings.position_ids`` buffer some
checkpoints store (e.g. all-MiniLM-L6-v2) is ignored. LayerNorms named ``LayerNorm.gamma`` /
``LayerNorm.beta`` (checkpoints converted from the original TensorFlow BERT) load as
``LayerNorm.weight`` / ``.bias``, as transformers renames them. ``add_pooler`` follows whether
``pooler.dense.*`` tensors are present. Saving writes ``BertModel`` names.
"""
from __future__ import annotations

import dataclasses

from mllm_jax.config import TextEncoderConfig
from mllm_jax.convert.families._common import layer_norm, linear
from mllm_jax.convert.hf import Entry, Family, register


def entries(cfg: TextEncoderConfig) -> list[Entry]:
    t = [Entry(f"embeddings.{n}.embedding", f"embeddings.{n}.weight")
         for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    t += layer_norm("embeddings.layer_norm", "embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        o, h = f"layers.{i}", f"encoder.layer.{i}"
        for mine, theirs in (("q_proj", "self.query"), ("k_proj", "self.key"), ("v_proj", "self.value"),
                             ("o_proj", "output.dense")):
            t += linear(f"{o}.self_attn.{mine}", f"{h}.attention.{theirs}")
        t += layer_norm(f"{o}.attn_layer_norm", f"{h}.attention.output.LayerNorm")
        t += linear(f"{o}.mlp.fc1", f"{h}.intermediate.dense") + linear(f"{o}.mlp.fc2", f"{h}.output.dense")
        t += layer_norm(f"{o}.mlp_layer_norm", f"{h}.output.LayerNorm")
    if cfg.add_pooler:
        t += linear("pooler", "pooler.dense")
    return t


def _rename(name: str) -> str:
    """TF-era LayerNorm names -> today's (transformers' "legacy" renaming on load)."""
    if name.endswith("LayerNorm.gamma"):
        return name[:-len("gamma")] + "weight"
    if name.endswith("LayerNorm.beta"):
        return name[:-len("beta")] + "bias"
    return name


def _config_from_hf(hf: dict, tensors: set) -> TextEncoderConfig:
    has_pooler = any(n.endswith("pooler.dense.weight") for n in tensors)
    return dataclasses.replace(TextEncoderConfig.from_hf(hf), add_pooler=has_pooler)


def _build(cfg, rngs):
    from mllm_jax.models.text_encoder import TextEncoder
    return TextEncoder(cfg, rngs=rngs)


FAMILY = register(Family(
    name="bert", architectures=("BertModel",), model_types=("bert",),
    config_from_hf=_config_from_hf, config_to_hf=lambda cfg: cfg.to_hf(), build=_build, entries=entries,
    ignore=(r"(^|\.)embeddings\.position_ids$", r"^cls\."), hf_prefixes=("bert.",), hf_rename=_rename))
