"""HF ``SiglipVisionModel`` <-> ``mllm_jax.models.vision.VisionTower`` (variant "siglip",
optional attention-pooling head)."""
from mllm_jax.convert.families._vit import make_family
from mllm_jax.convert.hf import register

FAMILY = register(make_family("siglip"))
