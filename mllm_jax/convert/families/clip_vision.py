"""HF ``CLIPVisionModel`` <-> ``mllm_jax.models.vision.VisionTower`` (variant "clip")."""
from mllm_jax.convert.families._vit import make_family
from mllm_jax.convert.hf import register

FAMILY = register(make_family("clip"))
