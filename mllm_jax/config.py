"""Frozen dataclass configs: YAML files, ``key=value`` overrides, Hugging Face round-trip.

Every config in the project is a frozen dataclass built from plain Python values, so that a
resolved config can be written next to a run's checkpoints and read back exactly.

    cfg = load_config("experiments/configs/tiny.yaml", ExperimentConfig,
                      overrides=["model.decoder.num_layers=4", "train.lr=3e-4"])

Model configs also map to and from Hugging Face ``config.json`` dicts (``from_hf``/``to_hf``),
so weights can move both ways (see ``mllm_jax/convert/hf.py``).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted path."""


# ----------------------------------------------------------------------------------------------
# Generic machinery
# ----------------------------------------------------------------------------------------------

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Converts a YAML/JSON value to the annotated type ``tp`` (recursively)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} matches none of {tp}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, d: dict, path: str = ""):
    """Builds dataclass ``cls`` from a nested dict; unknown keys are an error naming the path."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in d if k not in names]
    if unknown:
        k = unknown[0]
        near = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {sorted(names)}"
        raise ConfigError(f"{_join(path, k)}: unknown key for {cls.__name__}{hint}")
    kwargs = {k: _coerce(v, hints[k], _join(path, k)) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def to_dict(cfg) -> dict:
    """Nested plain dict (tuples become lists) suitable for YAML/JSON."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def apply_overrides(cfg, overrides: list[str] | tuple[str, ...]):
    """Applies ``a.b.c=value`` overrides (values parsed as YAML) to a frozen config."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        cfg = _replace_path(cfg, key.strip().split("."), value, key.strip())
    return cfg


def _replace_path(cfg, keys: list[str], value, full: str):
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"override {full}: {keys[0]!r} is below a non-config value")
    names = {f.name for f in dataclasses.fields(cfg)}
    k = keys[0]
    if k not in names:
        near = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"override {full}: unknown key {k!r} in {type(cfg).__name__}{hint}")
    tp = _hints(type(cfg))[k]
    if len(keys) == 1:
        new = _coerce(value, tp, full)
    else:
        new = _replace_path(getattr(cfg, k), keys[1:], value, full)
    try:
        return dataclasses.replace(cfg, **{k: new})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"override {full}: {e}") from e


def load_config(path: str | Path, cls, overrides=()):
    """Reads a YAML file into ``cls`` and applies overrides; errors name the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    try:
        cfg = from_dict(cls, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    return apply_overrides(cfg, list(overrides))


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash(cfg) -> str:
    """A stable short hash of a config (for caches keyed by configuration)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Model configs
# ----------------------------------------------------------------------------------------------

def _freeze(v):
    """A hashable stand-in for a config value (dicts and lists become sorted tuples)."""
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


_HF_ACT_ALIASES = {"gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh"}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Llama / Qwen2-family decoder. Field names follow HF where they map one to one."""
    family: str = "llama"                 # llama | qwen2 (qwen2 implies attention_bias=True in HF)
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None         # default hidden_size // num_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None    # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    max_position_embeddings: int = 2048
    attention_bias: bool = False           # bias on q, k, v (Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    dtype: str = "float32"                 # compute dtype; params stay float32
    remat: bool = False                    # rematerialise each block in the backward pass

    def __post_init__(self):
        if self.family not in ("llama", "qwen2"):
            raise ConfigError(f"decoder.family: {self.family!r}; expected 'llama' or 'qwen2'")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"decoder: num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}; "
                "set head_dim explicitly or change one of them")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"decoder: num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} (GQA groups)")

    def __hash__(self):  # the dict field would make the generated hash fail (jit/nnx hash graphdefs)
        return hash(tuple((f.name, _freeze(getattr(self, f.name))) for f in dataclasses.fields(self)))

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict, **kw) -> "DecoderConfig":
        mt = hf.get("model_type", "llama")
        if mt not in ("llama", "qwen2"):
            raise ConfigError(f"decoder config: model_type {mt!r} is not supported (llama, qwen2)")
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        legacy = hf.get("rope_scaling")
        if legacy and not rope:
            rope = dict(legacy)
        rtype = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rtype not in ("default", None):
            if rtype not in ("llama3", "linear"):
                raise ConfigError(f"decoder config: rope_type {rtype!r} is not supported (default, linear, llama3)")
            scaling = {k: v for k, v in rope.items() if k != "type"}
            scaling["rope_type"] = rtype
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * hf["num_attention_heads"] == hf["hidden_size"]:
            head_dim = None  # the default; keep configs canonical
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            family=mt,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=head_dim,
            hidden_act=hf.get("hidden_act", "silu"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            attention_bias=bool(hf.get("attention_bias", mt == "qwen2")),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
            **kw,
        )

    def to_hf(self) -> dict:
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        d = {
            "model_type": self.family,
            "architectures": ["LlamaForCausalLM" if self.family == "llama" else "Qwen2ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.resolved_head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.family == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        elif not self.attention_bias or self.mlp_bias:
            raise ConfigError("qwen2 in HF always has qkv bias and no MLP bias; use family='llama' otherwise")
        return d


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """ViT in the CLIP (class token, pre-LN, quick-gelu) or SigLIP (no class token) variant."""
    variant: str = "clip"                  # clip | siglip
    image_size: int = 32
    patch_size: int = 4
    num_channels: int = 3
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    use_head: bool = False                 # SigLIP attention-pooling head
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.variant not in ("clip", "siglip"):
            raise ConfigError(f"vision.variant: {self.variant!r}; expected 'clip' or 'siglip'")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision: num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision: patch_size={self.patch_size} does not divide image_size={self.image_size}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @classmethod
    def from_hf(cls, hf: dict, **kw) -> "VisionConfig":
        """From a ``clip_vision_model`` / ``siglip_vision_model`` config dict.

        Keys absent from the dict take transformers' defaults for that model type (nested
        ``vision_config`` dicts, e.g. inside a LLaVA config, only list non-default values).
        """
        mt = hf.get("model_type", "clip_vision_model")
        if mt not in ("clip_vision_model", "siglip_vision_model"):
            raise ConfigError(f"vision config: model_type {mt!r} is not supported "
                              "(clip_vision_model, siglip_vision_model)")
        variant = "clip" if mt.startswith("clip") else "siglip"
        # transformers 5.x CLIPVisionConfig / SiglipVisionConfig defaults
        dflt = dict(image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
        extra = {}
        if variant == "siglip":
            dflt = dict(image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
            extra = dict(use_head=bool(hf.get("vision_use_head", True)),
                         image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))

        def square(key):
            v = hf.get(key, dflt[key])
            if isinstance(v, (list, tuple)):
                if len(set(v)) != 1:
                    raise ConfigError(f"vision config: {key}={v} is not square; only square sizes are supported")
                v = v[0]
            return int(v)

        act = hf.get("hidden_act", dflt["hidden_act"])
        return cls(
            variant=variant, image_size=square("image_size"), patch_size=square("patch_size"),
            num_channels=hf.get("num_channels", 3), hidden_size=hf.get("hidden_size", 768),
            intermediate_size=hf.get("intermediate_size", 3072),
            num_layers=hf.get("num_hidden_layers", 12), num_heads=hf.get("num_attention_heads", 12),
            hidden_act=_HF_ACT_ALIASES.get(act, act),
            layer_norm_eps=float(hf.get("layer_norm_eps") or dflt["layer_norm_eps"]), **{**extra, **kw})

    def to_hf(self) -> dict:
        d = {
            "model_type": "clip_vision_model" if self.variant == "clip" else "siglip_vision_model",
            "image_size": self.image_size, "patch_size": self.patch_size,
            "num_channels": self.num_channels, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
        }
        if self.variant == "siglip":
            d["vision_use_head"] = self.use_head
        return d


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """BERT-family encoder (the MiniLM teacher)."""
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    add_pooler: bool = False               # HF BertModel's tanh pooler over [CLS]
    dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"text_encoder: num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}")

    @classmethod
    def from_hf(cls, hf: dict, **kw) -> "TextEncoderConfig":
        """From a ``bert`` config dict; absent keys take transformers' BertConfig defaults."""
        if hf.get("model_type", "bert") != "bert":
            raise ConfigError(f"text encoder config: model_type {hf.get('model_type')!r} is not supported (bert)")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ConfigError("text encoder config: a decoder / cross-attention BERT is not supported "
                              "(is_decoder and add_cross_attention must be false)")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ConfigError(f"text encoder config: position_embedding_type {pos!r} is not supported (absolute)")
        act = hf.get("hidden_act", "gelu")
        pad = hf.get("pad_token_id", 0)
        return cls(
            vocab_size=hf.get("vocab_size", 30522), hidden_size=hf.get("hidden_size", 768),
            intermediate_size=hf.get("intermediate_size", 3072),
            num_layers=hf.get("num_hidden_layers", 12), num_heads=hf.get("num_attention_heads", 12),
            hidden_act=_HF_ACT_ALIASES.get(act, act),
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)), pad_token_id=0 if pad is None else pad,
            **kw)

    def to_hf(self) -> dict:
        return {
            "model_type": "bert", "architectures": ["BertModel"], "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "hidden_act": self.hidden_act, "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size, "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
        }


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Vision→LLM projector: LLaVA's 2-layer MLP, or InfMLLM's pool-adapter."""
    kind: str = "mlp"                      # mlp | pool
    hidden_act: str = "gelu"
    bias: bool = True
    pool_size: int = 2                     # pool-adapter: P, output tokens = P*P
    layer_norm: bool = True                # pool-adapter: LayerNorm over ViT features first

    def __post_init__(self):
        if self.kind not in ("mlp", "pool"):
            raise ConfigError(f"projector.kind: {self.kind!r}; expected 'mlp' or 'pool'")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA on linear layers whose module path matches ``target`` (a regex, ``re.search``)."""
    rank: int = 0                          # 0 disables LoRA
    alpha: float = 16.0
    dropout: float = 0.0
    target: str = r"decoder\..*(q_proj|v_proj)$"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    """Vision tower → projector → decoder LLM over interleaved sequences."""
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    image_token_id: int = 3                # id of the <image> placeholder in the text vocabulary
    vision_feature_layer: int = -2         # LLaVA: which ViT hidden state feeds the projector
    vision_feature_select: str = "default" # default (drop CLS when present) | full
    num_soft_prompts: int = 0              # learned soft-prompt vectors (VladVA)
    soft_prompt_token_id: int = 6          # the tokenizer's <soft> id; the j-th such token takes soft prompt j % num
    embed_head: bool = False               # Sugar: an MLP head on slice embeddings (D -> D -> D)
    contrastive_temperature: Optional[float] = None  # creates learned logit_scale (+ logit_bias) params
    contrastive_bias: float = -10.0        # initial logit_bias (SigLIP)

    @property
    def tokens_per_image(self) -> int:
        if self.projector.kind == "pool":
            return self.projector.pool_size ** 2
        n = self.vision.num_patches
        if self.vision.variant == "clip" and self.vision_feature_select == "full":
            n += 1
        return n

    @classmethod
    def from_hf(cls, hf: dict, **kw) -> "MLLMConfig":
        if hf.get("model_type") != "llava":
            raise ConfigError(f"mllm config: model_type {hf.get('model_type')!r} is not supported (llava)")
        fl = hf.get("vision_feature_layer", -2)
        if isinstance(fl, list):
            raise ConfigError("mllm config: a list vision_feature_layer is not supported")
        return cls(
            vision=VisionConfig.from_hf(hf["vision_config"]),
            projector=ProjectorConfig(kind="mlp", hidden_act=hf.get("projector_hidden_act", "gelu"),
                                      bias=bool(hf.get("multimodal_projector_bias", True))),
            decoder=DecoderConfig.from_hf(hf["text_config"]),
            image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)),
            vision_feature_layer=fl,
            vision_feature_select=hf.get("vision_feature_select_strategy", "default"),
            **kw)

    def to_hf(self) -> dict:
        if self.projector.kind != "mlp":
            raise ConfigError("LLaVA export needs projector.kind='mlp' (HF has no pool-adapter)")
        return {
            "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
            "vision_config": self.vision.to_hf(), "text_config": self.decoder.to_hf(),
            "image_token_index": self.image_token_id, "image_seq_length": self.tokens_per_image,
            "projector_hidden_act": self.projector.hidden_act,
            "multimodal_projector_bias": self.projector.bias,
            "vision_feature_select_strategy": self.vision_feature_select,
            "vision_feature_layer": self.vision_feature_layer,
            "tie_word_embeddings": self.decoder.tie_word_embeddings,
        }


