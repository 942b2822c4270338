"""Building blocks shared by every model: Dense (with a LoRA slot), Embed, norms, MLPs, RoPE,
attention (GQA, masks, KV cache).

Conventions:
- Params are float32 and carry logical axis names (``nnx.with_partitioning``); computation runs
  in the module's ``dtype`` (float32 or bfloat16); softmax and norms accumulate in float32.
- Param names follow Hugging Face (``q_proj``, ``gate_proj``, ``fc1``, ...) so the conversion
  tables in ``mllm_jax/convert/hf.py`` stay one-to-one.
- ``Dense.kernel`` is ``[in, out]`` (torch ``Linear.weight`` transposed).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mllm_jax.kernels import cpu_matmul
from mllm_jax.models import cpu_forms
from mllm_jax.models.cpu_forms import on_cpu
from mllm_jax.sharding import constrain

Array = jax.Array
DType = Any

_NEG_INF = -1e30  # large finite: avoids inf - inf = NaN in fully masked rows


def make_param(init, axes: tuple, key, shape: tuple, cls=nnx.Param) -> nnx.Param:
    """A float32 parameter annotated with logical ``axes`` and not sharded eagerly.

    Placement happens later, in one place (``sharding.create_sharded_model``/``shard_model``).
    """
    return cls(nnx.with_partitioning(init, tuple(axes))(key, tuple(shape), jnp.float32),
               eager_sharding=False)


def mark_units(param: nnx.Variable, units: tuple) -> nnx.Variable:
    """Records that dimension ``i`` of ``param`` packs ``units[i]`` indivisible units (e.g. the
    heads of a ``[embed, heads * head_dim]`` kernel; None = no constraint). When the dimension
    is sharded, ``sharding.state_shardings`` requires the mesh axis size to divide the count."""
    param.set_metadata("units", tuple(units))
    return param


def torch_linear_init():
    """PyTorch's default Linear init (kaiming-uniform a=sqrt(5)) for a kernel of shape [in, out]."""
    return nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def normal_init(std: float = 0.02):
    return nnx.initializers.normal(std)


# ---- activations -------------------------------------------------------------------------------

def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    # transformers' other names for the tanh approximation (a decoder config keeps its HF name,
    # so that save_pretrained writes back what was read)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}


def get_activation(name: str) -> Callable:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}") from None


# ---- linear / embedding ------------------------------------------------------------------------

