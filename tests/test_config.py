"""Config machinery: YAML + overrides, errors that name the path, HF config round-trips."""
import dataclasses

import pytest
import yaml

from mllm_jax.config import (ConfigError, DecoderConfig, ExperimentConfig, MLLMConfig, OptimConfig, TextEncoderConfig,
                             VisionConfig, apply_overrides, apply_updates, config_hash, from_dict, load_config, save_config, to_dict)


def test_yaml_overrides_and_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"decoder": {"num_layers": 3, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                                 "vision": {"image_mean": [0.5, 0.5, 0.5]}}))
    cfg = load_config(p, MLLMConfig, overrides=["decoder.hidden_size=96", "lora.rank=4", "decoder.dtype=bfloat16"])
    assert cfg.decoder.num_layers == 3 and cfg.decoder.hidden_size == 96 and cfg.lora.rank == 4
    assert cfg.vision.image_mean == (0.5, 0.5, 0.5)  # list -> tuple
    assert cfg.decoder.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    again = load_config(out, MLLMConfig)
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(apply_overrides(cfg, ["lora.rank=8"])) != config_hash(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora = None  # type: ignore[misc]


@pytest.mark.parametrize("override, fragment", [
    ("decoder.num_layer=3", "did you mean 'num_layers'"),
    ("decoder.num_layers=2.5", "decoder.num_layers: expected an integer"),
    ("decoder.tie_word_embeddings=maybe", "expected true/false"),
    ("nokey", "expected key=value"),
    ("decoder.family=gpt2", "decoder.family"),
])
def test_override_errors_name_the_path(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides(MLLMConfig(), [override])


def test_unknown_yaml_key_names_file_and_path(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("decoder:\n  hidden_sise: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: decoder\.hidden_sise: unknown key.*hidden_size"):
        load_config(p, MLLMConfig)


def test_heads_must_divide_hidden_size():
    with pytest.raises(ConfigError, match="num_heads=5 does not divide hidden_size=64"):
        DecoderConfig(hidden_size=64, num_heads=5, num_kv_heads=5)
    with pytest.raises(ConfigError, match="num_kv_heads=3 must divide num_heads=4"):
        DecoderConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="vision: num_heads=3"):
        VisionConfig(hidden_size=64, num_heads=3)
    with pytest.raises(ConfigError, match="patch_size=5 does not divide image_size=32"):
        VisionConfig(patch_size=5)
    with pytest.raises(ConfigError, match="head_dim"):  # explicit head_dim lifts the restriction
        DecoderConfig(hidden_size=64, num_heads=6, num_kv_heads=2)
    assert DecoderConfig(hidden_size=64, num_heads=6, num_kv_heads=2, head_dim=16).resolved_head_dim == 16


def test_hf_config_roundtrip_through_transformers():
    """Our config -> HF dict -> transformers config object -> dict -> our config is the identity."""
    from transformers import BertConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config, SiglipVisionConfig

    llama = DecoderConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=6,
                          num_kv_heads=2, rope_theta=5e5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
    assert DecoderConfig.from_hf(LlamaConfig(**llama.to_hf()).to_dict()) == llama
    qwen = DecoderConfig(family="qwen2", attention_bias=True, vocab_size=90, hidden_size=32, num_heads=4, num_kv_heads=2)
    assert DecoderConfig.from_hf(Qwen2Config(**qwen.to_hf()).to_dict()) == qwen
    clip = VisionConfig(image_size=30, patch_size=6, hidden_size=48, num_heads=4)
    assert VisionConfig.from_hf(CLIPVisionConfig(**clip.to_hf()).to_dict()) == clip
    sig = VisionConfig.from_hf(SiglipVisionConfig(hidden_size=32, num_attention_heads=2, image_size=16, patch_size=4,
                                                  intermediate_size=40, num_hidden_layers=1).to_dict())
    assert sig.variant == "siglip" and sig.hidden_act == "gelu_pytorch_tanh" and sig.image_mean == (0.5, 0.5, 0.5)
    assert VisionConfig.from_hf(SiglipVisionConfig(**sig.to_hf()).to_dict()) == sig
    bert = TextEncoderConfig(vocab_size=77, hidden_size=32, num_heads=4)
    assert TextEncoderConfig.from_hf(BertConfig(**bert.to_hf()).to_dict()) == bert
    mllm = MLLMConfig(vision=clip, decoder=llama, image_token_id=99)
    hf = mllm.to_hf()
    hf_obj = LlavaConfig(vision_config=hf["vision_config"], text_config=hf["text_config"],
                         image_token_index=99, vision_feature_layer=-2)
    assert MLLMConfig.from_hf(hf_obj.to_dict()) == mllm


def test_from_dict_nested_and_to_dict():
    d = {"decoder": {"num_layers": 1}, "projector": {"kind": "pool", "pool_size": 2}}
    cfg = from_dict(MLLMConfig, d)
    assert cfg.tokens_per_image == 4
    assert from_dict(MLLMConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="projector.kind"):
        from_dict(MLLMConfig, {"projector": {"kind": "qformer"}})


def test_overrides_are_validated_together_in_any_order():
    """Coupled fields change together: each override alone would be invalid on the defaults."""
    base = MLLMConfig(decoder=DecoderConfig(hidden_size=64, num_heads=8, num_kv_heads=8),
                      vision=VisionConfig(image_size=28, patch_size=14, hidden_size=64, num_heads=4))
    new = apply_overrides(base, ["decoder.num_heads=4", "decoder.num_kv_heads=4",
                                 "vision.image_size=64", "vision.patch_size=8"])
    assert (new.decoder.num_heads, new.decoder.num_kv_heads) == (4, 4)
    assert (new.vision.image_size, new.vision.patch_size) == (64, 8)
    assert new.decoder.hidden_size == 64 and new.vision.hidden_size == 64     # untouched fields kept
    with pytest.raises(ConfigError, match=r"override decoder\.num_heads: .*num_kv_heads=8 must divide num_heads=4"):
        apply_overrides(base, ["decoder.num_heads=4"])
    with pytest.raises(ConfigError, match="'x' is below a non-config value"):
        apply_overrides(base, ["decoder.hidden_size.x=1"])
    both = apply_updates(base, {"decoder": DecoderConfig(hidden_size=32, num_heads=2, num_kv_heads=2),
                                "decoder.num_layers": 5})        # a whole sub-config, then a key below it
    assert (both.decoder.hidden_size, both.decoder.num_heads, both.decoder.num_layers) == (32, 2, 5)


def test_a_mapping_merges_into_a_sub_config(tmp_path):
    """``train.optim={lr: 0.001}`` changes ``lr`` only: the YAML's other optim fields stay, as
    with ``train.optim.lr=0.001``; a config instance replaces the whole sub-config."""
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"steps": 7, "optim": {"lr": 0.01, "warmup_steps": 50, "weight_decay": 0.1}},
                                 "objective": {"options": {"a": 1}}}))
    cfg = load_config(p, ExperimentConfig, ["train.optim={lr: 0.001}"])
    assert (cfg.train.optim.lr, cfg.train.optim.warmup_steps, cfg.train.optim.weight_decay) == (0.001, 50, 0.1)
    assert cfg == load_config(p, ExperimentConfig, ["train.optim.lr=0.001"])
    nested = load_config(p, ExperimentConfig, ["train={optim: {b1: 0.8}, checkpoint: {keep_last: 5}}"])
    assert (nested.train.steps, nested.train.optim.lr, nested.train.optim.warmup_steps) == (7, 0.01, 50)
    assert (nested.train.optim.b1, nested.train.checkpoint.keep_last) == (0.8, 5)
    with pytest.raises(ConfigError, match=r"train\.optim\.lrr: unknown key 'lrr' in OptimConfig; did you mean 'lr'"):
        load_config(p, ExperimentConfig, ["train.optim={lrr: 0.001}"])
    base = load_config(p, ExperimentConfig)
    replaced = apply_updates(base, {"train.optim": OptimConfig(lr=0.5)})
    assert replaced.train.optim == OptimConfig(lr=0.5) and replaced.train.steps == 7
    assert apply_updates(base, {"eval_data": {"split": "val"}}).eval_data.split == "val"   # None: built from defaults
    assert apply_updates(base, {"objective.options": {"b": 2}}).objective.options == {"b": 2}  # a dict field is a value


