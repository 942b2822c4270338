"""CLIP configs (``mllm_jax/models/clip.py``): the text tower and the two-tower model, with
their Hugging Face ``config.json`` round-trip (``clip_text_model`` / ``clip``)."""
from __future__ import annotations

import dataclasses

from mllm_jax.config.base import ConfigError
from mllm_jax.config.model import _HF_ACT_ALIASES, VisionConfig


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    """CLIP's text transformer (causal, pre-LN, pooled at the end-of-text token)."""
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    # the pooled output is the hidden state at the first eos_token_id; 2 selects transformers'
    # legacy rule instead (the highest token id of each row: old OpenAI configs say 2)
    eos_token_id: int = 49407
    dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"clip text: num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}")

    @classmethod
    def from_hf(cls, hf: dict, **kw) -> "ClipTextConfig":
        """From a ``clip_text_model`` config dict; absent keys take transformers' CLIPTextConfig defaults."""
        mt = hf.get("model_type", "clip_text_model")
        if mt != "clip_text_model":
            raise ConfigError(f"clip text config: model_type {mt!r} is not supported (clip_text_model)")
        eos = hf.get("eos_token_id", 49407)
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ConfigError(f"clip text config: eos_token_id={eos}; the pooled output needs one end token")
            eos = eos[0]
        act = hf.get("hidden_act", "quick_gelu")
        opt = lambda key, default: default if hf.get(key) is None else hf[key]  # noqa: E731
        return cls(
            vocab_size=hf.get("vocab_size", 49408), hidden_size=hf.get("hidden_size", 512),
            intermediate_size=hf.get("intermediate_size", 2048), num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 8),
            max_position_embeddings=hf.get("max_position_embeddings", 77),
            hidden_act=_HF_ACT_ALIASES.get(act, act), layer_norm_eps=float(opt("layer_norm_eps", 1e-5)),
            pad_token_id=opt("pad_token_id", 1), bos_token_id=opt("bos_token_id", 49406),
            eos_token_id=49407 if eos is None else int(eos), **kw)

    def to_hf(self) -> dict:
        return {
            "model_type": "clip_text_model", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act, "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """HF ``CLIPModel``: a CLIP vision tower and a CLIP text tower, each projected (no bias) to
    one shared ``projection_dim``-d space."""
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: ClipTextConfig = dataclasses.field(default_factory=ClipTextConfig)
    projection_dim: int = 64
    logit_scale_init_value: float = 2.6592

    def __post_init__(self):
        if self.vision.variant != "clip":
            raise ConfigError(f"clip: vision.variant is {self.vision.variant!r}; a CLIPModel's tower is 'clip'")

    @classmethod
    def from_hf(cls, hf: dict) -> "ClipConfig":
        """From a ``clip`` config dict (``text_config``, ``vision_config``, ``projection_dim``);
        the legacy ``text_config_dict`` / ``vision_config_dict`` keys win over those, as in
        transformers."""
        if hf.get("model_type", "clip") != "clip":
            raise ConfigError(f"clip config: model_type {hf.get('model_type')!r} is not supported (clip)")
        text = {**(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
        vision = {**(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
        return cls(vision=VisionConfig.from_hf({"model_type": "clip_vision_model", **vision}),
                   text=ClipTextConfig.from_hf({"model_type": "clip_text_model", **text}),
                   projection_dim=int(hf.get("projection_dim") or 512),
                   logit_scale_init_value=float(hf.get("logit_scale_init_value", 2.6592)))

    def to_hf(self) -> dict:
        return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": self.projection_dim,
                "logit_scale_init_value": self.logit_scale_init_value,
                "text_config": self.text.to_hf(), "vision_config": self.vision.to_hf()}


__all__ = ["ClipTextConfig", "ClipConfig"]
