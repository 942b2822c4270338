"""Data configs (``mllm_jax/data/``): the synthetic scene world, one pipeline, named streams."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from mllm_jax.config.base import ConfigError, check_local_path

STREAM_NAME = r"[A-Za-z0-9_-]+"      # a data stream's name (StreamConfig, MixtureIterator)
MODEL_TEACHERS = ("minilm", "vision", "clip")   # data.teachers that load a model (data.teacher_models)


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """The synthetic scene world (``mllm_jax/data/synthetic.py``)."""
    seed: int = 0
    image_size: int = 32                   # canvas side in pixels (32..64)
    min_objects: int = 1
    max_objects: int = 4
    noise_std: float = 8.0                 # background/object pixel noise
    # colour-shape kinds never shown or named in train/val/test; test_comp scenes contain one
    held_out: tuple[str, ...] = ("red triangle", "orange cross", "green circle", "blue diamond",
                                 "purple square")
    story_images: tuple[int, int] = (2, 4)  # images per interleaved document (min, max)
    train_size: int = 20000
    val_size: int = 1000
    test_size: int = 1000

    def __post_init__(self):
        if not 16 <= self.image_size <= 256:
            raise ConfigError(f"scene.image_size: {self.image_size}; expected 16..256 pixels")
        if not 1 <= self.story_images[0] <= self.story_images[1] <= 6:
            raise ConfigError(f"scene.story_images: {self.story_images}; expected 1 <= min <= max <= 6")

    def split_size(self, split: str) -> int:
        return {"train": self.train_size, "val": self.val_size}.get(split, self.test_size)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the data pipeline reads and how it batches (``mllm_jax/data/pipeline.py``).

    Image preprocessing (size, mean, std), ``tokens_per_image`` and ``image_token_id`` come from
    the model config, not from here, so the two can never disagree.
    """
    source: str = "scene"                  # scene | llava | interleaved | pairs | fashion_mnist
    path: Optional[str] = None             # file for llava/interleaved/pairs; folder for fashion_mnist
    image_root: Optional[str] = None       # where relative image paths in `path` are resolved
    split: str = "train"                   # scene world: train | val | test | test_comp
    # scene world tasks as "name:weight" (see mllm_jax/data/synthetic_sets.py TASKS)
    tasks: tuple[str, ...] = ("caption_short:1", "caption_long:1", "vqa:3", "pope:1",
                              "multi_image_qa:1", "rag_qa:1")
    scene: SceneConfig = dataclasses.field(default_factory=SceneConfig)
    tokenizer: Optional[str] = None        # folder with tokenizer.json (train one: mllm_jax.data.tokenize)
    batch_size: int = 8                    # per process
    seq_buckets: tuple[int, ...] = (64, 128, 256)   # padded lengths; a batch takes the smallest that fits
    max_images: int = 4                    # M in pixel_values [B, M, H, W, C]
    max_slices: int = 16                   # S in slice_* / teacher_* [B, S, ...]
    shuffle: bool = True
    # scene world: indices 2k and 2k+1 show the same scene (two views of it, e.g. its image and
    # its caption, each rendered/worded on its own); with shuffle=False both land in one batch,
    # so a structure or contrastive loss sees the cross-modal positive next to the negatives
    paired_views: bool = False
    seed: int = 0
    num_epochs: Optional[int] = None       # None: repeat forever
    drop_remainder: bool = True            # False: the last batch of an epoch is padded with empty rows
    worker_count: int = 0                  # grain worker processes (0: in the main process); same batches either way
    worker_buffer_size: int = 2            # batches each worker encodes ahead
    shard_by_process: bool = True          # each jax process reads a disjoint 1/process_count
    bad_input: str = "skip"                # error | skip
    max_skip_fraction: float = 0.01        # more skipped than this (per epoch) is an error
    doc_loss: bool = True                  # plain documents: next-token loss on their text
    teachers: tuple[str, ...] = ()         # per-slice teacher features: scene_graph | pixel | minilm | vision | clip
    soft_prompts: int = 0                  # summary prompts as this many <soft> slots (VladVA) instead of text
    teacher_cache: Optional[str] = None    # folder of tensorstore caches (one per teacher)
    teacher_models: dict = dataclasses.field(default_factory=dict)
                                           # local model folders of the model-based teachers:
                                           # minilm: a BERT sentence-encoder folder (default
                                           # $MLLM_JAX_ASSETS/all-MiniLM-L6-v2; BGE too), pooled as its
                                           # sentence-transformers files say (1_Pooling/config.json:
                                           # MiniLM mean, BGE CLS; mean without them); vision: a Hugging
                                           # Face CLIP / SigLIP / DINOv2 vision tower folder (config.json +
                                           # safetensors; DINOv2 also reads preprocessor_config.json;
                                           # a whole CLIPModel folder gives its vision tower); clip: a
                                           # Hugging Face CLIPModel folder (both towers, projections,
                                           # tokenizer files): images and texts in CLIP's one space,
                                           # the paper's image-text kernel
                                           # (objective.structure.shared_teacher=clip)

    def __post_init__(self):
        if self.bad_input not in ("error", "skip"):
            raise ConfigError(f"data.bad_input: {self.bad_input!r}; expected 'error' or 'skip'")
        if not self.seq_buckets or list(self.seq_buckets) != sorted(set(self.seq_buckets)):
            raise ConfigError(f"data.seq_buckets: {self.seq_buckets}; expected increasing lengths")
        if self.batch_size < 1 or self.max_images < 0 or self.max_slices < 1:
            raise ConfigError("data: batch_size and max_slices must be >= 1, max_images >= 0")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError(f"data.max_skip_fraction: {self.max_skip_fraction}; expected 0..1")
        for name, path in self.teacher_models.items():
            if name not in MODEL_TEACHERS:
                raise ConfigError(f"data.teacher_models: {name!r}; the teachers that load a model are {MODEL_TEACHERS}")
            if not isinstance(path, str) or not path:
                raise ConfigError(f"data.teacher_models.{name}: expected a local model folder, got {path!r}")
            check_local_path(f"data.teacher_models.{name}", path)

    def task_weights(self) -> dict[str, int]:
        out = {}
        for item in self.tasks:
            name, _, w = item.partition(":")
            try:
                weight = int(w) if w else 1
            except ValueError:
                raise ConfigError(f"data.tasks: {item!r}; expected 'name:integer_weight'") from None
            name = name.strip()
            if weight < 0:       # the scene source repeats a task `weight` times: a negative one dropped it
                raise ConfigError(f"data.tasks: {item!r}; a weight is a count >= 0 (0 leaves the task out)")
            if name in out:      # a second entry replaced the first, unseen
                raise ConfigError(f"data.tasks: {name!r} is listed twice ({list(self.tasks)}); give it one weight")
            out[name] = weight
        return out


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """One named data stream of a multi-stream recipe: every train step draws one batch from
    each stream and the loss receives ``{name: batch}`` (e.g. Sugar: ``gen`` + ``disc``)."""
    name: str = "gen"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(STREAM_NAME, self.name):
            raise ConfigError(f"streams: name {self.name!r}; expected letters, digits, '_' or '-' (it keys the "
                              "step's batch, its data state and its metrics)")


__all__ = ["SceneConfig", "DataConfig", "StreamConfig"]
