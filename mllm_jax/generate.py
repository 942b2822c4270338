"""Batched decoding with a KV cache: greedy, or sampling with temperature / top-k / top-p.

    out = generate(model, input_ids, attention_mask=mask, max_new_tokens=32,
                   stop_tokens={eos_id})                     # greedy
    out = generate(model, input_ids, attention_mask=mask, max_new_tokens=32, do_sample=True,
                   temperature=0.7, top_p=0.9, key=jax.random.key(0))
    out.tokens   # int32[B, max_new_tokens]; after a row's stop token (included) it holds pad
    out.lengths  # int32[B]: generated tokens per row, the stop token included

The prompt is ``input_ids`` or ``inputs_embeds`` (e.g. the MLLM's merged image + text
embeddings), left- or right-padded as ``attention_mask`` says. Prefill and the whole decode loop
are one jitted function (a ``lax.while_loop`` that stops early once every row has finished),
over the model's ``nnx.split`` state: the cache never leaves the device and nothing runs in
Python per token. A new compile happens only when the shapes or the static settings change.

Sampling follows transformers' order and semantics: temperature, then top-k
(``TopKLogitsWarper``), then top-p (``TopPLogitsWarper``), then a categorical draw; step ``i``
uses ``fold_in(key, i)``, so a key gives the same tokens every time.

On a single CPU device the weight matmuls of the loop use ``mllm_jax.kernels.cpu_matmul``
(``cpu_kernels=None``: whenever it is available): at batch 8 it multiplies 2.5x faster than
XLA:CPU's GEMM, which bounds a decode step there. The kernel wants its own weight layout: the
packed copy is made on the first call and reused while the model's weight arrays are unchanged
(one model's worth of extra memory). ``cpu_kernels=False`` keeps XLA's dot everywhere;
``MLLM_JAX_CPU_KERNELS=0`` does so process-wide.
"""
from __future__ import annotations

import functools
import weakref
from typing import Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.kernels import cpu_matmul
from mllm_jax.models.layers import Dense, Embed

Array = jax.Array


class GenerateOutput(NamedTuple):
    tokens: Array    # int32[B, max_new_tokens]
    lengths: Array   # int32[B]


# ---- logits filters (transformers' warpers) ---------------------------------------------------

def top_k_filter(logits: Array, k: int) -> Array:
    """Keeps the ``k`` largest logits per row (ties with the k-th kept), the rest -> -inf.

    ``logits: float[B, V]``; ``k <= 0`` or ``k >= V`` keeps everything.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: Array, p: float | Array) -> Array:
    """Nucleus filtering: drops the least likely tokens whose total probability is ``<= 1 - p``
    (at least the most likely token stays). ``logits: float[B, V]``; removed -> -inf."""
    order = jnp.argsort(logits, axis=-1)                               # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cum <= 1 - p).at[..., -1].set(False)
    inverse = jnp.argsort(order, axis=-1)
    remove = jnp.take_along_axis(remove_sorted, inverse, axis=-1)
    return jnp.where(remove, -jnp.inf, logits)


def greedy_argmax(logits: Array) -> Array:
    """``jnp.argmax(logits, axis=-1)`` as int32 (first maximum wins; a NaN counts as the maximum,
    first NaN wins), from two vectorised reductions: a max, then the first index that equals it.

    XLA:CPU lowers ``argmax`` to one variadic (value, index) reduce that does not vectorise:
    1.11 ms for float32[8, 32000] on one core here, against 0.22 ms for this form, about 6 % of
    a batch-8 decode step of the 4x512 Llama in ``experiments/bench/decode.py``.
    """
    v = logits.shape[-1]
    idx = jnp.arange(v, dtype=jnp.int32)
    nan = jnp.isnan(logits)
    # XLA:CPU's max may drop NaNs (fast min/max), so NaNs are located on their own
    first_nan = jnp.min(jnp.where(nan, idx, v), axis=-1)
    top = jnp.max(jnp.where(nan, -jnp.inf, logits), axis=-1, keepdims=True)
    first_top = jnp.min(jnp.where(logits == top, idx, v), axis=-1)
    return jnp.where(first_nan < v, first_nan, first_top)


def _select(logits: Array, step: Array, key: Array, *, do_sample: bool, temperature: Array,
            top_k: int, top_p: Array, use_top_p: bool) -> Array:
    """Next tokens ``int32[B]`` from ``logits: float32[B, V]``."""
    if not do_sample:
        return greedy_argmax(logits)
    logits = logits / temperature
    logits = top_k_filter(logits, top_k)
    if use_top_p:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(jax.random.fold_in(key, step), logits, axis=-1).astype(jnp.int32)


# ---- CPU kernel plumbing ------------------------------------------------------------------------

def _packable(model: nnx.Module):
    """``(path, module)`` for every float32 ``Dense`` of ``model`` and, when the embeddings are
    tied, the token embedding (for ``attend``)."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for path, m in nnx.iter_modules(model):
        if isinstance(m, Dense) and m.dtype == jnp.float32:
            yield "/".join(map(str, path)), m
        elif isinstance(m, Embed) and tied and m.dtype == jnp.float32 and path == ("embed_tokens",):
            yield "/".join(map(str, path)), m


