"""Decoder vs transformers (torch, float32) on tiny random Llama / Qwen2 models; HF conversion both
ways; config round trip; checkpoint mismatch errors."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mllm_jax.config import DecoderConfig
from mllm_jax.convert.hf import (CheckpointMismatchError, flat_params, load_pretrained,
                                 read_safetensors_dir, save_pretrained, write_safetensors)
from tests.tiny_hf import CASES, TINY, make_hf, padded_batch

def hf_forward(model, ids, mask):
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos, dtype=torch.long), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def assert_close_valid(ours, ref, mask, tol, what):
    """Compare at real (unpadded) tokens only: padded queries attend to nothing, any value is fine."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = np.abs(ours - ref)[mask.astype(bool)].max()
    assert err < tol, f"{what}: max abs error {err:.3g} >= {tol}"


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    family, kw = CASES[request.param]
    hf = make_hf(family, **kw)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


def test_forward_parity_logits_and_hidden_states(case):
    name, hf, path = case
    model = load_pretrained(path)
    assert model.hf_family == hf.config.model_type
    assert (model.lm_head is None) == bool(hf.config.tie_word_embeddings)
    ids, mask = padded_batch(hf.config.vocab_size)
    ref_logits, ref_hidden = hf_forward(hf, ids, mask)
    out = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), output_hidden_states=True)
    assert len(out.hidden_states) == hf.config.num_hidden_layers + 1
    assert_close_valid(out.logits, ref_logits, mask, 1e-4, f"{name} logits")
    for i, (h, r) in enumerate(zip(out.hidden_states, ref_hidden)):
        assert_close_valid(h, r, mask, 1e-4, f"{name} hidden_states[{i}]")
    np.testing.assert_array_equal(out.last_hidden_state, out.hidden_states[-1])


def test_save_load_bit_identical_and_transformers_loads_it(case, tmp_path):
    name, hf, path = case
    model = load_pretrained(path)
    save_pretrained(model, tmp_path / "ours")
    again = load_pretrained(tmp_path / "ours")
    a, b = flat_params(model), flat_params(again)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
    cls = type(hf)
    reloaded = cls.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids, mask = padded_batch(hf.config.vocab_size, seed=1)
    ref, _ = hf_forward(hf, ids, mask)
    got, _ = hf_forward(reloaded, ids, mask)
    assert_close_valid(got, ref, mask, 1e-6, f"{name} transformers on our export")
    # every tensor transformers has came from our file: the state dicts agree exactly
    for k, v in hf.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k


def test_config_round_trip():
    for family, kw in CASES.values():
        cfg_cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        hf_cfg = cfg_cls(**{**TINY, **kw})
        ours = DecoderConfig.from_hf(hf_cfg.to_dict())
        again = DecoderConfig.from_hf(ours.to_hf())
        assert again.to_hf() == ours.to_hf()
        assert again == ours
        back = cfg_cls(**ours.to_hf())
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                    "tie_word_embeddings", "rope_parameters", "max_position_embeddings"):
            assert getattr(back, key) == getattr(hf_cfg, key), (family, kw, key)
        if family == "llama":  # Qwen2Config has no head_dim / bias fields
            assert back.head_dim == hf_cfg.head_dim
            assert (back.attention_bias, back.mlp_bias) == (hf_cfg.attention_bias, hf_cfg.mlp_bias)


