"""Model configs (``mllm_jax/models/``) and their Hugging Face ``config.json`` round-trip
(``from_hf``/``to_hf``; see ``mllm_jax/convert/hf.py``)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from mllm_jax.config.base import HASH_OMIT_DEFAULT, ConfigError

# VisionConfig.resample: the PIL filter names and codes (the ``resample`` of transformers' processors)
RESAMPLE_CODES = {"bilinear": 2, "bicubic": 3}


def _freeze(v):
    """A hashable stand-in for a config value (dicts and lists become sorted tuples)."""
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


_HF_ACT_ALIASES = {"gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh"}

# transformers' LlamaConfig / Qwen2Config defaults for the keys ``DecoderConfig.from_hf`` reads that
# a config dict may leave out: transformers 4.x saved a LLaVA's nested text_config as a diff
# against them (llava-hf/llava-1.5-7b-hf's lists only vocab_size, max_position_embeddings and
# rms_norm_eps), and transformers fills them in on load.
_HF_DECODER_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768),
}


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
    eos_token_id: Optional[int | tuple[int, ...]] = None  # a tuple: several stop ids (HF list)
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
        hf = {**_HF_DECODER_DEFAULTS[mt], **hf}
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
        if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
            raise ConfigError(f"{mt} config: sliding-window attention (use_sliding_window / layer_types) "
                              "is not supported (full attention only)")
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * hf["num_attention_heads"] == hf["hidden_size"]:
            head_dim = None  # the default; keep configs canonical
        eos = hf.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            eos = (None if not eos else eos[0] if len(eos) == 1 else tuple(int(e) for e in eos))
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
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.family == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        elif not self.attention_bias or self.mlp_bias:
            raise ConfigError("qwen2 in HF always has qkv bias and no MLP bias; use family='llama' otherwise")
        return d


IMAGENET_MEAN = (0.485, 0.456, 0.406)        # DINOv2's preprocessor_config.json (and timm's ImageNet)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dinov2_swiglu_hidden(hidden_size: int, mlp_ratio: int) -> int:
    """transformers' ``Dinov2SwiGLUFFN`` width: two thirds of ``hidden_size * mlp_ratio``,
    rounded up to a multiple of 8 (DINOv2-giant: 1536 * 4 -> 4096)."""
    return (int(int(hidden_size * mlp_ratio) * 2 / 3) + 7) // 8 * 8


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """ViT in the CLIP (class token, pre-LN, quick-gelu), SigLIP (no class token) or DINOv2
    (class token, LayerScale, final LayerNorm, position table interpolated) variant.

    ``image_size`` is the side images are brought to (``data.pipeline.ImageSpec``) and fed at.
    For DINOv2 it comes from the folder's ``preprocessor_config.json`` (224 for the released
    checkpoints), and ``position_image_size`` is the side the position table was trained for
    (HF ``config.image_size``, 518 for them) when it differs: the tower then resizes the table
    bicubically, as transformers' ``Dinov2Embeddings.interpolate_pos_encoding`` does.

    ``resize_shortest_edge`` and ``resample`` say how ``ImageSpec`` brings an image to
    ``image_size``. ``None`` (the default; the towers of configs written by hand, SigLIP's): the
    whole image is stretched to ``image_size x image_size``. An int ``n``: the shorter edge is resized to ``n`` keeping the
    aspect ratio, and the central ``image_size x image_size`` is cropped, as transformers'
    ``CLIPImageProcessor`` / ``BitImageProcessor`` do with ``size={"shortest_edge": n}`` and
    ``crop_size=image_size`` (the converters fill both from a ``preprocessor_config.json``).
    ``resample`` is the PIL filter of that resize ("bilinear" or "bicubic"; PIL codes 2 and 3).
    Both are left out of ``config_hash`` while they hold their defaults, so the hashes (and the
    caches keyed by them) of configs that do not set them are those they had before the fields.
    """
    variant: str = "clip"                  # clip | siglip | dinov2
    image_size: int = 32
    patch_size: int = 4
    num_channels: int = 3
    hidden_size: int = 64
    intermediate_size: int = 128           # MLP width (DINOv2 SwiGLU: the width of each of its two halves)
    num_layers: int = 2
    num_heads: int = 4
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    use_head: bool = False                 # SigLIP attention-pooling head
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    position_image_size: Optional[int] = None  # DINOv2: the position table's image side, if not image_size
    layerscale_value: float = 1.0          # DINOv2: LayerScale's initial value (HF layerscale_value)
    use_swiglu_ffn: bool = False           # DINOv2-giant: SwiGLU MLP (HF use_swiglu_ffn)
    # ImageSpec: None = stretch to image_size; n = shorter edge to n, then the central image_size crop
    resize_shortest_edge: Optional[int] = dataclasses.field(default=None, metadata=HASH_OMIT_DEFAULT)
    resample: str = dataclasses.field(default="bilinear", metadata=HASH_OMIT_DEFAULT)   # bilinear | bicubic
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.variant not in ("clip", "siglip", "dinov2"):
            raise ConfigError(f"vision.variant: {self.variant!r}; expected 'clip', 'siglip' or 'dinov2'")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision: num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision: patch_size={self.patch_size} does not divide image_size={self.image_size}")
        if self.variant != "dinov2" and (self.position_image_size is not None or self.use_swiglu_ffn):
            raise ConfigError(f"vision: position_image_size and use_swiglu_ffn are DINOv2 options "
                              f"(variant is {self.variant!r})")
        if self.resample not in RESAMPLE_CODES:
            raise ConfigError(f"vision.resample: {self.resample!r}; expected one of {sorted(RESAMPLE_CODES)} "
                              "(the PIL filter images are resized with)")
        if self.resize_shortest_edge is not None and (
                isinstance(self.resize_shortest_edge, bool) or not isinstance(self.resize_shortest_edge, int)
                or self.resize_shortest_edge < 1):
            raise ConfigError(f"vision.resize_shortest_edge: {self.resize_shortest_edge!r}; expected a positive int "
                              "(the side the shorter image edge is resized to before the central image_size crop) "
                              "or null (stretch the whole image to image_size)")
        if self.position_image_size is not None and self.position_image_size % self.patch_size:
            raise ConfigError(f"vision: patch_size={self.patch_size} does not divide "
                              f"position_image_size={self.position_image_size}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def has_class_token(self) -> bool:
        return self.variant in ("clip", "dinov2")

    @property
    def position_grid_size(self) -> int:
        """Side of the patch grid of the position table (DINOv2: ``position_image_size``)."""
        return (self.position_image_size or self.image_size) // self.patch_size

    @classmethod
    def from_hf(cls, hf: dict, **kw) -> "VisionConfig":
        """From a ``clip_vision_model`` / ``siglip_vision_model`` / ``dinov2`` config dict.

        Keys absent from the dict take transformers' defaults for that model type (nested
        ``vision_config`` dicts, e.g. inside a LLaVA config, only list non-default values).
        A DINOv2 config gives ``image_size`` = its (position table's) image size; the DINOv2
        converter then reads the folder's ``preprocessor_config.json`` (``image_size``, mean, std).
        """
        mt = hf.get("model_type", "clip_vision_model")
        if mt == "dinov2_with_registers":
            raise ConfigError(f"vision config: model_type 'dinov2_with_registers' (DINOv2 with "
                              f"num_register_tokens={hf.get('num_register_tokens', 4)} register tokens) is not "
                              "supported; only 'dinov2' (Dinov2Model) is")
        if mt not in ("clip_vision_model", "siglip_vision_model", "dinov2"):
            raise ConfigError(f"vision config: model_type {mt!r} is not supported "
                              "(clip_vision_model, siglip_vision_model, dinov2)")
        variant = {"clip_vision_model": "clip", "siglip_vision_model": "siglip", "dinov2": "dinov2"}[mt]
        # transformers 5.x CLIPVisionConfig / SiglipVisionConfig / Dinov2Config defaults
        dflt = dict(image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
        extra = {}
        if variant == "siglip":
            dflt = dict(image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
            extra = dict(use_head=bool(hf.get("vision_use_head", True)),
                         image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
        elif variant == "dinov2":
            dflt = dict(image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6)
            extra = _dinov2_from_hf(hf)

        def square(key):
            v = hf.get(key, dflt[key])
            if isinstance(v, (list, tuple)):
                if len(set(v)) != 1:
                    raise ConfigError(f"vision config: {key}={v} is not square; only square sizes are supported")
                v = v[0]
            return int(v)

        act = hf.get("hidden_act", dflt["hidden_act"])
        return cls(**{**dict(
            variant=variant, image_size=square("image_size"), patch_size=square("patch_size"),
            num_channels=hf.get("num_channels", 3), hidden_size=hf.get("hidden_size", 768),
            intermediate_size=hf.get("intermediate_size", 3072),
            num_layers=hf.get("num_hidden_layers", 12), num_heads=hf.get("num_attention_heads", 12),
            hidden_act=_HF_ACT_ALIASES.get(act, act),
            layer_norm_eps=float(hf.get("layer_norm_eps") or dflt["layer_norm_eps"])), **extra, **kw})

    def to_hf(self) -> dict:
        model_type = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", "dinov2": "dinov2"}[self.variant]
        d = {
            "model_type": model_type,
            "image_size": self.image_size, "patch_size": self.patch_size,
            "num_channels": self.num_channels, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
        }
        if self.variant == "siglip":
            d["vision_use_head"] = self.use_head
        if self.variant == "dinov2":   # Dinov2Config has no intermediate_size: mlp_ratio (an int) gives it
            del d["intermediate_size"]
            d.update(image_size=self.position_image_size or self.image_size, mlp_ratio=_dinov2_mlp_ratio(self),
                     layerscale_value=self.layerscale_value, use_swiglu_ffn=self.use_swiglu_ffn, qkv_bias=True,
                     use_mask_token=False)   # the mask token (masked-image pretraining only) is not kept
        return d


def _dinov2_from_hf(hf: dict) -> dict:
    """The DINOv2-only fields of ``VisionConfig.from_hf``; refuses what the tower cannot run."""
    if not hf.get("qkv_bias", True):
        raise ConfigError("dinov2 config: qkv_bias=false is not supported (every released DINOv2 has q/k/v biases)")
    hidden, ratio = hf.get("hidden_size", 768), hf.get("mlp_ratio", 4)
    swiglu = bool(hf.get("use_swiglu_ffn", False))
    width = dinov2_swiglu_hidden(hidden, ratio) if swiglu else int(hidden * ratio)
    return dict(intermediate_size=width, use_swiglu_ffn=swiglu,
                layerscale_value=float(hf.get("layerscale_value", 1.0)),
                image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def _dinov2_mlp_ratio(cfg: "VisionConfig") -> int:
    """The integer ``mlp_ratio`` (Dinov2Config types it ``int``) that gives ``intermediate_size``."""
    for r in range(1, 65):
        width = dinov2_swiglu_hidden(cfg.hidden_size, r) if cfg.use_swiglu_ffn else cfg.hidden_size * r
        if width == cfg.intermediate_size:
            return r
    raise ConfigError(f"vision: intermediate_size={cfg.intermediate_size} is not what Dinov2Config gives for "
                      f"hidden_size={cfg.hidden_size}, use_swiglu_ffn={cfg.use_swiglu_ffn} and any integer "
                      "mlp_ratio; it cannot be exported as a Dinov2Model")


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

    def __post_init__(self):
        if self.vision.variant == "dinov2":
            raise ConfigError("model.vision.variant: 'dinov2' towers serve as teachers "
                              "(data.teacher_models.vision), not as the MLLM's vision tower; use 'clip' or 'siglip'")
        n = self.vision.num_layers      # hidden states 0 (the embeddings) .. n, or -1 .. -(n + 1)
        if not -(n + 1) <= self.vision_feature_layer <= n:
            raise ConfigError(f"model.vision_feature_layer: {self.vision_feature_layer}; the vision tower has "
                              f"{n} layers, so hidden states {-(n + 1)}..{n}")
        if self.vision_feature_select not in ("default", "full"):
            raise ConfigError(f"model.vision_feature_select: {self.vision_feature_select!r}; expected 'default' "
                              "(drop the CLS token) or 'full' (HF's vision_feature_select_strategy)")

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
        vision = VisionConfig.from_hf(hf["vision_config"])
        select = hf.get("vision_feature_select_strategy", "default")
        if select == "default" and vision.variant == "siglip":
            raise ConfigError(
                "mllm config: vision_feature_select_strategy 'default' with a SigLIP tower: transformers "
                "then drops the first patch token (SigLIP has no CLS token), which this model does not do; "
                "only 'full' (every patch) is supported with SigLIP")
        return cls(
            vision=vision,
            projector=ProjectorConfig(kind="mlp", hidden_act=hf.get("projector_hidden_act", "gelu"),
                                      bias=bool(hf.get("multimodal_projector_bias", True))),
            # transformers ties the LM head when either the top-level or the text config says so
            decoder=DecoderConfig.from_hf({**hf["text_config"], "tie_word_embeddings": bool(
                hf.get("tie_word_embeddings") or hf["text_config"].get("tie_word_embeddings"))}),
            image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)),
            vision_feature_layer=fl,
            vision_feature_select=select,
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
            # transformers' "default" drops hidden state 0 whatever it is; ours drops only a CLS
            # token, so a SigLIP tower (none) keeps every patch: transformers' "full"
            "vision_feature_select_strategy": "full" if self.vision.variant == "siglip" else self.vision_feature_select,
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
    "DecoderConfig", "VisionConfig", "TextEncoderConfig", "ProjectorConfig", "LoRAConfig",
    "MLLMConfig", "dtype_of",
]