def dtype_of(name: str):
    """Maps a dtype name from a config to a jnp dtype."""
    import jax.numpy as jnp
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
                "float64": jnp.float64}[name]
    except KeyError:
        raise ConfigError(f"dtype {name!r}: expected float32, bfloat16, float16 or float64") from None


__all__ = [
    "ConfigError", "from_dict", "to_dict", "apply_overrides", "load_config", "save_config",
    "config_hash", "DecoderConfig", "VisionConfig", "TextEncoderConfig", "ProjectorConfig",
    "LoRAConfig", "MLLMConfig", "dtype_of",
]


# ----------------------------------------------------------------------------------------------
# Data configs (mllm_jax/data/)
# ----------------------------------------------------------------------------------------------

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
    seed: int = 0
    num_epochs: Optional[int] = None       # None: repeat forever
    drop_remainder: bool = True            # False: the last batch of an epoch is padded with empty rows
    worker_count: int = 0                  # grain worker processes (0: in the main process)
    worker_buffer_size: int = 2
    shard_by_process: bool = True          # each jax process reads a disjoint 1/process_count
    bad_input: str = "skip"                # error | skip
    max_skip_fraction: float = 0.01        # more skipped than this (per epoch) is an error
    doc_loss: bool = True                  # plain documents: next-token loss on their text
    teachers: tuple[str, ...] = ()         # per-slice teacher features: scene_graph | pixel | minilm | vision
    soft_prompts: int = 0                  # summary prompts as this many <soft> slots (VladVA) instead of text
    teacher_cache: Optional[str] = None    # folder of tensorstore caches (one per teacher)

    def __post_init__(self):
        if self.bad_input not in ("error", "skip"):
            raise ConfigError(f"data.bad_input: {self.bad_input!r}; expected 'error' or 'skip'")
        if not self.seq_buckets or list(self.seq_buckets) != sorted(set(self.seq_buckets)):
            raise ConfigError(f"data.seq_buckets: {self.seq_buckets}; expected increasing lengths")
        if self.batch_size < 1 or self.max_images < 0 or self.max_slices < 1:
            raise ConfigError("data: batch_size and max_slices must be >= 1, max_images >= 0")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ConfigError(f"data.max_skip_fraction: {self.max_skip_fraction}; expected 0..1")

    def task_weights(self) -> dict[str, int]:
        out = {}
        for item in self.tasks:
            name, _, w = item.partition(":")
            try:
                out[name.strip()] = int(w) if w else 1
            except ValueError:
                raise ConfigError(f"data.tasks: {item!r}; expected 'name:integer_weight'") from None
        return out