def _weight(m: Dense | Embed) -> Array:
    """The matrix a ``_packable`` module multiplies by (``Embed``: its table, used transposed)."""
    return m.embedding[...] if isinstance(m, Embed) else m.kernel[...]


@functools.partial(jax.jit, static_argnames="graphdef")
def _pack_weights(graphdef, state) -> dict:
    """``{module path: packed weight}`` (``cpu_matmul.pack``) for ``_packable`` modules."""
    return {path: (cpu_matmul.pack_transposed if isinstance(m, Embed) else cpu_matmul.pack)(_weight(m))
            for path, m in _packable(nnx.merge(graphdef, state))}


def _attach(model: nnx.Module, packs: dict | None) -> nnx.Module:
    """Points the modules of a freshly merged ``model`` at their packed weights."""
    model.eval()  # decoding is deterministic: no dropout (e.g. LoRA's) inside the loop
    if packs:
        for path, m in _packable(model):
            m.packed = packs[path]
    return model


class _PackCache:
    """The packed weights of the model ``generate`` saw last, kept while its weight arrays live.

    Packing reads and writes every weight (~45 ms for the 4x512 Llama of the decode benchmark,
    as much as 10 decode steps), so it is not redone per call. Arrays are immutable: the same
    live array objects mean the same values; a training step that replaces (or donates) a weight
    makes its array unreachable, its weak reference dies, and that drops the entry (so a deleted
    model's packed copy does not outlive it). One entry only: the extra memory is one model's
    weights, the price of the kernel's layout.
    """

    def __init__(self):
        self._refs: list = []
        self._packs: dict | None = None
        self._generation = 0

    def get(self, graphdef, state, model) -> dict:
        weights = [_weight(m) for _, m in _packable(model)]
        if (self._packs is not None and len(weights) == len(self._refs)
                and all(r() is w and not w.is_deleted() for r, w in zip(self._refs, weights))):
            return self._packs
        self.clear()  # let the old entry go before building the new one
        packs = _pack_weights(graphdef, state)
        gen = self._generation
        self._refs = [weakref.ref(w, lambda _, gen=gen: self._drop(gen)) for w in weights]
        self._packs = packs
        return packs

    def _drop(self, generation: int) -> None:
        if generation == self._generation:
            self.clear()

    def clear(self) -> None:
        self._generation += 1
        self._refs, self._packs = [], None


_PACKS = _PackCache()


def _kernels_apply(state) -> bool:
    """The CPU kernel has no sharding rule: use it only when every weight is a concrete array
    on one CPU device."""
    for leaf in jax.tree.leaves(state):
        if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
            return False
        devices = leaf.sharding.device_set
        if len(devices) != 1 or next(iter(devices)).platform != "cpu":
            return False
    return True


# ---- the jitted loop ----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "do_sample", "top_k", "use_top_p", "stop_tokens", "pad_id",
    "cache_dtype"))
def _generate(graphdef, state, packs, input_ids, inputs_embeds, attention_mask, positions, key,
              temperature, top_p, *, max_new_tokens: int, do_sample: bool, top_k: int,
              use_top_p: bool, stop_tokens: tuple[int, ...], pad_id: int, cache_dtype):
    model = _attach(nnx.merge(graphdef, state), packs)
    prompt = input_ids if input_ids is not None else inputs_embeds
    b, t = prompt.shape[:2]
    n = max_new_tokens
    s_max = t + n - 1                      # the last token is chosen, never fed back
    cache = model.init_cache(b, s_max, cache_dtype)
    mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.zeros((b, n - 1), jnp.int32)], axis=1)
    if positions is None:
        positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    out = model(input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
                positions=positions.astype(jnp.int32), cache=cache, cache_index=0, return_logits=False)
    # the last real token of each row (left or right padding): its hidden state, its position
    slot = jnp.arange(t)
    last = jnp.max(jnp.where(attention_mask.astype(bool), slot, 0), axis=1)
    h_last = jnp.take_along_axis(out.last_hidden_state, last[:, None, None], axis=1)[:, 0]
    next_pos = jnp.take_along_axis(positions.astype(jnp.int32), last[:, None], axis=1)[:, 0] + 1
    select = functools.partial(_select, key=key, do_sample=do_sample, temperature=temperature,
                               top_k=top_k, top_p=top_p, use_top_p=use_top_p)
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

    def emit(i, logits, tokens, done, lengths):
        tok = select(logits, i)
        tok = jnp.where(done, pad_id, tok)
        tokens = tokens.at[:, i].set(tok)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stops)
        return tok, tokens, done, lengths

    tokens = jnp.full((b, n), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)
    lengths = jnp.zeros((b,), jnp.int32)
    tok, tokens, done, lengths = emit(0, model.lm_logits(h_last), tokens, done, lengths)

    def cond(carry):
        i, _, _, _, _, done, _, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, mask, pos, done, tokens, lengths = carry
        model = _attach(nnx.merge(graphdef, state), packs)
        slot_i = t + i - 1                 # where the previous token's key/value goes
        mask = jax.lax.dynamic_update_slice(mask, jnp.ones((b, 1), jnp.int32), (0, slot_i))
        out = model(tok[:, None], attention_mask=mask, positions=pos[:, None], cache=cache,
                    cache_index=slot_i)
        tok, tokens, done, lengths = emit(i, out.logits[:, -1], tokens, done, lengths)
        return i + 1, tok, out.cache, mask, pos + 1, done, tokens, lengths

    carry = (jnp.ones((), jnp.int32), tok, out.cache, mask, next_pos, done, tokens, lengths)
    carry = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(carry[6], carry[7])