def matmul_2d(x: Array, w: Array, bias: Optional[Array] = None, *, transpose_w: bool = False,
              out_dtype: Optional[DType] = None) -> Array:
    """``x: float[..., in] @ w: float[in, out] (+ bias: float[out])`` (``transpose_w``:
    ``w: float[out, in]``, so ``x @ w.T``) as one 2-D matmul over the flattened leading dims, in
    ``x``'s dtype; ``w`` and ``bias`` may be float32 (they are cast). ``out_dtype`` (default
    ``x.dtype``): float32 returns a bfloat16 product's float32 accumulation unrounded (for an
    elementwise consumer: the logits, SwiGLU). Same result as
    ``einsum("...i,io->...o")``, but the weight gradient is then a plain ``[in, N] @ [N, out]``
    product: XLA:CPU otherwise lowers the multi-dim contraction of the backward pass through a
    transposed copy and a slow dot (measured 3x slower fwd+bwd).

    In bfloat16 on CPU the products of the forward and backward pass go through
    ``cpu_forms.bf16_matmul`` (bfloat16 operands, float32 accumulation and bias, one rounding; weight and
    bias gradients kept in float32), which keeps them on XLA:CPU's native bfloat16 GEMM.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if x.dtype == jnp.bfloat16 and on_cpu():
        y = cpu_forms.bf16_matmul(x2, w, bias, transpose_w, out_dtype)
    else:
        w = w.astype(x.dtype)
        y = jnp.matmul(x2, w.T if transpose_w else w, preferred_element_type=out_dtype)
        if bias is not None:
            y = y + bias.astype(out_dtype)
    return y.reshape(*lead, y.shape[-1])


def add_param(x: Array, p: Array) -> Array:
    """``x + p`` for an activation ``x`` and a (float32) parameter ``p`` that broadcasts to it,
    computed in float32 and rounded once to ``x.dtype``. The gradient of ``p`` is then reduced
    in float32: XLA:CPU reduces a bfloat16 one through a reduce-window (measured 20x slower for
    a ``[8, 65, 1024]`` bias gradient)."""
    return (x.astype(jnp.float32) + p.astype(jnp.float32)).astype(x.dtype)


def broadcast_param(p: Array, shape: tuple, dtype) -> Array:
    """A (float32) parameter broadcast to ``shape`` in float32, then cast to ``dtype``: as in
    ``add_param``, its gradient (a sum over the broadcast dims) is then reduced in float32."""
    return jnp.broadcast_to(p, shape).astype(dtype)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with kernel ``float32[in, out]`` and an optional LoRA adapter.

    ``self.lora`` is ``None`` until ``mllm_jax.models.lora.apply_lora`` attaches one.
    ``self.packed`` is ``None`` except inside ``generate``, which sets it to the kernel packed
    for the CPU small-batch matmul (``mllm_jax.kernels.cpu_matmul``) on the model it merges
    in its jitted loop; calls with a number of float32 rows in ``cpu_matmul.row_range()`` then use it.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str],
                 use_bias: bool = True, dtype: DType = jnp.float32,
                 kernel_init=None, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.axes = axes
        self.dtype = dtype
        init = kernel_init or torch_linear_init()
        self.kernel = make_param(init, axes, rngs.params(), (in_features, out_features))
        self.bias = (make_param(nnx.initializers.zeros_init(), (axes[1],), rngs.params(), (out_features,))
                     if use_bias else None)
        self.lora = nnx.data(None)  # a LoRA module once apply_lora attaches one
        self.packed = nnx.data(None)  # cpu_matmul.pack(kernel), set only inside generate

    def __call__(self, x: Array, *, out_dtype: Optional[DType] = None) -> Array:
        """``x: float[..., in]`` -> ``float[..., out]`` in ``out_dtype`` (default the compute
        dtype; see ``matmul_2d``)."""
        x = x.astype(self.dtype)
        bias = None if self.bias is None else self.bias[...]
        if self.packed is not None and cpu_matmul.applies(x):
            y = cpu_matmul.matmul(x, self.packed, self.out_features)
            if bias is not None:
                y = y + bias.astype(self.dtype)
            y = y.astype(out_dtype or y.dtype)
        else:
            y = matmul_2d(x, self.kernel[...], bias, out_dtype=out_dtype)
        if self.lora is not None:
            y = y + self.lora(x).astype(y.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding ``float32[vocab, dim]``; ``attend`` gives tied output logits (``packed``: as
    in ``Dense``, for ``attend``)."""

    def __init__(self, num_embeddings: int, features: int, *, axes=("vocab", "embed"),
                 dtype: DType = jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
        self.num_embeddings, self.features, self.dtype = num_embeddings, features, dtype
        self.table_axis = axes[0]
        self.embedding = make_param(normal_init(init_std), axes, rngs.params(), (num_embeddings, features))
        self.packed = nnx.data(None)  # cpu_matmul.pack_transposed(embedding) for attend, set only inside generate

    def __call__(self, ids: Array) -> Array:
        # Under FSDP the table's embed dim is sharded over "fsdp" while the looked-up rows are
        # sharded over the batch (data, fsdp): gathered as it is, the partitioner cannot move
        # "fsdp" from the one dim to the other and replicates the whole result ("Involuntary
        # full rematerialization"). Gather the table over fsdp first, as FSDP does for any
        # weight it uses; each device then looks up its own rows (vocab shards: one all-reduce).
        table = constrain(self.embedding[...], (self.table_axis, None))
        out = jnp.take(table, ids, axis=0)
        if out.ndim == 3:
            out = constrain(out, ("activation_batch", "length", None))
        return out.astype(self.dtype)

    def attend(self, x: Array, *, out_dtype: Optional[DType] = None) -> Array:
        """``x: float[..., dim]`` -> ``float[..., vocab]`` (tied embeddings) in ``out_dtype``
        (default the compute dtype)."""
        x = x.astype(self.dtype)
        if self.packed is not None and cpu_matmul.applies(x):
            return cpu_matmul.matmul(x, self.packed, self.num_embeddings).astype(out_dtype or self.dtype)
        return matmul_2d(x, self.embedding[...], transpose_w=True, out_dtype=out_dtype)


# ---- norms -------------------------------------------------------------------------------------

class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalise in float32, then scale in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, *, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = make_param(nnx.initializers.ones_init(), ("norm",), jax.random.key(0), (dim,))

    def __call__(self, x: Array) -> Array:
        dt = x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * xf.astype(dt).astype(jnp.float32)).astype(dt)


