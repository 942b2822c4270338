"""Arithmetic over model configs: parameter tables, training FLOPs, device peaks.

FLOPs count what the model computes (multiply-add = 2 FLOPs), forward + backward = 3x forward:

    decoder, per token:  2 * (matmul params incl. lm_head)          (the 2N of "6N")
                       + 4 * T * num_heads * head_dim per layer      (QK^T and PV over all T keys,
                                                                      as the dense masked kernel does)
    vision, per image:   the same per patch token (T = tokens per image) + the patch embedding,
                         over the layers that run: in an MLLM those up to its
                         ``vision_feature_layer`` (LLaVA's -2 skips the last; XLA drops what
                         nothing uses)
    projector:           2 * (in * out) per kernel per image token

so a fully trained decoder costs ``6 * N_matmul * tokens + 12 * L * H * hd * T * tokens`` (PaLM's
count). When part of the model is frozen (LoRA, InfMLLM's stages) the backward pass does less,
and ``train_flops_of`` counts what it does (``mllm_flops_parts``: the model as vision ->
projector -> decoder): every product that the gradient flows back through (those above the
lowest trainable param) costs its forward FLOPs again for the input gradient (twice for the
weightless attention products, whose two inputs both need one), and each trainable weight
``2 * rows * size`` for its gradient. Fully trained, that is 3x forward; a frozen ViT under a
trained projector costs nothing in the backward pass; LoRA on a frozen LLM about 2x forward. Embedding lookups are gathers and cost nothing. The backward of the patch embedding
needs only its weight gradient, yet 3x counts its input gradient too (0.16% of the train_step
benchmark's mllm-tiny step). The parameter tables list every param (dotted path, shape,
logical axes) the way ``models/`` builds them, which lets ``plan`` size a 7B model without
building it and is checked against transformers' own count.
"""
from __future__ import annotations

import os
import re
from typing import NamedTuple, Optional

import numpy as np

from mllm_jax.config import DecoderConfig, MLLMConfig, VisionConfig


class ParamSpec(NamedTuple):
    path: str
    shape: tuple[int, ...]
    axes: tuple[Optional[str], ...]
    units: Optional[tuple] = None   # whole attention heads packed per dim (``layers.mark_units``)


# ---- parameter tables ---------------------------------------------------------------------------

def _dense(prefix: str, din: int, dout: int, axes: tuple[str, str], bias: bool,
           units: Optional[tuple] = None) -> list[ParamSpec]:
    out = [ParamSpec(f"{prefix}.kernel", (din, dout), axes, units)]
    if bias:
        out.append(ParamSpec(f"{prefix}.bias", (dout,), (axes[1],), units and (units[1],)))
    return out


def _norm(prefix: str, dim: int, bias: bool) -> list[ParamSpec]:
    out = [ParamSpec(f"{prefix}.scale", (dim,), ("norm",))]
    if bias:
        out.append(ParamSpec(f"{prefix}.bias", (dim,), ("norm",)))
    return out


def _attention(prefix: str, dim: int, heads: int, kv_heads: int, hd: int, qkv_bias: bool, out_bias: bool):
    return (_dense(f"{prefix}.q_proj", dim, heads * hd, ("embed", "heads"), qkv_bias, (None, heads))
            + _dense(f"{prefix}.k_proj", dim, kv_heads * hd, ("embed", "kv_heads"), qkv_bias, (None, kv_heads))
            + _dense(f"{prefix}.v_proj", dim, kv_heads * hd, ("embed", "kv_heads"), qkv_bias, (None, kv_heads))
            + _dense(f"{prefix}.o_proj", heads * hd, dim, ("heads", "embed"), out_bias, (heads, None)))


def decoder_params(cfg: DecoderConfig, prefix: str = "") -> list[ParamSpec]:
    """Llama / Qwen2 decoder (``models/decoder.py`` names)."""
    d, hd = cfg.hidden_size, cfg.resolved_head_dim
    out = [ParamSpec(f"{prefix}embed_tokens.embedding", (cfg.vocab_size, d), ("vocab", "embed"))]
    for i in range(cfg.num_layers):
        p = f"{prefix}layers.{i}"
        out += _norm(f"{p}.input_layernorm", d, False)
        out += _attention(f"{p}.self_attn", d, cfg.num_heads, cfg.num_kv_heads, hd, cfg.attention_bias, False)
        out += _norm(f"{p}.post_attention_layernorm", d, False)
        for name, din, dout, axes in (("gate_proj", d, cfg.intermediate_size, ("embed", "mlp")),
                                      ("up_proj", d, cfg.intermediate_size, ("embed", "mlp")),
                                      ("down_proj", cfg.intermediate_size, d, ("mlp", "embed"))):
            out += _dense(f"{p}.mlp.{name}", din, dout, axes, cfg.mlp_bias)
    out += _norm(f"{prefix}norm", d, False)
    if not cfg.tie_word_embeddings:
        out += _dense(f"{prefix}lm_head", d, cfg.vocab_size, ("embed", "vocab"), False)
    return out