@pytest.mark.parametrize("override", ["train.run_dir=gs://bucket/run", "train.checkpoint.dir=s3://b/ckpt",
                                      "train.init_from=gs://bucket/run/stage1"])
def test_remote_uris_are_refused_by_name(override):
    """A ``gs://`` run dir would become a local folder ``gs:`` (pathlib), lost with the VM."""
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.") + ".*remote URI.*mount"):
        apply_overrides(ExperimentConfig(), [override])


def test_checkpointer_refuses_a_remote_uri():
    from mllm_jax.train.checkpoint import Checkpointer
    with pytest.raises(ConfigError, match="remote URI"):
        Checkpointer("gs://bucket/run/checkpoints")


def test_exponent_floats_are_numbers_in_yaml_and_overrides(tmp_path):
    """PyYAML's safe loader (YAML 1.1) reads ``1e-3`` as the string "1e-3": inside a free-form
    mapping nothing converted it. Config files and overrides read it as 0.001 (YAML 1.2, JSON);
    strings and ints stay what they were."""
    assert yaml.safe_load("x: 1e-3") == {"x": "1e-3"}  # the behaviour this guards against
    p = tmp_path / "c.yaml"
    p.write_text("data_options: {eps: 1e-3, big: 2E+4, neg: -5e-1, dotted: 1.5e-2, n: 12, name: 1e3x, v: '1e-3'}\n"
                 "objective: {options: {tau: 1.0}}\n")
    cfg = load_config(p, ExperimentConfig, overrides=["train.optim.lr=3e-4", "objective.options={tau: 5e-2}"])
    assert cfg.data_options == {"eps": 0.001, "big": 20000.0, "neg": -0.5, "dotted": 0.015, "n": 12,
                                "name": "1e3x", "v": "1e-3"}
    assert type(cfg.data_options["big"]) is float and type(cfg.data_options["n"]) is int
    assert cfg.objective.options == {"tau": 0.05} and cfg.train.optim.lr == 3e-4


