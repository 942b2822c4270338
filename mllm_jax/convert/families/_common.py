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