@pytest.fixture()
def llama_dir(tmp_path):
    make_hf("llama").save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def _rewrite(src, dst, edit):
    tensors = read_safetensors_dir(src)
    edit(tensors)
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    write_safetensors(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor_is_named(llama_dir, tmp_path):
    bad = _rewrite(llama_dir, tmp_path / "bad", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"missing: +model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_pretrained(bad)


def test_misshaped_tensor_is_named(llama_dir, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]
    bad = _rewrite(llama_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped: +model\.layers\.0\.mlp\.up_proj\.weight"):
        load_pretrained(bad)


def test_a_tensor_with_the_wrong_rank_is_reported_as_mis_shaped(llama_dir, tmp_path):
    """A 1-D linear weight (the transpose has no second axis) or a 3-D one: reported in the
    CheckpointMismatchError with the others, not a bare numpy AxisError naming nothing."""
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][0]
        t["model.layers.1.self_attn.q_proj.weight"] = t["model.layers.1.self_attn.q_proj.weight"][None]
        t.pop("model.layers.1.self_attn.k_proj.weight")
    bad = _rewrite(llama_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)1 missing.*2 mis-shaped.*"
                       r"mis-shaped: +model\.layers\.0\.mlp\.up_proj\.weight: shape \(32,\).*"
                       r"mis-shaped: +model\.layers\.1\.self_attn\.q_proj\.weight: shape \(1, 32, 32\)"):
        load_pretrained(bad)


def test_a_broken_config_json_is_named(llama_dir, tmp_path):
    """Unparseable JSON, or a key the config cannot do without: the error names the file (was a
    bare JSONDecodeError / KeyError naming nothing)."""
    from mllm_jax.config import ConfigError
    bad = _rewrite(llama_dir, tmp_path / "bad", lambda t: None)
    text = (bad / "config.json").read_text()
    (bad / "config.json").write_text(text[:len(text) // 2])
    with pytest.raises(ConfigError, match=r"bad/config\.json: not valid JSON"):
        load_pretrained(bad)
    cfg = json.loads(text)
    cfg["model_type"], cfg["architectures"] = "llava", ["LlavaForConditionalGeneration"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"bad/config\.json: required key '(vision|text)_config' is missing"):
        load_pretrained(bad)
    cfg = json.loads(text)
    cfg["hidden_act"] = "relu2"     # an activation we do not have: refused when the model is built
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"bad/config\.json: activation 'relu2' is not supported"):
        load_pretrained(bad)


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    bad = _rewrite(llama_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: +model\.layers\.0\.self_attn\.q_norm\.weight"):
        load_pretrained(bad)


def test_sliding_window_qwen2_is_refused(tmp_path):
    hf = make_hf("qwen2")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["use_sliding_window"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_sliding_window"):
        load_pretrained(tmp_path)


def test_llava_with_a_sliding_window_text_model_is_refused():
    """The check lives in DecoderConfig.from_hf, so LLaVA's text_config gets it too (it loaded and
    attended past the window)."""
    from mllm_jax.config import ConfigError, MLLMConfig
    vis = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=4)
    txt = transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, use_sliding_window=True, sliding_window=3,
                                   max_window_layers=0)
    hf = transformers.LlavaConfig(vision_config=vis.to_dict(), text_config=txt.to_dict()).to_dict()
    with pytest.raises(ConfigError, match="sliding-window attention"):
        MLLMConfig.from_hf(hf)


def test_eos_id_list_round_trips():
    """A list eos_token_id stays a tuple of every id: in our config, its YAML form and to_hf."""
    import yaml
    from mllm_jax.config import DecoderConfig, from_dict, to_dict
    cfg = DecoderConfig.from_hf({**make_hf("llama").config.to_dict(), "eos_token_id": [5, 9]})
    assert cfg.eos_token_id == (5, 9) and cfg.to_hf()["eos_token_id"] == [5, 9]
    assert from_dict(DecoderConfig, yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg
    assert DecoderConfig.from_hf({**make_hf("llama").config.to_dict(), "eos_token_id": [7]}).eos_token_id == 7


@pytest.mark.parametrize("text_config", [
    # llava-hf/llava-1.5-7b-hf's text_config (transformers 4.x saved nested configs as a diff
    # against the class defaults): hidden_size, layers, heads, bos/eos are left out
    {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32064},
    {"vocab_size": 32064},                                   # model_type left out too: llama
    {"model_type": "qwen2", "hidden_size": 128, "num_attention_heads": 64},   # Qwen2: kv heads default 32
])
def test_abbreviated_llava_text_config_takes_transformers_defaults(text_config):
    """A LLaVA config.json whose text_config lists only non-default values loads with the values
    transformers fills in (it raised KeyError 'hidden_size')."""
    from mllm_jax.config import MLLMConfig
    hf = {"model_type": "llava", "image_token_index": 32000, "text_config": text_config,
          "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "num_attention_heads": 2}}
    ref = transformers.LlavaConfig(**hf).text_config
    ours = MLLMConfig.from_hf(hf).decoder
    assert ours == DecoderConfig.from_hf(ref.to_dict())
    assert (ours.hidden_size, ours.intermediate_size, ours.num_layers, ours.num_heads, ours.num_kv_heads,
            ours.bos_token_id, ours.eos_token_id) == (ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers,
                                                      ref.num_attention_heads, ref.num_key_value_heads,
                                                      ref.bos_token_id, ref.eos_token_id)