class LayerNorm(nnx.Module):
    """LayerNorm in float32 with scale and bias (HF ``nn.LayerNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-5, *, use_bias: bool = True, rngs: nnx.Rngs | None = None):
        self.eps = eps
        key = jax.random.key(0)
        self.scale = make_param(nnx.initializers.ones_init(), ("norm",), key, (dim,))
        self.bias = make_param(nnx.initializers.zeros_init(), ("norm",), key, (dim,)) if use_bias else None

    def __call__(self, x: Array) -> Array:
        dt = x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(dt)


# ---- MLPs --------------------------------------------------------------------------------------

def _activation_in_dtype() -> Optional[DType]:
    """The dtype an MLP's first products are returned in for the activation: on CPU float32,
    the GEMM's accumulation unrounded (XLA:CPU's bfloat16 GEMM writes float32, so rounding it
    was a pass of its own, and every op of a bfloat16 silu was rounded in between: SwiGLU's
    elementwise thread time in a bf16 lm-small train step 14.7 -> 8.3 ms, the step ~2 % faster;
    SwiGLU's product then recomputes its sigmoid in the backward pass, ``cpu_forms.swiglu_to``: -11 MB
    of per-step temporaries, ~1-2 % more);
    elsewhere ``None`` (the compute dtype), as the activations saved for the backward pass
    would double."""
    return jnp.float32 if on_cpu() else None


class GatedMLP(nnx.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))`` (Llama/Qwen2)."""

    def __init__(self, dim: int, hidden: int, *, act: str = "silu", use_bias: bool = False,
                 dtype: DType = jnp.float32, rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.gate_proj = Dense(dim, hidden, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(dim, hidden, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(hidden, dim, axes=("mlp", "embed"), **kw)
        self.act = get_activation(act)

    def __call__(self, x: Array) -> Array:
        wide = _activation_in_dtype()
        gate, up = self.gate_proj(x, out_dtype=wide), self.up_proj(x, out_dtype=wide)
        if wide is not None and self.act is jax.nn.silu:
            h = cpu_forms.swiglu_to(gate, up, self.down_proj.dtype)
        else:
            h = (self.act(gate) * up).astype(self.down_proj.dtype)
        h = constrain(h, ("activation_batch", "length", "mlp"))
        return self.down_proj(h)


class MLP(nnx.Module):
    """``fc2(act(fc1(x)))`` (ViT, BERT)."""

    def __init__(self, dim: int, hidden: int, *, act: str = "gelu", use_bias: bool = True,
                 dtype: DType = jnp.float32, rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.fc1 = Dense(dim, hidden, axes=("embed", "mlp"), **kw)
        self.fc2 = Dense(hidden, dim, axes=("mlp", "embed"), **kw)
        self.act = get_activation(act)

    def __call__(self, x: Array) -> Array:
        # the activation in float32, rounded once: XLA:CPU rounds the result of every op inside
        # a bfloat16 activation (silu on bf16[1024, 704]: 0.66 ms, through float32: 0.37 ms)
        h = self.fc1(x, out_dtype=_activation_in_dtype())
        return self.fc2(self.act(h.astype(jnp.float32)).astype(self.fc2.dtype))


# ---- rotary position embedding ----------------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict] = None) -> np.ndarray:
    """Inverse frequencies ``float32[head_dim // 2]`` as HF computes them (default/linear/llama3)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    if not scaling:
        return inv.astype(np.float32)
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv / factor).astype(np.float32)
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, inv_l).astype(np.float32)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (linear, llama3)")


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """HF rotate-half RoPE. ``x: float[B, T, H, D]``, ``positions: int[B, T]``."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]  # [B,T,D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(emb)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rot * sin


# ---- attention ---------------------------------------------------------------------------------

class KVCache(NamedTuple):
    """Per-layer cache. ``k, v: float[B, KVH, S_max, D]`` (heads before slots, so the attention
    dots read the cache in place instead of transposing all of it every decode step). Slots are
    written at a shared index."""
    k: Array
    v: Array


def dot_product_attention(q: Array, k: Array, v: Array, mask: Optional[Array], *,
                          kv_heads_first: bool = False) -> Array:
    """Grouped-query attention.

    ``q: float[B, T, H, D]``, ``k, v: float[B, S, KVH, D]`` (KVH divides H), or
    ``float[B, KVH, S, D]`` with ``kv_heads_first`` (the KV-cache layout);
    ``mask: bool[B, T, S]`` (True = may attend) or None -> ``float[B, T, H, D]``.
    """
    if not kv_heads_first and on_cpu():
        return _attention_cpu(q, k, v, mask)
    return _attention_einsum(q, k, v, mask, kv_heads_first=kv_heads_first)


def _attention_einsum(q: Array, k: Array, v: Array, mask: Optional[Array], *,
                      kv_heads_first: bool = False) -> Array:
    """``dot_product_attention`` as two einsums (XLA places the heads)."""
    b, t, h, d = q.shape
    kvh = k.shape[1 if kv_heads_first else 2]
    g = h // kvh
    kv = "bksd" if kv_heads_first else "bskd"
    qg = q.reshape(b, t, kvh, g, d)
    logits = jnp.einsum(f"btkgd,{kv}->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / math.sqrt(d))
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{kv}->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def _attention_cpu(q: Array, k: Array, v: Array, mask: Optional[Array]) -> Array:
    """``dot_product_attention`` on CPU: the same computation with the heads moved in front as
    row-major copies (``cpu_forms.rowmajor``), so that both products and their gradients are plain
    batched GEMMs; in bfloat16 they then stay bfloat16 GEMMs (``cpu_forms.bf16_bmm``) instead of being
    converted to float32 (fwd+bwd vs ``_attention_einsum``: 1.2-1.9x in float32, 1.6-2.3x in
    bfloat16 on a 2-core Zen 4; ``experiments/bench/cpu_layers.py``). The softmax
    (``cpu_forms.softmax_to``) writes its probabilities once, in the compute dtype, and keeps those for
    the backward pass (bf16 lm-small train step 5 % faster than a float32 softmax then cast)."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    dt = q.dtype
    qh = cpu_forms.rowmajor(q.reshape(b, t, kvh, g, d), (0, 2, 3, 1, 4)).reshape(b, kvh, g * t, d)
    kt = cpu_forms.rowmajor(k.astype(dt), (0, 2, 3, 1))
    vh = cpu_forms.rowmajor(v.astype(dt), (0, 2, 1, 3))
    bmm = cpu_forms.bf16_bmm if dt == jnp.bfloat16 else cpu_forms.bmm
    logits = bmm(qh, kt).reshape(b, kvh, g, t, s) * (1.0 / math.sqrt(d))
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, _NEG_INF)
    probs = cpu_forms.softmax_to(logits, dt).reshape(b, kvh, g * t, s)
    out = bmm(probs, vh).astype(dt).reshape(b, kvh, g, t, d)
    return cpu_forms.rowmajor(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d)


class Attention(nnx.Module):
    """Multi-head attention with GQA, optional RoPE and an optional KV cache.

    Param names: ``q_proj, k_proj, v_proj, o_proj`` (HF Llama; CLIP's ``out_proj`` maps to
    ``o_proj`` in conversion).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, *, qkv_bias: bool = False, out_bias: bool = False,
                 rope_theta: Optional[float] = None, rope_scaling: Optional[dict] = None,
                 dtype: DType = jnp.float32, rngs: nnx.Rngs):
        num_kv_heads = num_kv_heads or num_heads
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"attention: num_heads={num_heads} does not divide hidden size {dim}")
            head_dim = dim // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"attention: num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        kw = dict(dtype=dtype, rngs=rngs)
        self.q_proj = Dense(dim, num_heads * head_dim, axes=("embed", "heads"), use_bias=qkv_bias, **kw)
        self.k_proj = Dense(dim, num_kv_heads * head_dim, axes=("embed", "kv_heads"), use_bias=qkv_bias, **kw)
        self.v_proj = Dense(dim, num_kv_heads * head_dim, axes=("embed", "kv_heads"), use_bias=qkv_bias, **kw)
        self.o_proj = Dense(num_heads * head_dim, dim, axes=("heads", "embed"), use_bias=out_bias, **kw)
        # Whole heads must not be split across devices: sharding.state_shardings checks these.
        for proj, n in ((self.q_proj, num_heads), (self.k_proj, num_kv_heads), (self.v_proj, num_kv_heads)):
            mark_units(proj.kernel, (None, n))
            if proj.bias is not None:
                mark_units(proj.bias, (n,))
        mark_units(self.o_proj.kernel, (num_heads, None))
        self.inv_freq = (None if rope_theta is None
                         else tuple(float(f) for f in rope_inv_freq(head_dim, rope_theta, rope_scaling)))

    def __call__(self, x: Array, *, mask: Optional[Array] = None, positions: Optional[Array] = None,
                 cache: Optional[KVCache] = None, cache_index: Optional[Array] = None
                 ) -> tuple[Array, Optional[KVCache]]:
        """``x: float[B, T, dim]``; ``mask: bool[B, T, S]`` where S = T, or S_max with a cache.

        With a cache, the new keys/values are written at slots ``[cache_index, cache_index + T)``
        and attention runs over all ``S_max`` slots (the mask says which are valid).
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.inv_freq is not None:
            if positions is None:
                raise ValueError("attention with RoPE needs positions")
            inv = np.asarray(self.inv_freq, np.float32)
            q, k = apply_rope(q, positions, inv), apply_rope(k, positions, inv)
        new_cache = None
        if cache is not None:
            idx = jnp.asarray(cache_index, jnp.int32)
            zero = jnp.zeros((), jnp.int32)
            ck = jax.lax.dynamic_update_slice(cache.k, k.transpose(0, 2, 1, 3).astype(cache.k.dtype),
                                              (zero, zero, idx, zero))
            cv = jax.lax.dynamic_update_slice(cache.v, v.transpose(0, 2, 1, 3).astype(cache.v.dtype),
                                              (zero, zero, idx, zero))
            new_cache = KVCache(ck, cv)
            out = dot_product_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), mask, kv_heads_first=True)
        else:
            out = dot_product_attention(q, k, v, mask)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), new_cache


def padding_mask(attention_mask: Array) -> Array:
    """``int/bool[B, S]`` key validity -> ``bool[B, 1, S]`` (broadcast over queries)."""
    return attention_mask.astype(bool)[:, None, :]


def causal_mask(t: int, s: int | None = None, offset: Array | int = 0) -> Array:
    """``bool[T, S]``: query i (at absolute slot offset+i) may see key slots <= offset+i."""
    s = t if s is None else s
    q = jnp.arange(t)[:, None] + offset
    return jnp.arange(s)[None, :] <= q


__all__ = [
    "Dense", "Embed", "RMSNorm", "LayerNorm", "GatedMLP", "MLP", "Attention", "KVCache",
    "dot_product_attention", "rope_inv_freq", "apply_rope", "get_activation", "quick_gelu",
    "padding_mask", "causal_mask", "torch_linear_init", "normal_init", "make_param", "mark_units", "matmul_2d",
    "add_param", "broadcast_param",
]
