"""Experiment and training configs (``mllm_jax/train/``, ``mllm_jax/objectives/``)."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from mllm_jax.config.base import ConfigError, check_local_path
from mllm_jax.config.data import DataConfig, StreamConfig
from mllm_jax.config.model import MLLMConfig


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh ``('data', 'fsdp', 'tensor')``; one size may be -1 (all remaining devices)."""
    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


@dataclasses.dataclass(frozen=True)
class StructureConfig:
    """Sugar's structure-induced loss (``objectives/structure.py``); all [R] choices, METHODS.md §1."""
    alignment: str = "gak"                 # gak | softdtw | pooled (the "w/o GAK" ablation)
    sigma: float = 1.0                     # GAK bandwidth on unit-norm slice embeddings
    gamma: float = 0.1                     # soft-DTW smoothing
    softdtw_scale: float = 1.0             # S = exp(-divergence / scale) for soft-DTW
    target_sigma: float = 1.0              # GAK bandwidth of the triple kernel (unit-norm teacher features)
    # teachers (data.teachers names; batch keys teacher_<name>) of the triple kernel's local kernel:
    image_teacher: str | tuple[str, ...] = "pixel"  # image-image slice pairs; a list concatenates its
                                           # teachers' unit-norm features (the paper: [vision, clip],
                                           # vision a DINOv2 folder)
    text_teacher: str | tuple[str, ...] = "minilm"  # text-text pairs (the paper: [minilm, clip], minilm BGE)
    shared_teacher: str = "scene_graph"    # image-text pairs: one space both modalities live in (the paper: clip)
    layer: int = -1                        # hidden layer of the slice embeddings (-1 = last, normed)

    def __post_init__(self):
        if self.alignment not in ("gak", "softdtw", "pooled"):
            raise ConfigError(f"objective.structure.alignment: {self.alignment!r}; expected gak, softdtw or pooled")
        for field in ("image_teacher", "text_teacher"):
            names = getattr(self, field)
            if isinstance(names, (list, tuple)):
                if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
                    raise ConfigError(f"objective.structure.{field}: {list(names)}; expected a teacher name or a "
                                      "non-empty list of distinct teacher names")
                object.__setattr__(self, field, tuple(names))


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    """Contrastive loss of the VladVA recipe (``objectives/contrastive.py``)."""
    kind: str = "infonce"                  # infonce | siglip
    init_temperature: float = 0.05         # E5-V uses 0.05, VLM2Vec 0.02 [P]; used as is when
                                           # learn_temperature is false (a learned one starts at
                                           # model.contrastive_temperature, whose params it trains)
    learn_temperature: bool = True
    init_bias: float = -10.0               # siglip; likewise (learned: model.contrastive_bias)
    chunk: Optional[int] = None            # None: dense [B, B] logits
    pooling: str = "prompt"                # mean | last | prompt (last token of the summary prompt)
    layer: int = -1

    def __post_init__(self):
        if self.kind not in ("infonce", "siglip"):
            raise ConfigError(f"objective.contrastive.kind: {self.kind!r}; expected infonce or siglip")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The training loss: a name in ``mllm_jax.train.registry.OBJECTIVES`` or ``"pkg.module:attr"``.

    Built-in names (``objectives/recipes.py``): ``ntp`` (masked next-token loss on the single
    data stream), ``generative``, ``sugar`` (``ntp_weight * L_g + structure_weight * L_d``),
    ``vladva`` (``contrastive_weight * L_con + ntp_weight * L_ntp``), ``contrastive``.
    ``options`` go to custom objectives.
    """
    name: str = "ntp"
    z_loss: float = 0.0
    ntp_weight: float = 1.0                # weight of the next-token loss on the generative stream
    structure_weight: float = 1.0          # Sugar's alpha
    contrastive_weight: float = 1.0
    disc_ntp_weight: float = 0.0           # next-token loss on the discriminative stream's documents
    structure: StructureConfig = dataclasses.field(default_factory=StructureConfig)
    contrastive: ContrastiveConfig = dataclasses.field(default_factory=ContrastiveConfig)
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optax optimiser, schedule, clipping, accumulation, freeze and weight-decay masks.

    A parameter trains iff its dotted path (``decoder.layers.0.self_attn.q_proj.lora.a``)
    matches one of ``trainable`` (``re.search``) and none of ``frozen``.
    """
    name: str = "adamw"                    # adamw | sgd | adafactor
    lr: float = 1e-3
    schedule: str = "cosine"               # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0              # alternative to warmup_steps: fraction of train.steps
    min_lr_ratio: float = 0.0              # final lr = lr * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.9                  # sgd
    nesterov: bool = False                 # sgd
    clip_norm: float = 1.0                 # global-norm clipping; 0 disables
    grad_accum: int = 1                    # micro-batches per step (scanned inside the step; token-weighted NTP)
    trainable: tuple[str, ...] = (".*",)
    frozen: tuple[str, ...] = ()
    no_decay: tuple[str, ...] = (r"(bias|scale)$",)  # params matching these get no weight decay

    def __post_init__(self):
        if self.name not in ("adamw", "sgd", "adafactor"):
            raise ConfigError(f"train.optim.name: {self.name!r}; expected adamw, sgd or adafactor")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"train.optim.schedule: {self.schedule!r}; expected cosine, linear or constant")
        if self.grad_accum < 1:
            raise ConfigError(f"train.optim.grad_accum: {self.grad_accum}; must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.optim.warmup_ratio: {self.warmup_ratio}; must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing: cadence, retention (last N and best N by a metric), async save."""
    dir: Optional[str] = None              # default: <train.run_dir>/checkpoints
    every_steps: int = 1000                # 0: only at the end (and on SIGTERM/SIGINT)
    keep_last: int = 3
    keep_best: int = 0                     # also keep the best N by best_metric (0: off)
    best_metric: str = "eval/loss"
    best_mode: str = "min"                 # min | max
    async_save: bool = True
    restore_data: bool = True              # false: resume params/optimiser/step, data from its start

    def __post_init__(self):
        if self.best_mode not in ("min", "max"):
            raise ConfigError(f"train.checkpoint.best_mode: {self.best_mode!r}; expected min or max")
        if self.keep_last < 1:
            raise ConfigError(f"train.checkpoint.keep_last: {self.keep_last}; keep at least 1")
        check_local_path("train.checkpoint.dir", self.dir)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    seed: int = 0
    compute_dtype: Optional[str] = None    # float32 | bfloat16; overrides the model dtypes (params stay float32)
    run_dir: str = "runs/default"          # metrics.jsonl, TensorBoard events, config.yaml, checkpoints/
    log_every: int = 10                    # 0: only the last step
    eval_every: int = 0                    # 0: no periodic eval
    eval_steps: int = 10
    max_bad_steps: int = 10                # stop after this many non-finite steps in a row
    tensorboard: bool = True
    progress: bool = True
    peak_flops: Optional[float] = None     # per-device peak for MFU; default from the device table
    xla_options: Optional[dict] = None     # jax.jit compiler_options of the train / eval steps; None:
                                           # automatic (train.loop.step_compiler_options), {}: XLA's defaults
    init_from: Optional[str] = None        # run dir or checkpoint dir whose params start this run
    init_fresh: tuple[str, ...] = ()       # regexes: params that keep their fresh init instead (and
                                           # the checkpoint's params they match are dropped), e.g.
                                           # ['^projector\.'] for a new adapter between a ViT and an LLM
    init_parts: dict = dataclasses.field(default_factory=dict)
                                           # {part: dir}: the params under `<part>.` start from that
                                           # checkpoint (of the part alone, e.g. a converted CLIP
                                           # tower for vision, or of a model that has it), after init_from
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def __post_init__(self):
        if self.steps < 0:
            raise ConfigError(f"train.steps: {self.steps}; must be >= 0")
        if self.compute_dtype not in (None, "float32", "bfloat16"):
            raise ConfigError(f"train.compute_dtype: {self.compute_dtype!r}; expected float32 or bfloat16")
        if self.max_bad_steps < 1:
            raise ConfigError(f"train.max_bad_steps: {self.max_bad_steps}; must be >= 1")
        check_local_path("train.run_dir", self.run_dir)
        check_local_path("train.init_from", self.init_from)
        for part, path in self.init_parts.items():
            if not isinstance(part, str) or not re.fullmatch(r"[^.]+(\.[^.]+)*", part):
                raise ConfigError(f"train.init_parts: {part!r} is not a part of the model (a top-level "
                                  "module such as vision or decoder, or a dotted path below one)")
            if not isinstance(path, str) or not path:
                raise ConfigError(f"train.init_parts.{part}: expected a checkpoint or run dir, got {path!r}")
            check_local_path(f"train.init_parts.{part}", path)
        for r in self.init_fresh:
            try:
                re.compile(r)
            except re.error as e:
                raise ConfigError(f"train.init_fresh: {r!r} is not a regular expression: {e}") from None


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage of a multi-stage recipe: dotted-key updates applied to the experiment config
    (e.g. ``{"train.optim.trainable": ["^projector\\."], "data.source": "llava"}``); the
    stage starts from the previous stage's final checkpoint unless ``init_from_previous`` is off."""
    name: str
    updates: dict = dataclasses.field(default_factory=dict)
    init_from_previous: bool = True


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs; written resolved to ``<run_dir>/config.yaml``.

    ``model_name`` and ``data_pipeline`` are keys of ``mllm_jax.train.registry`` or
    ``"pkg.module:attr"`` import paths (a custom model or pipeline plugs in as a config change);
    ``data_options`` go to a custom pipeline. ``eval_data`` defaults to ``data`` on the ``val``
    split, unshuffled. ``data.batch_size`` is per process.
    """
    name: str = "experiment"
    model_name: str = "mllm"
    model: MLLMConfig = dataclasses.field(default_factory=MLLMConfig)
    data_pipeline: str = "grain"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval_data: Optional[DataConfig] = None
    data_options: dict = dataclasses.field(default_factory=dict)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    stages: tuple[StageConfig, ...] = ()
    # several data streams (each step: one batch per stream); empty = the single stream `data`
    streams: tuple[StreamConfig, ...] = ()

    def __post_init__(self):
        names = [s.name for s in self.streams]
        if len(set(names)) != len(names):
            raise ConfigError(f"streams: names must be unique (each step's batch is keyed by them), got {names}")

    def resolved(self) -> "ExperimentConfig":
        """Applies ``train.compute_dtype`` to every model part's ``dtype`` (the mixed-precision
        policy: params float32, compute in this dtype)."""
        dt = self.train.compute_dtype
        if dt is None:
            return self
        m = self.model
        model = dataclasses.replace(m, decoder=dataclasses.replace(m.decoder, dtype=dt),
                                    vision=dataclasses.replace(m.vision, dtype=dt))
        return dataclasses.replace(self, model=model)


__all__ = ["MeshConfig", "StructureConfig", "ContrastiveConfig", "ObjectiveConfig", "OptimConfig",
           "CheckpointConfig", "TrainConfig", "StageConfig", "ExperimentConfig"]
