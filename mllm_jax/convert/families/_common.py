"""Entry-table helpers shared by the family modules (no family is registered here)."""
from __future__ import annotations

from mllm_jax.convert.hf import Entry


def linear(ours: str, hf: str, bias: bool = True) -> list[Entry]:
    """A ``layers.Dense`` (``kernel [in, out]``, ``bias``) <-> torch ``nn.Linear`` (``weight [out, in]``)."""
    out = [Entry(f"{ours}.kernel", f"{hf}.weight", "linear")]
    if bias:
        out.append(Entry(f"{ours}.bias", f"{hf}.bias"))
    return out


def layer_norm(ours: str, hf: str) -> list[Entry]:
    """A ``layers.LayerNorm`` (``scale``, ``bias``) <-> torch ``nn.LayerNorm`` (``weight``, ``bias``)."""
    return [Entry(f"{ours}.scale", f"{hf}.weight"), Entry(f"{ours}.bias", f"{hf}.bias")]


def attention(ours: str, hf: str, names=("q_proj", "k_proj", "v_proj", "out_proj")) -> list[Entry]:
    """``layers.Attention`` (``q/k/v/o_proj``, all with bias) <-> four HF linears named ``names``."""
    out = []
    for mine, theirs in zip(("q_proj", "k_proj", "v_proj", "o_proj"), names):
        out += linear(f"{ours}.{mine}", f"{hf}.{theirs}")
    return out


def clip_encoder_layer(ours: str, hf: str) -> list[Entry]:
    """A ``vision.EncoderLayer`` without LayerScale <-> HF's CLIP / SigLIP encoder layer
    (``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp.fc1`` / ``mlp.fc2``)."""
    return (layer_norm(f"{ours}.layer_norm1", f"{hf}.layer_norm1") + attention(f"{ours}.self_attn", f"{hf}.self_attn")
            + layer_norm(f"{ours}.layer_norm2", f"{hf}.layer_norm2")
            + linear(f"{ours}.mlp.fc1", f"{hf}.mlp.fc1") + linear(f"{ours}.mlp.fc2", f"{hf}.mlp.fc2"))
