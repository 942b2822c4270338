"""KV-cache decoding vs recomputing the whole sequence and vs transformers' generate()."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mllm_jax.generate import generate, top_k_filter, top_p_filter
from tests.tiny_hf import hf_and_ours

N_NEW = 8
PAD = 0


def prompts(vocab, seed=0):
    """Three prompts of lengths 6, 3 and 5, as (left-padded, right-padded) (ids, mask) pairs."""
    rng = np.random.default_rng(seed)
    lens = [6, 3, 5]
    rows = [rng.integers(1, vocab, n) for n in lens]
    t = max(lens)
    left_ids, right_ids = np.full((3, t), PAD, np.int32), np.full((3, t), PAD, np.int32)
    left_mask, right_mask = np.zeros((3, t), np.int32), np.zeros((3, t), np.int32)
    for i, r in enumerate(rows):
        left_ids[i, t - len(r):], left_mask[i, t - len(r):] = r, 1
        right_ids[i, :len(r)], right_mask[i, :len(r)] = r, 1
    return (left_ids, left_mask), (right_ids, right_mask)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request, tmp_path_factory):
    return hf_and_ours(tmp_path_factory.mktemp(request.param), request.param, seed=3)


def greedy_without_cache(model, ids, mask, n):
    """Reference: re-run the whole (left-padded) sequence for every new token (no cache).

    The sequence lives in a fixed [B, T + n] buffer whose future slots are masked out, so the
    forward compiles once."""
    b, t = ids.shape
    seq = jnp.concatenate([jnp.asarray(ids), jnp.zeros((b, n), jnp.int32)], 1)
    valid = jnp.concatenate([jnp.asarray(mask), jnp.zeros((b, n), jnp.int32)], 1)
    forward = nnx.jit(lambda m, s, v: m(s, attention_mask=v).logits)
    out = []
    for i in range(n):
        tok = jnp.argmax(forward(model, seq, valid)[:, t + i - 1], -1).astype(jnp.int32)
        out.append(tok)
        seq, valid = seq.at[:, t + i].set(tok), valid.at[:, t + i].set(1)
    return np.stack(out, 1)


def hf_greedy(hf, ids, mask, n, eos=None):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          max_new_tokens=n, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, n - new.shape[1])), constant_values=PAD)


def test_greedy_cache_equals_no_cache_equals_transformers(models):
    hf, model = models
    (ids, mask), (rids, rmask) = prompts(hf.config.vocab_size)
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW, stop_tokens=())
    np.testing.assert_array_equal(ours.lengths, N_NEW)
    np.testing.assert_array_equal(ours.tokens, greedy_without_cache(model, ids, mask, N_NEW))
    np.testing.assert_array_equal(ours.tokens, hf_greedy(hf, ids, mask, N_NEW))
    assert len(np.unique(ours.tokens)) > 3  # a non-degenerate test
    right = generate(model, rids, attention_mask=rmask, max_new_tokens=N_NEW, stop_tokens=())
    np.testing.assert_array_equal(right.tokens, ours.tokens)
    embeds = generate(model, inputs_embeds=model.embed(jnp.asarray(rids)), attention_mask=rmask,
                      positions=np.maximum(np.cumsum(rmask, 1) - 1, 0), max_new_tokens=N_NEW, stop_tokens=())
    np.testing.assert_array_equal(embeds.tokens, ours.tokens)


def test_prompt_errors(models):
    _, model = models
    with pytest.raises(ValueError, match=r"prompt rows \[1\] have no real token"):
        generate(model, np.ones((2, 3), np.int32), attention_mask=np.array([[1, 1, 1], [0, 0, 0]]),
                 max_new_tokens=2)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        generate(model, np.ones((2, 3), np.int32), max_new_tokens=2, do_sample=True)


def test_stop_tokens_end_rows_like_transformers(models):
    hf, model = models
    (ids, mask), (rids, rmask) = prompts(hf.config.vocab_size)
    free = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW, stop_tokens=()).tokens)
    stop = int(free[0, 3])           # row 0 stops at step 3 at the latest
    out = generate(model, rids, attention_mask=rmask, max_new_tokens=N_NEW, stop_tokens={stop, 10_000},
                   pad_token_id=PAD)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row in range(3):
        hits = np.flatnonzero(free[row] == stop)
        n = hits[0] + 1 if hits.size else N_NEW
        assert lengths[row] == n
        np.testing.assert_array_equal(tokens[row, :n], free[row, :n])
        assert (tokens[row, n:] == PAD).all()
    assert lengths[0] <= 4
    np.testing.assert_array_equal(tokens, hf_greedy(hf, ids, mask, N_NEW, eos=stop))


def test_a_list_of_eos_ids_stops_like_transformers(models, tmp_path):
    """An HF config whose eos_token_id is a list (Llama-3 style): every id stops a row by default,
    as in transformers (only the first was kept)."""
    hf, model = models
    (ids, mask), _ = prompts(hf.config.vocab_size)
    free = np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW, stop_tokens=()).tokens)
    unused = next(t for t in range(1, hf.config.vocab_size) if t not in free)
    eos = [unused, int(free[0, 2])]
    hf2, ours = hf_and_ours(tmp_path, hf.config.model_type, seed=3, eos_token_id=eos)
    assert ours.config.eos_token_id == tuple(eos)
    out = generate(ours, ids, attention_mask=mask, max_new_tokens=N_NEW, pad_token_id=PAD)
    assert int(out.lengths[0]) <= 3
    np.testing.assert_array_equal(np.asarray(out.tokens), hf_greedy(hf2, ids, mask, N_NEW, eos=eos))


def test_python_lists_and_numpy_scalars_are_accepted(models):
    """input_ids / attention_mask as nested lists and a numpy-integer stop token (what
    ``tokenizer(...)["input_ids"]`` and ``array[i]`` give) raised AttributeError / TypeError."""
    hf, model = models
    (ids, mask), _ = prompts(hf.config.vocab_size)
    want = generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW, stop_tokens=())
    got = generate(model, np.asarray(ids).tolist(), attention_mask=np.asarray(mask).tolist(),
                   max_new_tokens=N_NEW, stop_tokens=())
    np.testing.assert_array_equal(got.tokens, want.tokens)
    stop = np.asarray(want.tokens)[0, 1]                     # a numpy int64
    out = generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW, stop_tokens=stop, pad_token_id=PAD)
    assert int(out.lengths[0]) <= 2


def test_a_traced_attention_mask_is_accepted():
    """generate under jax.jit with the mask an argument: np.asarray of the tracer raised
    TracerArrayConversionError (the list support converted every mask to numpy)."""
    from mllm_jax.config.model import DecoderConfig
    from mllm_jax.models.decoder import Decoder
    model = Decoder(DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1),
                    rngs=nnx.Rngs(0))
    ids, mask = np.array([[1, 2, 3], [4, 5, 6]], np.int32), np.array([[1, 1, 1], [0, 1, 1]], np.int32)
    want = generate(model, ids, attention_mask=mask, max_new_tokens=3, cpu_kernels=False).tokens
    traced = jax.jit(lambda i, m: generate(model, i, attention_mask=m, max_new_tokens=3, cpu_kernels=False).tokens)
    np.testing.assert_array_equal(np.asarray(traced(ids, mask)), np.asarray(want))


def test_top_k_1_sampling_is_greedy(models):
    hf, model = models
    (ids, mask), _ = prompts(hf.config.vocab_size, seed=1)
    greedy = generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW, stop_tokens=())
    sampled = generate(model, ids, attention_mask=mask, max_new_tokens=N_NEW, stop_tokens=(),
                       do_sample=True, top_k=1, temperature=0.7, key=jax.random.key(5))
    np.testing.assert_array_equal(sampled.tokens, greedy.tokens)


def test_sampling_is_reproducible_from_the_key(models):
    hf, model = models
    (ids, mask), _ = prompts(hf.config.vocab_size, seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=N_NEW, stop_tokens=(), do_sample=True, top_p=0.95)
    a = generate(model, ids, key=jax.random.key(1), **kw).tokens
    b = generate(model, ids, key=jax.random.key(1), **kw).tokens
    c = generate(model, ids, key=jax.random.key(2), **kw).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_filter_matches_transformers(k):
    logits = np.random.default_rng(k).normal(size=(4, 50)).astype(np.float32)
    ref = transformers.TopKLogitsWarper(top_k=k)(None, torch.tensor(logits)).numpy()
    np.testing.assert_array_equal(np.asarray(top_k_filter(jnp.asarray(logits), k)), ref)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_filter_matches_transformers(p):
    logits = 2 * np.random.default_rng(int(p * 1000)).normal(size=(4, 50)).astype(np.float32)
    ref = transformers.TopPLogitsWarper(top_p=p)(None, torch.tensor(logits)).numpy()
    np.testing.assert_array_equal(np.asarray(top_p_filter(jnp.asarray(logits), p)), ref)


def test_sampling_frequencies_follow_the_filtered_distribution():
    """Draws of the decoder's sampler match softmax(HF-warped logits / temperature)."""
    from mllm_jax.generate import _select
    logits = np.random.default_rng(0).normal(size=(1, 12)).astype(np.float32)
    t, k, p = 0.8, 6, 0.9
    warped = torch.tensor(logits) / t
    warped = transformers.TopPLogitsWarper(top_p=p)(None, transformers.TopKLogitsWarper(top_k=k)(None, warped))
    probs = torch.softmax(warped, -1)[0].numpy()
    draw = jax.jit(jax.vmap(lambda key: _select(jnp.asarray(logits), 0, key, do_sample=True,
                                                 temperature=t, top_k=k, top_p=p, use_top_p=True)))
    toks = np.asarray(draw(jax.random.split(jax.random.key(0), 20000)))[:, 0]
    freq = np.bincount(toks, minlength=12) / toks.size
    assert (freq[probs == 0] == 0).all()
    np.testing.assert_allclose(freq, probs, atol=0.015)


def test_greedy_argmax_matches_jnp_argmax_ties_nan_and_inf():
    from mllm_jax.generate import greedy_argmax
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 50)).astype(np.float32)
    x[1, [3, 7, 40]] = 9.0                      # ties: the first one wins
    x[2] = -np.inf                              # all -inf -> 0
    x[3, [5, 20]] = np.nan                      # NaN counts as the maximum, the first one wins
    x[3, 2] = 50.0                              # ... even after a larger finite value
    x[4, 10] = np.inf
    x[5, :] = 0.0
    expected = np.argmax(x, axis=-1)            # numpy's argmax: same rules
    np.testing.assert_array_equal(np.asarray(greedy_argmax(jnp.asarray(x))), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(greedy_argmax)(jnp.asarray(x))),
                                  np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    assert greedy_argmax(jnp.asarray(x)).dtype == jnp.int32
