"""Configs shared by the evaluation tests: a tiny MLLM (4 tokens per image) and small buckets."""
from mllm_jax.config import DataConfig, DecoderConfig, MLLMConfig, ProjectorConfig, VisionConfig

MODEL_CFG = MLLMConfig(
    vision=VisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_heads=2),
    projector=ProjectorConfig(kind="pool", pool_size=2),
    decoder=DecoderConfig(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2))
DATA_CFG = DataConfig(seq_buckets=(32, 64, 128), batch_size=8)