__all__ += ["SceneConfig", "DataConfig"]


# ----------------------------------------------------------------------------------------------
# Experiment and training configs (mllm_jax/train/)
# ----------------------------------------------------------------------------------------------

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
class StreamConfig:
    """One named data stream of a multi-stream recipe: every train step draws one batch from
    each stream and the loss receives ``{name: batch}`` (e.g. Sugar: ``gen`` + ``disc``)."""
    name: str = "gen"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)


@dataclasses.dataclass(frozen=True)
class StructureConfig:
    """Sugar's structure-induced loss (``objectives/structure.py``); all [R] choices, METHODS.md §1."""
    alignment: str = "gak"                 # gak | softdtw | pooled (the "w/o GAK" ablation)
    sigma: float = 1.0                     # GAK bandwidth on unit-norm slice embeddings
    gamma: float = 0.1                     # soft-DTW smoothing
    softdtw_scale: float = 1.0             # S = exp(-divergence / scale) for soft-DTW
    target_sigma: float = 1.0              # GAK bandwidth of the triple kernel (unit-norm teacher features)
    image_teacher: str = "pixel"           # batch key teacher_<name> for image-image slice pairs
    text_teacher: str = "minilm"           # ... text-text pairs
    shared_teacher: str = "scene_graph"    # ... image-text pairs (a space both modalities live in)
    layer: int = -1                        # hidden layer of the slice embeddings (-1 = last, normed)

    def __post_init__(self):
        if self.alignment not in ("gak", "softdtw", "pooled"):
            raise ConfigError(f"objective.structure.alignment: {self.alignment!r}; expected gak, softdtw or pooled")


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    """Contrastive loss of the VladVA recipe (``objectives/contrastive.py``)."""
    kind: str = "infonce"                  # infonce | siglip
    init_temperature: float = 0.05         # E5-V uses 0.05, VLM2Vec 0.02 [P]
    learn_temperature: bool = True
    init_bias: float = -10.0               # siglip
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
    grad_accum: int = 1                    # micro-batches per step (scanned inside the step)
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

    def __post_init__(self):
        if self.best_mode not in ("min", "max"):
            raise ConfigError(f"train.checkpoint.best_mode: {self.best_mode!r}; expected min or max")
        if self.keep_last < 1:
            raise ConfigError(f"train.checkpoint.keep_last: {self.keep_last}; keep at least 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    seed: int = 0
    compute_dtype: Optional[str] = None    # float32 | bfloat16; overrides the model dtypes (params stay float32)
    run_dir: str = "runs/default"          # metrics.jsonl, TensorBoard events, config.yaml, checkpoints/
    log_every: int = 10
    eval_every: int = 0                    # 0: no periodic eval
    eval_steps: int = 10
    max_bad_steps: int = 10                # stop after this many non-finite steps in a row
    tensorboard: bool = True
    progress: bool = True
    peak_flops: Optional[float] = None     # per-device peak for MFU; default from the device table
    init_from: Optional[str] = None        # run dir or checkpoint dir whose params start this run
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def __post_init__(self):
        if self.steps < 0:
            raise ConfigError(f"train.steps: {self.steps}; must be >= 0")
        if self.compute_dtype not in (None, "float32", "bfloat16"):
            raise ConfigError(f"train.compute_dtype: {self.compute_dtype!r}; expected float32 or bfloat16")
        if self.max_bad_steps < 1:
            raise ConfigError(f"train.max_bad_steps: {self.max_bad_steps}; must be >= 1")


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


def apply_updates(cfg, updates: dict):
    """Applies ``{"a.b.c": value}`` (already-parsed values) to a frozen config."""
    for key, value in updates.items():
        cfg = _replace_path(cfg, key.strip().split("."), value, key.strip())
    return cfg


__all__ += ["MeshConfig", "StreamConfig", "StructureConfig", "ContrastiveConfig", "ObjectiveConfig", "OptimConfig", "CheckpointConfig", "TrainConfig", "StageConfig",
            "ExperimentConfig", "apply_updates"]


# ----------------------------------------------------------------------------------------------
# Evaluation configs (mllm_jax/eval/)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """How the evaluation suite turns a sample into something comparable (``eval/embed.py``).

    * ``alignment="none"``: one vector per sample, pooled from layer ``layer`` by ``method``:
      ``mean`` (masked mean over the document's tokens), ``last`` (its last token) or ``prompt``
      (the sample as a user turn followed by the summary prompt, last token: E5-V / VladVA).
      Similarity is the cosine.
    * ``alignment="gak" | "softdtw"``: the sequence of Sugar slice embeddings (one per segment;
      the sample rendered as a document, ``method`` unused); similarity is the normalised global
      alignment kernel (bandwidth ``sigma``) or minus the soft-DTW value (smoothing ``gamma``).
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


__all__ += ["EmbedConfig"]