def generate(model: nnx.Module, input_ids=None, *, inputs_embeds=None, attention_mask=None,
             positions=None, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, key: Optional[Array] = None,
             stop_tokens: Optional[Iterable[int]] = None, pad_token_id: Optional[int] = None,
             cache_dtype=None, cpu_kernels: Optional[bool] = None) -> GenerateOutput:
    """Decodes ``max_new_tokens`` tokens for every row of a (padded) prompt batch.

    ``model``: a ``Decoder`` (anything with its ``__call__``/``init_cache``/``lm_logits``).
    ``input_ids: int32[B, T]`` or ``inputs_embeds: float[B, T, D]``; ``attention_mask: [B, T]``
    (default all ones) marks the real prompt tokens; ``positions: int32[B, T]`` (default
    ``cumsum(mask) - 1``); generated tokens continue from each row's last prompt position.
    ``stop_tokens`` (default: the config's ``eos_token_id``) end a row; finished rows emit
    ``pad_token_id`` (default: config pad, else eos, else 0). Sampling needs ``key``.
    ``cpu_kernels``: use ``mllm_jax.kernels.cpu_matmul`` for the loop's weight matmuls (None:
    when it is available and every weight sits on one CPU device; True: required, raises
    ``KernelUnavailable`` with the reason otherwise; False: XLA's dot).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("generate: pass exactly one of input_ids or inputs_embeds")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample:
        if key is None:
            raise ValueError("generate: do_sample=True needs a PRNG key (key=jax.random.key(seed))")
        if not temperature > 0:
            raise ValueError(f"generate: temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    cfg = model.config
    eos = cfg.eos_token_id
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (tuple, list)) else (eos,)
    if stop_tokens is None:
        stop_tokens = eos_ids
    elif isinstance(stop_tokens, (int, np.integer)):
        stop_tokens = (int(stop_tokens),)
    if pad_token_id is None:
        pad_token_id = next((x for x in (cfg.pad_token_id, *eos_ids[:1]) if x is not None), 0)
    if input_ids is not None:
        input_ids = prompt = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"generate: input_ids must be [B, T], got shape {input_ids.shape}")
    else:
        inputs_embeds = prompt = jnp.asarray(inputs_embeds)
        if inputs_embeds.ndim != 3:
            raise ValueError(f"generate: inputs_embeds must be [B, T, D], got shape {inputs_embeds.shape}")
    b, t = prompt.shape[:2]
    if attention_mask is None:
        attention_mask = np.ones((b, t), np.int32)
    elif not hasattr(attention_mask, "shape"):     # a nested list; an array or tracer stays as it is
        attention_mask = np.asarray(attention_mask)
    if tuple(attention_mask.shape) != (b, t):
        raise ValueError(f"generate: attention_mask has shape {attention_mask.shape}, expected {(b, t)}")
    if not isinstance(attention_mask, jax.core.Tracer):
        empty = np.flatnonzero(~np.asarray(attention_mask).astype(bool).any(axis=1))
        if empty.size:
            raise ValueError(f"generate: prompt rows {empty.tolist()} have no real token (attention_mask all 0)")
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    graphdef, state = nnx.split(model)
    if cpu_kernels is None:
        cpu_kernels = _kernels_apply(state) and cpu_matmul.available()
    elif cpu_kernels and not cpu_matmul.available():
        raise cpu_matmul.KernelUnavailable(f"generate(cpu_kernels=True): {cpu_matmul.unavailable_reason()}")
    elif cpu_kernels and not _kernels_apply(state):
        raise ValueError("generate(cpu_kernels=True): the CPU kernel needs the model's weights as concrete arrays "
                         "on one CPU device (these are sharded, on an accelerator, or traced); use "
                         "cpu_kernels=None or False")
    packs = _PACKS.get(graphdef, state, model) if cpu_kernels else None
    return _generate(
        graphdef, state, packs, input_ids, inputs_embeds, attention_mask,
        None if positions is None else jnp.asarray(positions, jnp.int32),
        jax.random.key(0) if key is None else key,
        jnp.float32(temperature), jnp.float32(top_p),
        max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample), top_k=int(top_k),
        use_top_p=bool(do_sample and top_p < 1.0), stop_tokens=tuple(sorted(int(s) for s in stop_tokens)),
        pad_id=int(pad_token_id), cache_dtype=cache_dtype)


__all__ = ["generate", "GenerateOutput", "greedy_argmax", "top_k_filter", "top_p_filter"]
