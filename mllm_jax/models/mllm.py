"""The multimodal LLM: vision tower -> projector -> decoder LLM over interleaved sequences.

Sequences are *pre-expanded* (Hugging Face LLaVA semantics): each image occupies
``cfg.tokens_per_image`` consecutive ``cfg.image_token_id`` tokens, and the k-th block of image
tokens in sample b takes image ``(b, k)`` of ``pixel_values: float[B, M, H, W, C]``. Any number
of images per sample (up to M), anywhere in the text; padding rows of ``pixel_values`` are
marked by ``image_mask: bool[B, M]``. Soft prompts (VladVA) work the same way with
``cfg.soft_prompt_token_id``: the j-th such token of a row takes soft prompt ``j % num``.

One set of weights gives (a) next-token logits for generation and (b) hidden states and pooled
embeddings for discrimination (``embed``, ``slice_embeddings``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.config import MLLMConfig, dtype_of
from mllm_jax.models import pooling
from mllm_jax.models.layers import MLP
from mllm_jax.models.decoder import Decoder
from mllm_jax.models.lora import SoftPrompt, apply_lora
from mllm_jax.models.projector import MLPProjector, PoolAdapter
from mllm_jax.models.vision import VisionTower

Array = jax.Array


class MLLMOutput(NamedTuple):
    logits: Optional[Array]                 # float32[B, T, V]
    last_hidden_state: Array                # float[B, T, D] (after the final norm)
    hidden_states: Optional[tuple]          # num_layers + 1 arrays float[B, T, D], HF semantics
    cache: Optional[list]
    inputs_embeds: Array                    # float[B, T, D] merged text + image (+ soft prompt) embeddings


class ImageSlotError(ValueError):
    """The number of image tokens in a sample does not match its images."""


def check_image_slots(input_ids, image_mask, tokens_per_image: int, image_token_id: int) -> None:
    """Host-side check: every sample has exactly ``tokens_per_image`` tokens per real image.

    ``input_ids: int[B, T]``, ``image_mask: bool[B, M]`` (None = no images). Raises
    ``ImageSlotError`` naming the sample.
    """
    ids = np.asarray(input_ids)
    im = np.zeros((len(ids), 0), bool) if image_mask is None else np.asarray(image_mask).astype(bool)
    bad = np.flatnonzero((~im[:, :-1] & im[:, 1:]).any(axis=1))
    if bad.size:
        raise ImageSlotError(f"samples {bad.tolist()}: image_mask has a padding image before a real one; "
                             "the k-th <image> slot takes image k, so padding images must come last")
    n_tok = (ids == image_token_id).sum(axis=1)
    n_img = im.sum(axis=1)
    for b in range(len(ids)):
        if n_tok[b] % tokens_per_image:
            raise ImageSlotError(
                f"sample {b}: {n_tok[b]} image tokens is not a multiple of tokens_per_image={tokens_per_image} "
                "(expand each <image> into tokens_per_image image tokens before the model)")
        slots = n_tok[b] // tokens_per_image
        if slots > n_img[b]:
            raise ImageSlotError(f"sample {b}: {slots} <image> slots but only {n_img[b]} images given")
        if slots < n_img[b]:
            raise ImageSlotError(f"sample {b}: {n_img[b]} images given but only {slots} <image> slots")


def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def _scatter_blocks(embeds: Array, is_slot: Array, values: Array, wrap: Optional[int] = None) -> Array:
    """Writes ``values[b, j]`` into the j-th slot token of row b (j counted left to right).

    ``embeds: float[B, T, D]``, ``is_slot: bool[B, T]``, ``values: float[B, N, D]``.
    """
    idx = jnp.cumsum(is_slot.astype(jnp.int32), axis=1) - 1
    idx = idx % wrap if wrap else jnp.clip(idx, 0, values.shape[1] - 1)
    gathered = jnp.take_along_axis(values, jnp.maximum(idx, 0)[..., None], axis=1)
    return jnp.where(is_slot[..., None], gathered.astype(embeds.dtype), embeds)


class MLLM(nnx.Module):
    """``MLLM(cfg, rngs=nnx.Rngs(0))``: submodules ``vision``, ``projector``, ``decoder``
    (and ``soft_prompt`` when ``cfg.num_soft_prompts``, ``embed_head`` when ``cfg.embed_head``,
    learned ``logit_scale``/``logit_bias`` when ``cfg.contrastive_temperature`` is set). LoRA from ``cfg.lora`` is attached at
    construction on the Dense layers whose path matches ``cfg.lora.target``."""

    hf_family = "llava"

    def __init__(self, cfg: MLLMConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.vision = VisionTower(cfg.vision, rngs=rngs)
        d_vis, d_llm = cfg.vision.hidden_size, cfg.decoder.hidden_size
        dt = dtype_of(cfg.decoder.dtype)  # the projector computes in the LLM's dtype
        if cfg.projector.kind == "mlp":
            self.projector = MLPProjector(d_vis, d_llm, cfg.projector, dtype=dt, rngs=rngs)
        else:
            self.projector = PoolAdapter(d_vis, d_llm, cfg.vision.grid_size, cfg.projector, dtype=dt, rngs=rngs)
        self.decoder = Decoder(cfg.decoder, rngs=rngs)
        self.soft_prompt = SoftPrompt(cfg.num_soft_prompts, d_llm, rngs=rngs) if cfg.num_soft_prompts else None
        # Sugar's MLP head from slice hidden states to the embeddings compared by alignment
        self.embed_head = MLP(d_llm, d_llm, act="gelu", dtype=dtype_of(cfg.decoder.dtype), rngs=rngs) \
            if cfg.embed_head else None
        if cfg.contrastive_temperature is not None:  # learned temperature (log scale) and bias
            self.logit_scale = nnx.Param(jnp.asarray(-np.log(cfg.contrastive_temperature), jnp.float32))
            self.logit_bias = nnx.Param(jnp.asarray(cfg.contrastive_bias, jnp.float32))
        else:
            self.logit_scale = self.logit_bias = None
        if cfg.lora.rank:
            apply_lora(self, cfg.lora, rngs)

    # ---- images ------------------------------------------------------------------------------

    def encode_images(self, pixel_values: Array) -> Array:
        """``float[N, H, W, C]`` -> projected image tokens ``float[N, tokens_per_image, D_llm]``."""
        cfg = self.config
        out = self.vision(pixel_values, output_hidden_states=True)
        feats = out.hidden_states[cfg.vision_feature_layer]
        if cfg.vision.variant == "clip" and (cfg.vision_feature_select == "default" or cfg.projector.kind == "pool"):
            feats = feats[:, 1:]  # drop CLS
        return self.projector(feats)

    def embed_inputs(self, input_ids: Array, pixel_values: Optional[Array] = None,
                     image_mask: Optional[Array] = None) -> Array:
        """Token embeddings with image (and soft-prompt) tokens replaced: ``float[B, T, D]``."""
        cfg = self.config
        ids = jnp.asarray(input_ids)
        is_img = ids == cfg.image_token_id
        is_sp = (ids == cfg.soft_prompt_token_id) if self.soft_prompt is not None else None
        special = is_img if is_sp is None else (is_img | is_sp)
        embeds = self.decoder.embed(jnp.where(special, 0, ids))
        if pixel_values is not None:
            b, m = pixel_values.shape[:2]
            feats = self.encode_images(pixel_values.reshape((b * m,) + pixel_values.shape[2:]))
            feats = feats.reshape(b, m * feats.shape[1], feats.shape[2])
            embeds = _scatter_blocks(embeds, is_img, feats)
        if is_sp is not None:
            sp = self.soft_prompt(ids.shape[0], embeds.dtype)
            embeds = _scatter_blocks(embeds, is_sp, sp, wrap=self.soft_prompt.num)
        return embeds

    # ---- forward -------------------------------------------------------------------------------

    def __call__(self, input_ids: Array, *, attention_mask: Optional[Array] = None,
                 pixel_values: Optional[Array] = None, image_mask: Optional[Array] = None,
                 positions: Optional[Array] = None, cache=None, cache_index=None,
                 output_hidden_states: bool = False, return_logits: bool = True) -> MLLMOutput:
        """``input_ids: int32[B, T]`` (image slots pre-expanded), ``attention_mask: int[B, T]``,
        ``pixel_values: float32[B, M, H, W, C]``, ``image_mask: bool[B, M]``."""
        if _is_concrete(input_ids) and (pixel_values is None or _is_concrete(pixel_values)) \
                and (image_mask is None or _is_concrete(image_mask)):
            if image_mask is None and pixel_values is not None:
                image_mask = np.ones(pixel_values.shape[:2], bool)
            check_image_slots(input_ids, image_mask, self.config.tokens_per_image, self.config.image_token_id)
        embeds = self.embed_inputs(input_ids, pixel_values, image_mask)
        out = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, positions=positions,
                           cache=cache, cache_index=cache_index,
                           output_hidden_states=output_hidden_states, return_logits=return_logits)
        return MLLMOutput(out.logits, out.last_hidden_state, out.hidden_states, out.cache, embeds)

    def generate(self, input_ids: Array, *, attention_mask: Optional[Array] = None,
                 pixel_values: Optional[Array] = None, image_mask: Optional[Array] = None, **kwargs):
        """Image-conditioned generation: merges the prompt's image tokens (one jitted call), then
        runs ``mllm_jax.generate.generate`` on the decoder from those embeddings. ``kwargs`` are
        ``generate``'s (``max_new_tokens``, ``do_sample``, ``top_p``, ``stop_tokens``, ...)."""
        from mllm_jax.generate import generate
        if pixel_values is not None and image_mask is None:
            image_mask = np.ones(pixel_values.shape[:2], bool)
        if _is_concrete(input_ids) and (image_mask is None or _is_concrete(image_mask)):
            # as the forward pass: image slots without images (pixel_values None) are refused too
            check_image_slots(input_ids, image_mask, self.config.tokens_per_image, self.config.image_token_id)
        graphdef, state = nnx.split(self)
        embeds = _embed_inputs_jit(graphdef, state, jnp.asarray(input_ids, jnp.int32), pixel_values, image_mask)
        return generate(self.decoder, inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    # ---- discriminative views -----------------------------------------------------------------

    @staticmethod
    def select_layer(out: MLLMOutput, layer: int = -1) -> Array:
        """Hidden states of ``layer`` (-1 = last, after the final norm); needs hidden states for others."""
        if layer == -1:
            return out.last_hidden_state
        if out.hidden_states is None:
            raise ValueError(f"layer {layer} needs output_hidden_states=True")
        return out.hidden_states[layer]

    def embed(self, input_ids: Array, attention_mask: Array, *, pixel_values=None, image_mask=None,
              method: str = "last", layer: int = -1, normalize: bool = True) -> Array:
        """Pooled sequence embedding ``float32[B, D]`` (``method``: mean | last | prompt)."""
        out = self(input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_mask=image_mask,
                   output_hidden_states=layer != -1, return_logits=False)
        e = pooling.pool(self.select_layer(out, layer), attention_mask, method).astype(jnp.float32)
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True).clip(1e-6) if normalize else e


@jax.jit
def _embed_inputs_jit(graphdef, state, input_ids, pixel_values, image_mask):
    return nnx.merge(graphdef, state).embed_inputs(input_ids, pixel_values, image_mask)


def slice_embeddings(out: MLLMOutput, slice_ids: Array, slice_is_image: Array, num_slices: int,
                     layer: int = -1, head: Optional[nnx.Module] = None) -> Array:
    """Sugar slice embeddings ``float[B, S, D]`` from a forward pass (see ``pooling.slice_pool``),
    through ``head`` (the model's ``embed_head``) when given."""
    e = pooling.slice_pool(MLLM.select_layer(out, layer), slice_ids, slice_is_image, num_slices)
    return e if head is None else head(e)


__all__ = ["MLLM", "MLLMOutput", "ImageSlotError", "check_image_slots", "slice_embeddings"]