def vision_params(cfg: VisionConfig, prefix: str = "") -> list[ParamSpec]:
    """CLIP / SigLIP ViT (``models/vision.py`` names)."""
    d, p = cfg.hidden_size, cfg.patch_size
    clip = cfg.variant == "clip"
    n_pos = cfg.num_patches + (1 if clip else 0)
    out = [ParamSpec(f"{prefix}embeddings.patch_embedding.kernel", (p, p, cfg.num_channels, d),
                     ("patch", "patch", "channels", "embed"))]
    if not clip:
        out.append(ParamSpec(f"{prefix}embeddings.patch_embedding.bias", (d,), ("embed",)))
    else:
        out.append(ParamSpec(f"{prefix}embeddings.class_embedding", (d,), ("embed",)))
    out.append(ParamSpec(f"{prefix}embeddings.position_embedding", (n_pos, d), ("position", "embed")))
    if clip:
        out += _norm(f"{prefix}pre_layrnorm", d, True)
    for i in range(cfg.num_layers):
        q = f"{prefix}layers.{i}"
        out += _norm(f"{q}.layer_norm1", d, True)
        out += _attention(f"{q}.self_attn", d, cfg.num_heads, cfg.num_heads, d // cfg.num_heads, True, True)
        out += _norm(f"{q}.layer_norm2", d, True)
        out += _dense(f"{q}.mlp.fc1", d, cfg.intermediate_size, ("embed", "mlp"), True)
        out += _dense(f"{q}.mlp.fc2", cfg.intermediate_size, d, ("mlp", "embed"), True)
    out += _norm(f"{prefix}post_layernorm", d, True)
    if not clip and cfg.use_head:
        h = f"{prefix}head"
        out.append(ParamSpec(f"{h}.probe", (d,), ("embed",)))
        out += [ParamSpec(f"{h}.attention.in_proj_kernel", (d, 3, d), ("embed", None, "heads"),
                          (None, None, cfg.num_heads)),
                ParamSpec(f"{h}.attention.in_proj_bias", (3, d), (None, "heads"), (None, cfg.num_heads))]
        out += _dense(f"{h}.attention.out_proj", d, d, ("heads", "embed"), True, (cfg.num_heads, None))
        out += _norm(f"{h}.layernorm", d, True)
        out += _dense(f"{h}.mlp.fc1", d, cfg.intermediate_size, ("embed", "mlp"), True)
        out += _dense(f"{h}.mlp.fc2", cfg.intermediate_size, d, ("mlp", "embed"), True)
    return out


def mllm_params(cfg: MLLMConfig) -> list[ParamSpec]:
    """Every param of ``MLLM(cfg)``: ``vision.*``, ``projector.*``, ``decoder.*``, LoRA factors
    on the Dense layers that ``cfg.lora.target`` selects, and soft prompts."""
    dv, dl = cfg.vision.hidden_size, cfg.decoder.hidden_size
    out = vision_params(cfg.vision, "vision.")
    if cfg.projector.kind == "pool" and cfg.projector.layer_norm:
        out += _norm("projector.layer_norm", dv, True)
    out += _dense("projector.linear_1", dv, dl, ("embed", "mlp"), cfg.projector.bias)
    out += _dense("projector.linear_2", dl, dl, ("mlp", "embed"), cfg.projector.bias)
    out += decoder_params(cfg.decoder, "decoder.")
    if cfg.num_soft_prompts:
        out.append(ParamSpec("soft_prompt.embedding", (cfg.num_soft_prompts, dl), ("prompts", "embed")))
    if cfg.lora.rank > 0:
        target = re.compile(cfg.lora.target)
        r = cfg.lora.rank
        for spec in list(out):
            if spec.path.endswith(".kernel") and len(spec.shape) == 2 and target.search(spec.path[:-len(".kernel")]):
                base = spec.path[:-len(".kernel")]
                out.append(ParamSpec(f"{base}.lora.a", (spec.shape[0], r), (spec.axes[0], "lora_rank")))
                out.append(ParamSpec(f"{base}.lora.b", (r, spec.shape[1]), ("lora_rank", spec.axes[1])))
    return out


# ---- FLOPs --------------------------------------------------------------------------------------

def _matmul_params(specs: list[ParamSpec]) -> int:
    n = 0
    for s in specs:
        if s.path.endswith(".kernel") and len(s.shape) == 2:
            n += s.shape[0] * s.shape[1]
    return n


def decoder_forward_flops(cfg: DecoderConfig, batch: int, seq_len: int) -> float:
    """Forward FLOPs of the decoder over ``batch`` sequences of ``seq_len`` tokens."""
    n = _matmul_params(decoder_params(cfg))
    if cfg.tie_word_embeddings:
        n += cfg.hidden_size * cfg.vocab_size  # logits through the embedding matrix
    tokens = batch * seq_len
    attn = 4 * seq_len * cfg.num_heads * cfg.resolved_head_dim * cfg.num_layers
    return float(tokens) * (2 * n + attn)


def vision_forward_flops(cfg: VisionConfig, images: int, layers: Optional[int] = None) -> float:
    """Forward FLOPs of the ViT over ``images`` images through its first ``layers`` encoder
    layers (default: all)."""
    layers = cfg.num_layers if layers is None else layers
    t = cfg.num_patches + (1 if cfg.variant == "clip" else 0)
    n = _matmul_params([s for s in vision_params(cfg) if s.path.startswith("layers.")]) // max(cfg.num_layers, 1) * layers
    attn = 4 * t * cfg.hidden_size * layers
    patch = 2 * cfg.patch_size ** 2 * cfg.num_channels * cfg.hidden_size * cfg.num_patches
    return float(images) * (t * (2 * n + attn) + patch)


def vision_layers_run(cfg: MLLMConfig) -> int:
    """ViT layers an MLLM runs: those up to ``vision_feature_layer`` (hidden state ``i`` is the
    output of layer ``i``; 0 is the embeddings), the only vision output the MLLM uses."""
    n, fl = cfg.vision.num_layers, cfg.vision_feature_layer
    return fl if fl >= 0 else n + 1 + fl


def mllm_forward_flops(cfg: MLLMConfig, batch: int, seq_len: int, images: int) -> float:
    return sum(p.forward for p in mllm_flops_parts(cfg, batch, seq_len, images))


def _weights(specs: list[ParamSpec], keep) -> tuple[tuple[str, int], ...]:
    """(path, size) of the 2-D kernels and LoRA factors among ``specs`` whose path ``keep``s."""
    return tuple((s.path, s.shape[0] * s.shape[1]) for s in specs
                 if len(s.shape) == 2 and s.path.endswith((".kernel", ".lora.a", ".lora.b")) and keep(s.path))


def mllm_flops_parts(cfg: MLLMConfig, batch: int, seq_len: int, images: int) -> list[FlopsPart]:
    """``MLLM(cfg)`` over ``batch`` sequences of ``seq_len`` tokens with ``images`` images, as
    ``FlopsPart`` s bottom to top: the ViT layers that run, the projector, the decoder (its
    input embeddings and soft prompts at its bottom). LoRA factors count as weights (their own
    forward products, ``rank / width`` of the layer's, are left out of ``forward``)."""
    table = mllm_params(cfg)
    v, d = cfg.vision, cfg.decoder
    run = vision_layers_run(cfg)
    t = v.num_patches + (1 if v.variant == "clip" else 0)
    layer = re.compile(r"^vision\.layers\.(\d+)\.")
    vis = [s for s in table if s.path.startswith("vision.")]
    vis_weights = _weights(vis, lambda p: (m := layer.match(p)) is not None and int(m.group(1)) < run)
    patch = next(s for s in vis if s.path == "vision.embeddings.patch_embedding.kernel")
    vis_weights += ((patch.path, int(np.prod(patch.shape))),)      # each patch once (no CLS row: ~1/t)
    vision = FlopsPart(("vision.",), vision_forward_flops(v, images, run),
                       float(images) * t * 4 * t * v.hidden_size * run, vis_weights, images * t)
    proj_tokens = cfg.tokens_per_image        # the pool adapter pools first, then its MLP
    dv, dl = v.hidden_size, d.hidden_size
    projector = FlopsPart(("projector.",), 2.0 * images * proj_tokens * (dv * dl + dl * dl), 0.0,
                          _weights(table, lambda p: p.startswith("projector.")), images * proj_tokens)
    dec_weights = _weights(table, lambda p: p.startswith("decoder."))
    if d.tie_word_embeddings:                 # the logits multiply the embedding matrix
        dec_weights += (("decoder.embed_tokens.embedding", d.vocab_size * d.hidden_size),)
    tokens = batch * seq_len
    decoder = FlopsPart(("decoder.", "soft_prompt."), decoder_forward_flops(d, batch, seq_len),
                        float(tokens) * 4 * seq_len * d.num_heads * d.resolved_head_dim * d.num_layers,
                        dec_weights, tokens)
    return [vision, projector, decoder]


def train_flops(forward_flops: float) -> float:
    """Forward + backward of a fully trained model (the backward pass is two matmuls per
    forward matmul); ``train_flops_of`` for one with frozen parts."""
    return 3.0 * forward_flops


class FlopsPart(NamedTuple):
    """One stage of the forward pass (``mllm_flops_parts`` lists them bottom to top).

    ``params``: path prefixes of its params (a trainable one among them makes the gradient flow
    back through this part and every part above it); ``forward``: its forward FLOPs, of which
    ``weightless`` have no weight operand (attention's ``QK^T`` and ``PV``); ``weights``: the
    weight matrices it multiplies (param path, size), each by ``rows`` rows."""
    params: tuple[str, ...]
    forward: float
    weightless: float
    weights: tuple[tuple[str, int], ...]
    rows: int


def train_flops_of(parts: list[FlopsPart], trained) -> float:
    """Forward + backward FLOPs of one step when the params whose paths are in ``trained`` (a
    set) are trained: the forward pass; the input gradient of every part from the lowest one with
    a trained param (a path under its ``params`` prefixes) up, ``forward + weightless``; and the
    weight gradient ``2 * rows * size`` of each trained weight. Everything trained: ``3 *
    forward`` (what ``train_flops`` counts)."""
    trained = frozenset(trained)
    total = sum(p.forward for p in parts)
    flows = False
    for p in parts:
        flows = flows or any(path.startswith(p.params) for path in trained)
        if flows:
            total += p.forward + p.weightless
        total += 2.0 * p.rows * sum(n for path, n in p.weights if path in trained)
    return total


# ---- device peaks -------------------------------------------------------------------------------

# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity) and memory per chip (bytes).
ACCELERATORS: dict[str, tuple[float, float]] = {
    "tpu-v4": (275e12, 32 * 2**30),
    "tpu-v5e": (197e12, 16 * 2**30),
    "tpu-v5p": (459e12, 95 * 2**30),
    "tpu-v6e": (918e12, 32 * 2**30),
    "a100": (312e12, 80e9),
    "h100": (989e12, 80e9),
    "h200": (989e12, 141e9),
}
# jax ``device_kind`` substrings -> table key (first match wins).
_KIND_KEYS = (("v6", "tpu-v6e"), ("v5 lite", "tpu-v5e"), ("v5e", "tpu-v5e"), ("v5", "tpu-v5p"),
              ("v4", "tpu-v4"), ("h200", "h200"), ("h100", "h100"), ("a100", "a100"))
# CPU: nominal float32 peak per core (2 FMA units x 8 lanes x 2 FLOPs x 2.5 GHz, AVX2). The
# benchmark measures the real matmul peak of the machine instead.
CPU_PEAK_PER_CORE = 80e9


def device_peak_flops(device=None) -> tuple[float, str]:
    """``(peak FLOP/s per jax device, source)`` for MFU. CPU devices share the host's cores."""
    import jax
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    if device.platform == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        per_device = CPU_PEAK_PER_CORE * cores / max(jax.local_device_count(), 1)
        return per_device, f"cpu nominal ({cores} cores x {CPU_PEAK_PER_CORE / 1e9:.0f} GFLOP/s)"
    for sub, key in _KIND_KEYS:
        if sub in kind:
            return ACCELERATORS[key][0], key
    raise KeyError(f"no peak FLOP/s known for device kind {device.device_kind!r}; "
                   "set train.peak_flops in the config")


__all__ = ["ParamSpec", "decoder_params", "vision_params", "mllm_params", "decoder_forward_flops",
           "vision_forward_flops", "vision_layers_run", "mllm_forward_flops", "train_flops", "ACCELERATORS",
           "device_peak_flops", "CPU_PEAK_PER_CORE"]