def test_a_saved_string_that_looks_like_an_exponent_float_loads_back_as_the_string(tmp_path):
    """save_config wrote the string "1e3" unquoted (PyYAML's dumper knows only YAML 1.1 floats);
    load_config then read it as 1000.0: a str field raised ConfigError and a free-form value changed."""
    cfg = dataclasses.replace(ExperimentConfig(), name="1e3", data_options={"v": "2E-4", "x": 1e-3})
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml", ExperimentConfig)
    assert back.name == "1e3" and back.data_options == {"v": "2E-4", "x": 1e-3}


def test_integers_read_as_yaml_1_2_reads_them(tmp_path):
    """YAML 1.1 (PyYAML) read ``train.steps=010`` as octal 8 and ``1:30`` as the base-60 integer
    90, without a word; ``-.5e-4`` stayed a string. Now as YAML 1.2: 10, the string "1:30", a
    float; and saved strings that look like numbers load back as the strings."""
    assert yaml.safe_load("[010, 1:30, -.5e-4]") == [8, 90, "-.5e-4"]  # what this guards against
    cfg = apply_overrides(ExperimentConfig(), ["train.steps=010", "data_options={a: 1:30, b: -.5e-4, c: 10_000, "
                                               "d: 0x10, e: -07}"])
    assert cfg.train.steps == 10
    assert cfg.data_options == {"a": "1:30", "b": -5e-5, "c": 10000, "d": 16, "e": -7}
    with pytest.raises(ConfigError, match="train.steps"):
        apply_overrides(ExperimentConfig(), ["train.steps=1:30"])
    saved = dataclasses.replace(ExperimentConfig(), data_options={"s": "010", "t": "1:30", "u": ".5e3"})
    save_config(saved, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", ExperimentConfig).data_options == {"s": "010", "t": "1:30", "u": ".5e3"}


@pytest.mark.parametrize("layer", [-5, 4])
def test_vision_feature_layer_out_of_range_is_refused(layer):
    """A 3-layer tower has hidden states 0..3 (or -1..-4): another index failed only when the
    model ran, and plan counted negative or extra vision FLOPs for it."""
    with pytest.raises(ConfigError, match=f"model.vision_feature_layer: {layer}; the vision tower has 3 layers"):
        MLLMConfig(vision=VisionConfig(num_layers=3), vision_feature_layer=layer)
    for ok in (-4, -1, 0, 3):
        MLLMConfig(vision=VisionConfig(num_layers=3), vision_feature_layer=ok)


@pytest.mark.parametrize("tasks, fragment", [(("vqa:-2", "pope:1"), "'vqa:-2'; a weight is a count >= 0"),
                                             (("vqa:1", "pope:1", "vqa:3"), "'vqa' is listed twice")])
def test_task_weights_refuse_negative_and_repeated_tasks(tasks, fragment):
    """A negative weight left the task out of the scene source's task table, and a repeated
    task's second weight replaced the first, both without a word."""
    from mllm_jax.config import DataConfig
    with pytest.raises(ConfigError, match=fragment):
        DataConfig(tasks=tasks).task_weights()
    assert DataConfig(tasks=("vqa:0", "pope", "caption_short:2")).task_weights() == {"vqa": 0, "pope": 1, "caption_short": 2}


@pytest.mark.parametrize("select", ["Full", "cls", "defualt"])
def test_unknown_vision_feature_select_is_refused(select, tmp_path):
    """Only 'default' (drop CLS) and 'full' exist: another value was accepted and then counted as
    neither: tokens_per_image said num_patches (not 'full') while the model kept the CLS token (not
    'default'), so 65 features went into 64 image slots and the last patch was dropped silently."""
    with pytest.raises(ConfigError, match=f"model.vision_feature_select: '{select}'; expected 'default'"):
        MLLMConfig(vision_feature_select=select)
    path = tmp_path / "c.yaml"
    path.write_text("model: {vision_feature_select: full}\n")
    assert load_config(path, ExperimentConfig).model.vision_feature_select == "full"
    with pytest.raises(ConfigError, match="model.vision_feature_select"):
        load_config(path, ExperimentConfig, overrides=[f"model.vision_feature_select={select}"])
    hf = {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model", "num_hidden_layers": 2},
          "text_config": {"model_type": "llama"}, "vision_feature_select_strategy": select}
    with pytest.raises(ConfigError, match="vision_feature_select"):
        MLLMConfig.from_hf(hf)


def test_config_hash_leaves_out_preprocessing_fields_at_their_defaults():
    """VisionConfig.resize_shortest_edge / resample (added later) count in config_hash only when
    set, so the hashes of configs that do not set them (and the caches keyed by them) are those
    they had before: the hash of the dict without the two keys."""
    import hashlib
    import json
    cfg = MLLMConfig()
    d = to_dict(cfg)
    assert d["vision"].pop("resize_shortest_edge") is None and d["vision"].pop("resample") == "bilinear"
    old = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert config_hash(cfg) == old
    assert config_hash(apply_overrides(cfg, ["vision.resample=bicubic"])) != old
    assert config_hash(apply_overrides(cfg, ["vision.resize_shortest_edge=36"])) != old


def test_a_dotted_override_below_an_unset_optional_config_says_so():
    """eval_data is None by default: 'eval_data.split=val' said "'split' is below a non-config
    value"; now it says eval_data is not set and how to give it, and that form works."""
    from mllm_jax.config import apply_overrides
    with pytest.raises(ConfigError, match=r"override eval_data.split: eval_data is not set \(None\).*"
                                          r"eval_data='\{split: \.\.\.\}'"):
        apply_overrides(ExperimentConfig(), ["eval_data.split=val"])
    cfg = apply_overrides(ExperimentConfig(), ["eval_data={split: val}", "eval_data.batch_size=2"])
    assert (cfg.eval_data.split, cfg.eval_data.batch_size) == ("val", 2)


@pytest.mark.parametrize("overrides, lr, layers", [
    (["train.optim.lr=0.1", "train.optim={lr: 0.2}", "train.optim.lr=0.3"], 0.3, 2),
    (["model.decoder={num_layers: 3}", "model.decoder.num_layers=4", "model.decoder={num_layers: 8}"], 1e-3, 8),
    (["train.optim={lr: 0.2, warmup_steps: 5}", "train.optim={lr: 0.3}"], 0.3, 2),
])
def test_a_repeated_override_key_wins_where_it_stands(overrides, lr, layers):
    """parse_overrides kept a repeated key at its first position (a dict): an override given
    again after a mapping that set the same field lost to that mapping, silently."""
    from mllm_jax.config import parse_overrides
    cfg = apply_overrides(ExperimentConfig(), overrides)
    assert cfg.train.optim.lr == lr and cfg.model.decoder.num_layers == layers
    if len(set(o.split("=")[0] for o in overrides)) > 1:  # the dict keeps one mapping per key
        assert apply_updates(ExperimentConfig(), parse_overrides(overrides)) == cfg
    if "warmup_steps: 5" in overrides[0]:
        assert cfg.train.optim.warmup_steps == 5


@pytest.mark.parametrize("override", ["train.optim.trainable=[a, b", "name=a: b: c", "name=@x"])
def test_an_override_that_is_not_yaml_names_the_key(override):
    """A malformed value (an unclosed list) raised yaml's ScannerError: a traceback on the
    command line, naming no override."""
    with pytest.raises(ConfigError, match=r"override .*invalid YAML value"):
        apply_overrides(ExperimentConfig(), [override])


@pytest.mark.parametrize("text", ["tiny\n", "- train\n", "3\n", "0\n", "false\n"])
def test_a_config_file_that_is_not_a_mapping_says_so(text, tmp_path):
    """A file holding a scalar or a list was iterated as if it were a mapping: 'tiny' failed
    with "t: unknown key for ExperimentConfig"."""
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=r"c\.yaml: expected a mapping of ExperimentConfig fields"):
        load_config(p, ExperimentConfig)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, ExperimentConfig)
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert load_config(tmp_path / "empty.yaml", ExperimentConfig) == ExperimentConfig()   # an empty file: defaults
