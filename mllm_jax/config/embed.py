"""Evaluation configs (``mllm_jax/eval/``)."""
from __future__ import annotations

import dataclasses

from mllm_jax.config.base import ConfigError


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """How the evaluation suite turns a sample into something comparable (``eval/embed.py``).

    * ``alignment="none"``: one vector per sample, pooled from layer ``layer`` by ``method``:
      ``mean`` (masked mean over the document's tokens), ``last`` (its last token) or ``prompt``
      (the sample as a user turn followed by the summary prompt, last token: E5-V / VladVA).
      Similarity is the cosine (the dot product with ``normalize=False``).
    * ``alignment="gak" | "softdtw"``: the sequence of Sugar slice embeddings (one per segment;
      the sample rendered as a document, ``method`` unused); similarity is the normalised global
      alignment kernel (bandwidth ``sigma``) or minus the soft-DTW value (smoothing ``gamma``);
      training's structure loss aligns L2-normalised slices, as ``normalize=True`` does here.
    """
    method: str = "prompt"                 # mean | last | prompt
    layer: int = -1                        # decoder hidden state (-1 = last, after the final norm)
    alignment: str = "none"                # none | gak | softdtw
    normalize: bool = True                 # L2-normalise pooled vectors / slice embeddings
    sigma: float = 1.0                     # GAK bandwidth
    gamma: float = 0.1                     # soft-DTW smoothing

    def __post_init__(self):
        if self.method not in ("mean", "last", "prompt"):
            raise ConfigError(f"embed.method: {self.method!r}; expected 'mean', 'last' or 'prompt'")
        if self.alignment not in ("none", "gak", "softdtw"):
            raise ConfigError(f"embed.alignment: {self.alignment!r}; expected 'none', 'gak' or 'softdtw'")
        if not self.sigma > 0 or not self.gamma > 0:
            raise ConfigError(f"embed: sigma={self.sigma} and gamma={self.gamma} must be > 0")


__all__ = ["EmbedConfig"]
