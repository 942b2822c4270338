"""Frozen dataclass configs: YAML files, ``key=value`` overrides, Hugging Face round-trip.

Every config in the project is a frozen dataclass built from plain Python values, so that a
resolved config can be written next to a run's checkpoints and read back exactly.

    cfg = load_config("experiments/configs/tiny.yaml", ExperimentConfig,
                      overrides=["model.decoder.num_layers=4", "train.lr=3e-4"])

Model configs also map to and from Hugging Face ``config.json`` dicts (``from_hf``/``to_hf``),
so weights can move both ways (see ``mllm_jax/convert/hf.py``).

The package splits by concept: ``base`` (the machinery), ``model``, ``clip`` (the CLIP teacher's
model), ``data``, ``train``, ``embed`` (evaluation); every public name is re-exported here.
"""
from mllm_jax.config.base import (ConfigError, apply_overrides, apply_updates, config_hash, from_dict, parse_overrides,
                                  load_config, save_config, to_dict)
from mllm_jax.config.clip import ClipConfig, ClipTextConfig
from mllm_jax.config.data import DataConfig, SceneConfig, StreamConfig
from mllm_jax.config.embed import EmbedConfig
from mllm_jax.config.model import (DecoderConfig, LoRAConfig, MLLMConfig, ProjectorConfig, TextEncoderConfig,
                                   VisionConfig, dtype_of)
from mllm_jax.config.train import (CheckpointConfig, ContrastiveConfig, ExperimentConfig, MeshConfig,
                                   ObjectiveConfig, OptimConfig, StageConfig, StructureConfig, TrainConfig)

__all__ = [
    "ConfigError", "from_dict", "to_dict", "apply_overrides", "load_config", "save_config",
    "config_hash", "DecoderConfig", "VisionConfig", "TextEncoderConfig", "ProjectorConfig",
    "LoRAConfig", "MLLMConfig", "dtype_of",
    "SceneConfig", "DataConfig",
    "MeshConfig", "StreamConfig", "StructureConfig", "ContrastiveConfig", "ObjectiveConfig", "OptimConfig",
    "CheckpointConfig", "TrainConfig", "StageConfig", "ExperimentConfig", "apply_updates", "parse_overrides",
    "EmbedConfig", "ClipConfig", "ClipTextConfig",
]
