"""Multi-stage recipes: InfMLLM's three stages on the toy MLLM (vision -> projector -> decoder),
each starting from the previous stage's checkpoint, with what trains checked param by param."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from mllm_jax.config import ConfigError, ExperimentConfig, StageConfig, apply_updates, load_config
from mllm_jax.train.checkpoint import Checkpointer
from mllm_jax.train.experiment import train_recipe
from mllm_jax.train.optim import build_optimizer
from mllm_jax.train.stages import StageHandoverError, infmllm_stages, load_params_into, stage_config, stage_configs
from mllm_jax.train.state import create_train_state
from tests.toy import (TOY_LM, TOY_MLLM, fit_toy, one_device_mesh, params_np, tiny_experiment, tiny_mllm_experiment,
                       toy_data)

ROOT = Path(__file__).resolve().parents[2]


def _fresh_state(cfg, spec):
    tx, _ = build_optimizer(cfg.train.optim, cfg.train.steps)
    return create_train_state(lambda: spec.build(cfg, nnx.Rngs(cfg.train.seed)), tx, cfg.train.optim,
                              one_device_mesh(), seed=cfg.train.seed)


def _group(params, prefix):
    return {k: v for k, v in params.items() if k.startswith(prefix) and ".lora." not in k}


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def _all_changed(a, b, suffix=".kernel"):
    return all(not np.array_equal(a[k], b[k]) for k in a if k.endswith(suffix))


@pytest.mark.slow  # > 5 s on 2 cores: `make test-slow`
def test_infmllm_three_stages_train_what_each_stage_says(tmp_path):
    """Each stage trains exactly what the recipe says; at the stage 2 -> 3 hand-over the LoRA
    is folded into the LLM exactly (same logits)."""
    stages = infmllm_stages(steps=(2, 2, 2), lr=(1e-2, 1e-2, 1e-2), lora_rank=4, lora_alpha=8)
    cfg = dataclasses.replace(tiny_mllm_experiment(**{"train.run_dir": str(tmp_path / "run")}), stages=stages)
    s1, s2, s3 = train_recipe(cfg, mesh=one_device_mesh())
    p0 = params_np(_fresh_state(stage_config(cfg, stages[0], None), TOY_MLLM)[0])
    p1, p2, p3 = params_np(s1.state), params_np(s2.state), params_np(s3.state)

    # stage 1: only the adapter moves
    assert _same(_group(p0, "vision."), _group(p1, "vision.")) and _same(_group(p0, "decoder."), _group(p1, "decoder."))
    assert _all_changed(_group(p0, "projector."), _group(p1, "projector."))
    # stage 2: ViT + adapter + LoRA on q, v; the LLM's own weights are those stage 1 ended with
    lora = {k for k in p2 if ".lora." in k}
    assert lora and all(k.startswith("decoder.") and (".q_proj." in k or ".v_proj." in k) for k in lora)
    assert all(np.any(p2[k] != 0) for k in lora if k.endswith(".b"))  # b starts at 0
    assert _same(_group(p1, "decoder."), _group(p2, "decoder."))
    assert _all_changed(_group(p1, "vision."), _group(p2, "vision."))
    assert _all_changed(_group(p1, "projector."), _group(p2, "projector."))
    # stage 3: ViT frozen, LLM fully trained, the LoRA merged away
    assert not any(".lora." in k for k in p3)
    assert _same(_group(p2, "vision."), _group(p3, "vision."))
    assert _all_changed(_group(p2, "decoder.layers"), _group(p3, "decoder.layers"))
    assert s3.checkpoint_dir == tmp_path / "run" / "instruct" / "checkpoints"

    # the hand-over: stage 3's model as initialised from stage 2's checkpoint computes stage 2's logits
    cfg3 = stage_config(cfg, stages[2], str(tmp_path / "run" / "multitask")).resolved()
    fresh, shardings = _fresh_state(cfg3, TOY_MLLM)
    merged = load_params_into(fresh, shardings, tmp_path / "run" / "multitask" / "checkpoints")
    batch = next(toy_data(cfg3, split="eval"))

    def logits(state):
        return np.asarray(state.model()(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits)
    np.testing.assert_allclose(logits(merged), logits(s2.state), atol=1e-5, rtol=0)
    assert not np.allclose(logits(fresh), logits(s2.state), atol=1e-3)


def test_handover_to_a_different_model_names_what_does_not_fit(tmp_path):
    mllm = TOY_MLLM.build(tiny_mllm_experiment(), nnx.Rngs(0))
    ck = Checkpointer(tmp_path / "mllm")
    ck.save_params(0, {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(mllm, nnx.Param))})
    ck.close()
    state, shardings = _fresh_state(tiny_experiment(), TOY_LM)
    with pytest.raises(StageHandoverError, match=r"missing:\s+embed_tokens.embedding(.|\n)*unexpected:\s+decoder\."):
        load_params_into(state, shardings, tmp_path / "mllm")


def test_infmllm_yaml_recipe_resolves_to_its_three_stages():
    cfg = load_config(ROOT / "experiments/configs/infmllm_3stage.yaml", ExperimentConfig)
    assert [s.name for s in cfg.stages] == ["align", "multitask", "instruct"]
    resolved, prev = [], None
    for s in cfg.stages:
        resolved.append(stage_config(cfg, s, prev))
        prev = resolved[-1].train.run_dir
    a, m, i = resolved
    assert a.train.init_from is None and m.train.init_from == "runs/infmllm/align"
    assert i.train.run_dir == "runs/infmllm/instruct" and i.train.init_from == "runs/infmllm/multitask"
    assert a.train.optim.trainable == (r"^projector\.",) and a.model.lora.rank == 0
    assert a.train.init_fresh == (r"^projector\.",) and m.train.init_fresh == () == i.train.init_fresh
    assert m.model.lora.rank == 8 and r"\.lora\." in m.train.optim.trainable
    assert i.model.lora.rank == 0 and r"^decoder\." in i.train.optim.trainable
    assert i.model.projector.kind == "pool" and i.model.tokens_per_image == 64
    # the recipe in code says the same
    code = infmllm_stages(steps=(2000, 10000, 5000), lr=(1e-3, 1e-4, 2e-5))
    for s_yaml, s_code in zip(cfg.stages, code):
        assert list(s_yaml.updates["train.optim.trainable"]) == list(s_code.updates["train.optim.trainable"])
        assert s_yaml.updates["model.lora.rank"] == s_code.updates["model.lora.rank"]
        assert s_yaml.updates.get("train.init_fresh") == s_code.updates.get("train.init_fresh")


def test_command_line_overrides_win_over_stage_updates():
    """``train --config infmllm_3stage.yaml train.steps=3``: every stage runs 3 steps, although
    each stage's updates set its own ``train.steps``; keys the user did not give keep the recipe's."""
    from mllm_jax.config import parse_overrides
    args = ["train.steps=3", "model.decoder.num_heads=4", "model.decoder.num_kv_heads=4"]
    overrides = parse_overrides(args)
    cfg = load_config(ROOT / "experiments/configs/infmllm_3stage.yaml", ExperimentConfig, overrides=args)
    stages = [stage_config(cfg, s, None, overrides) for s in cfg.stages]
    assert [s.train.steps for s in stages] == [3, 3, 3]
    assert [s.train.optim.lr for s in stages] == [1e-3, 1e-4, 2e-5]          # from the recipe
    assert all(s.model.decoder.num_heads == 4 for s in stages)
    assert [s.train.steps for s in (stage_config(cfg, s, None) for s in cfg.stages)] == [2000, 10000, 5000]



def test_stage_mapping_updates_merge_into_the_config():
    """A stage's ``{"train.optim": {...}}`` merges into the experiment's optim, and a command-line
    mapping for the same key merges over the stage's (not the stage's mapping replaced)."""
    base = apply_updates(ExperimentConfig(), {"train.optim.warmup_steps": 50, "train.optim.weight_decay": 0.1})
    stage = StageConfig("s", {"train.optim": {"lr": 1e-4, "b1": 0.8}})
    optim = stage_config(base, stage, None).train.optim
    assert (optim.lr, optim.b1, optim.warmup_steps, optim.weight_decay) == (1e-4, 0.8, 50, 0.1)
    optim = stage_config(base, stage, None, {"train.optim": {"lr": 3e-4}}).train.optim
    assert (optim.lr, optim.b1, optim.warmup_steps, optim.weight_decay) == (3e-4, 0.8, 50, 0.1)


_PARTS = {"vision": "ckpt/clip"}


@pytest.mark.parametrize("own", [
    {"train.init_parts": _PARTS},
    {" train.init_parts ": _PARTS, "train.steps": 5},
    {"train": {"init_parts": _PARTS, "steps": 5}},
    {"train": dataclasses.replace(ExperimentConfig().train, init_parts=_PARTS)},
])
def test_a_chained_stage_refuses_the_init_parts_its_own_updates_set(own):
    """A chained stage (init_from_previous, after another stage) runs with train.init_parts
    empty. One its own updates set, in any form apply_updates takes, was silently dropped: now a
    ConfigError naming the stage. The same updates on a first or unchained stage load."""
    base = ExperimentConfig()
    with pytest.raises(ConfigError, match=r"stage 'two': train\.init_parts=\{'vision': 'ckpt/clip'\} is set by its "
                                          r"updates.*runs/one.*only the first stage of a recipe, or a stage with "
                                          r"init_from_previous: false, loads train\.init_parts"):
        stage_config(base, StageConfig("two", own), "runs/one")
    assert stage_config(base, StageConfig("one", own), None).train.init_parts == _PARTS
    unchained = stage_config(base, StageConfig("two", own, init_from_previous=False), "runs/one")
    assert unchained.train.init_parts == _PARTS and unchained.train.init_from is None
    recipe = dataclasses.replace(base, stages=(StageConfig("one"), StageConfig("two", own)))
    with pytest.raises(ConfigError, match="stage 'two'"):
        stage_configs(recipe)


def test_a_chained_stage_clears_inherited_init_parts_silently():
    """The base config's init_parts (the recipe's pretrained parts) are the first stage's: a
    chained stage clears them without a word, as it does those of overrides given for the whole
    recipe (the command line's, also applied to the base); a stage that empties them itself, or
    whose own value the recipe-wide overrides replace, is fine."""
    base = apply_updates(ExperimentConfig(), {"train.init_parts": _PARTS})
    chained = stage_config(base, StageConfig("two", {"train.steps": 5}), "runs/one")
    assert chained.train.init_parts == {} and chained.train.init_from == "runs/one"
    assert stage_config(base, StageConfig("two", {"train.init_parts": {}}), "runs/one").train.init_parts == {}
    wide = {"train.init_parts": {"decoder": "ckpt/llm"}}
    assert stage_config(base, StageConfig("two", {"train.init_parts": _PARTS}), "runs/one",
                        wide).train.init_parts == {}
    recipe = dataclasses.replace(ExperimentConfig(), stages=(StageConfig("one"), StageConfig("two"),
                                                             StageConfig("three", {"train.steps": 5})))
    got = [c.train.init_parts for _, c in stage_configs(recipe, overrides=wide)]
    assert got == [{"decoder": "ckpt/llm"}, {}, {}]


def test_command_line_init_parts_are_the_first_stages_also_with_one_stage_named():
    """The command line's overrides apply to every stage (the CLI applies them to the base and
    to each stage): their init_parts are the first stage's, and rerunning one chained stage with
    the same command line (``--stage two``) clears them rather than failing."""
    recipe = dataclasses.replace(ExperimentConfig(), stages=(StageConfig("one"), StageConfig("two")))
    wide = {"train": {"init_parts": _PARTS}}
    [(_, two)] = stage_configs(recipe, only="two", overrides=wide)
    assert two.train.init_parts == {} and two.train.init_from.endswith("one")
    [(_, one)] = stage_configs(recipe, only="one", overrides=wide)
    assert one.train.init_parts == _PARTS


def test_run_stages_checks_every_stage_first_and_stops_after_a_preempted_one(tmp_path):
    """A typo in a later stage's updates fails before any stage trains; a stage that was
    preempted (SIGTERM) is not followed by the next stage, which would start from its unfinished
    checkpoint (rerunning the recipe resumes it)."""
    from types import SimpleNamespace
    from mllm_jax.config import ConfigError
    from mllm_jax.train.stages import StageConfig, run_stages
    base = tiny_experiment(**{"train.run_dir": str(tmp_path)})
    ran = []

    def run_one(scfg):
        ran.append(scfg.name.split("/")[-1])
        return SimpleNamespace(status="preempted" if ran[-1] == "b" else "completed")
    typo = dataclasses.replace(base, stages=(StageConfig("a", {"train.steps": 3}),
                                             StageConfig("b", {"train.optim.lrr": 1e-4})))
    with pytest.raises(ConfigError, match="lrr"):
        run_stages(typo, run_one)
    assert ran == []
    three = dataclasses.replace(base, stages=tuple(StageConfig(n, {"train.steps": 3}, init_from_previous=True)
                                                   for n in "abc"))
    assert [r.status for r in run_stages(three, run_one)] == ["completed", "preempted"] and ran == ["a", "b"]


def test_eval_of_one_stage_of_a_recipe(tmp_path):
    """``eval --config recipe.yaml --checkpoint RUN/<stage>`` restores with the config that stage
    trained with (another freeze mask: the recipe's own config gave a different optimiser state
    and the restore failed)."""
    from mllm_jax.config import StageConfig
    from mllm_jax.train.experiment import evaluate_checkpoint
    cfg = dataclasses.replace(tiny_experiment(**{"train.run_dir": str(tmp_path), "train.steps": 2}), stages=(
        StageConfig("a", {}), StageConfig("b", {"train.optim.trainable": [r"^layers\.0\.mlp\."]})))
    train_recipe(cfg, mesh=one_device_mesh())
    here = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, fsdp=-1))    # this machine's 8 devices
    out = evaluate_checkpoint(here, str(tmp_path / "b"), steps=1)
    assert out["step"] == 2 and np.isfinite(out["eval/loss"])
    # the command line's overrides reach the stage's config (they were dropped without a word)
    from mllm_jax.config import ConfigError
    with pytest.raises(ConfigError, match="eval_stepz"):
        evaluate_checkpoint(here, str(tmp_path / "b"), steps=1, overrides=["train.eval_stepz=1"])
    with pytest.raises(FileNotFoundError, match="one stage's run"):
        evaluate_checkpoint(here, str(tmp_path), steps=1)


def test_handover_from_a_bfloat16_checkpoint_keeps_float32_params(tmp_path):
    """init_from a checkpoint saved in bfloat16 (e.g. converted weights): the params keep the
    model's float32 (they took the checkpoint's dtype: training would have run on bf16 params)."""
    import jax.numpy as jnp
    cfg = tiny_experiment()
    state, shardings = _fresh_state(cfg, TOY_LM)
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in params_np(state).items()}
    ck = Checkpointer(tmp_path / "ck")
    ck.save_params(1, bf16)
    ck.close()
    new = params_np(load_params_into(state, shardings, tmp_path / "ck"))
    for k, v in new.items():
        assert v.dtype == np.float32, k
        np.testing.assert_array_equal(v, np.asarray(bf16[k], np.float32))


def test_init_fresh_puts_a_new_adapter_between_pretrained_vision_and_decoder(tmp_path):
    """train.init_fresh: a checkpoint whose projector has another layout (an MLP projector's
    names and shapes, as a converted LLaVA's) starts a model whose vision tower and decoder are
    loaded and whose projector keeps its fresh init; without it, the hand-over names the
    projector's params; a regex that matches nothing is refused as a likely typo."""
    cfg = tiny_mllm_experiment()
    src = params_np(_fresh_state(cfg, TOY_MLLM)[0])
    saved = {k: v for k, v in src.items() if not k.startswith("projector.")}
    saved["projector.linear_1.kernel"] = np.ones((16, 7), np.float32)       # not this model's adapter
    saved["projector.linear_2.kernel"] = np.ones((7, 32), np.float32)
    ck = Checkpointer(tmp_path / "llava")
    ck.save_params(0, saved)
    ck.close()
    state, shardings = _fresh_state(tiny_mllm_experiment(**{"train.seed": 1}), TOY_MLLM)
    before = params_np(state)
    new = params_np(load_params_into(state, shardings, tmp_path / "llava", [r"^projector\."]))
    assert new.keys() == before.keys() and any(k.startswith("projector.") for k in new)
    for k in new:
        want = before[k] if k.startswith("projector.") else src[k]
        np.testing.assert_array_equal(new[k], want, err_msg=k)
    assert not _same(_group(before, "decoder."), _group(src, "decoder."))    # the seeds differ: not vacuous
    with pytest.raises(StageHandoverError, match=r"missing:\s+projector\.(.|\n)*unexpected:\s+projector\.linear_1"):
        load_params_into(state, shardings, tmp_path / "llava")
    with pytest.raises(StageHandoverError, match=r"init_fresh: \['\^projektor'\] match no param"):
        load_params_into(state, shardings, tmp_path / "llava", ["^projektor"])


def test_a_converted_llava_starts_a_pool_adapter_model(tmp_path):
    """InfMLLM stage 1 from a LLaVA (as infmllm_3stage.yaml describes): transformers' LLaVA saved,
    converted (`convert --from-hf`), loaded into the same ViT + LLM with a pool-adapter: every
    vision and decoder param is the converted one, the adapter keeps its init."""
    import dataclasses
    import json

    from mllm_jax.cli import main
    from mllm_jax.config import ExperimentConfig, MLLMConfig, ProjectorConfig
    from mllm_jax.convert.hf import flat_params, load_pretrained
    from mllm_jax.train.registry import model_spec
    from tests.models.test_mllm import _hf_llava
    _hf_llava().save_pretrained(tmp_path / "hf")       # CLIP, feature layer -2, an MLP projector
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
    llava = flat_params(load_pretrained(tmp_path / "hf"))
    mcfg = MLLMConfig.from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    mcfg = dataclasses.replace(mcfg, projector=ProjectorConfig(kind="pool", pool_size=2))
    cfg = dataclasses.replace(ExperimentConfig(), model_name="mllm", model=mcfg)
    state, shardings = _fresh_state(cfg, model_spec("mllm"))
    before = params_np(state)
    new = params_np(load_params_into(state, shardings, tmp_path / "ck", [r"^projector\."]))
    # the pool-adapter's MLP has the LLaVA projector's names and shapes: fresh, not loaded
    assert not np.array_equal(new["projector.linear_1.kernel"], np.asarray(llava["projector.linear_1.kernel"]))
    for k, v in new.items():
        want = before[k] if k.startswith("projector.") else np.asarray(llava[k])
        np.testing.assert_array_equal(v, want, err_msg=k)


def _save(path, params):
    ck = Checkpointer(path)
    ck.save_params(0, params)
    ck.close()


def test_init_parts_load_each_part_from_its_own_checkpoint(tmp_path):
    """train.init_parts through fit: the vision tower from a checkpoint of the tower alone, the
    decoder from a whole model's checkpoint (its other params dropped), the projector keeps its
    fresh init; a part's checkpoint that does not fit names the part; a part the model lacks is
    refused; a stage chained to the previous one does not reload the parts."""
    a = params_np(_fresh_state(tiny_mllm_experiment(**{"train.seed": 1}), TOY_MLLM)[0])
    b = params_np(_fresh_state(tiny_mllm_experiment(**{"train.seed": 2}), TOY_MLLM)[0])
    _save(tmp_path / "tower", {k[len("vision."):]: v for k, v in a.items() if k.startswith("vision.")})
    _save(tmp_path / "whole", b)
    cfg = tiny_mllm_experiment(**{"train.run_dir": str(tmp_path / "run"), "train.steps": 0,
                                  "train.init_parts": {"vision": str(tmp_path / "tower"),
                                                       "decoder": str(tmp_path / "whole")}})
    new = params_np(fit_toy(cfg).state)
    fresh = params_np(_fresh_state(cfg, TOY_MLLM)[0])
    assert not _same(_group(a, "vision."), _group(b, "vision."))           # the seeds differ: not vacuous
    for k, v in new.items():
        want = a[k] if k.startswith("vision.") else b[k] if k.startswith("decoder.") else fresh[k]
        np.testing.assert_array_equal(v, want, err_msg=k)

    state, shardings = _fresh_state(cfg, TOY_MLLM)
    with pytest.raises(StageHandoverError, match=r"under 'decoder' \(\d+ missing(.|\n)*unexpected:\s+decoder\.patch_embed"):
        load_params_into(state, shardings, tmp_path / "tower", prefix="decoder")
    with pytest.raises(StageHandoverError, match=r"no params under 'vison'"):
        load_params_into(state, shardings, tmp_path / "tower", prefix="vison")
    stages = apply_updates(cfg, {"stages": [{"name": "one"}, {"name": "two"}]})
    (_, first), (_, second) = stage_configs(stages)
    assert first.train.init_parts == cfg.train.init_parts and second.train.init_parts == {}
    for bad, msg in ((3, "expected a checkpoint or run dir"), ("gs://b/clip", "gs://")):
        with pytest.raises(ConfigError, match=rf"train\.init_parts\.vision.*{msg}"):
            tiny_mllm_experiment(**{"train.init_parts": {"vision": bad}})


def test_init_parts_from_converted_clip_and_llama(tmp_path, capsys):
    """InfMLLM stage 1 from a ViT and an LLM saved separately by transformers (CLIPVisionModel,
    LlamaForCausalLM), each converted with `convert --from-hf` (which says how to start from
    them: init_parts, and for an LLM also an LLM run's init_from): every vision and decoder param
    of the pool-adapter MLLM is the converted one, the adapter keeps its init."""
    import dataclasses

    import torch
    import transformers

    from mllm_jax.cli import main
    from mllm_jax.config import ExperimentConfig, MLLMConfig, ProjectorConfig
    from mllm_jax.convert.hf import flat_params, load_pretrained
    from mllm_jax.train.registry import model_spec
    torch.manual_seed(0)
    vis = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=16, patch_size=4)
    txt = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, eos_token_id=2)
    transformers.CLIPVisionModel(vis).save_pretrained(tmp_path / "hf_clip")
    transformers.LlamaForCausalLM(txt).save_pretrained(tmp_path / "hf_llama")
    for name in ("clip", "llama"):
        assert main(["convert", "--from-hf", str(tmp_path / f"hf_{name}"), "--out", str(tmp_path / name)]) == 0
    out = capsys.readouterr().out
    assert f"train.init_parts='{{vision: {tmp_path / 'clip'}}}'" in out
    assert f"train.init_from={tmp_path / 'llama'} (an LLM run) or train.init_parts='{{decoder: {tmp_path / 'llama'}}}'" in out
    llava = transformers.LlavaConfig(vision_config=vis.to_dict(), text_config=txt.to_dict(), image_token_index=99,
                                     vision_feature_layer=-1)
    mcfg = dataclasses.replace(MLLMConfig.from_hf(llava.to_dict()), projector=ProjectorConfig(kind="pool", pool_size=2))
    cfg = dataclasses.replace(ExperimentConfig(), model_name="mllm", model=mcfg)
    state, shardings = _fresh_state(cfg, model_spec("mllm"))
    before = params_np(state)
    for part, src in (("vision", "clip"), ("decoder", "llama")):
        state = load_params_into(state, shardings, tmp_path / src, prefix=part)
    new = params_np(state)
    got = {part: {f"{part}.{k}": np.asarray(v) for k, v in flat_params(load_pretrained(tmp_path / f"hf_{src}")).items()}
           for part, src in (("vision", "clip"), ("decoder", "llama"))}
    assert set(k for k in new if not k.startswith("projector.")) == set(got["vision"]) | set(got["decoder"])
    for k, v in new.items():
        part = k.split(".", 1)[0]
        want = before[k] if part == "projector" else got[part][k]
        np.testing.assert_array_equal(v, want, err_msg=k)


def test_init_parts_spreads_what_it_drops_over_the_mesh(tmp_path, monkeypatch):
    """Loading one part from a whole model's checkpoint reads the other parts only to drop them:
    they are restored spread over the mesh (a device holds 1/8 of them on 8 devices), not as a
    full copy on every device (a 7B LLM per chip when the vision tower of a LLaVA is wanted)."""
    import jax

    from mllm_jax import sharding as shd
    cfg = tiny_mllm_experiment(**{"mesh.fsdp": 8})
    mesh = shd.make_mesh(1, 8, 1)
    tx, _ = build_optimizer(cfg.train.optim, 1)
    state, shardings = create_train_state(lambda: TOY_MLLM.build(cfg, nnx.Rngs(0)), tx, cfg.train.optim, mesh, seed=0)
    whole = params_np(_fresh_state(tiny_mllm_experiment(**{"train.seed": 3}), TOY_MLLM)[0])
    _save(tmp_path / "whole", whole)
    restored = {}
    orig = Checkpointer.restore_params

    def spy(self, make_target):
        out = orig(self, make_target)
        restored.update(out[0])
        return out
    monkeypatch.setattr(Checkpointer, "restore_params", spy)
    new = params_np(load_params_into(state, shardings, tmp_path / "whole", prefix="vision"))
    for k, v in new.items():
        np.testing.assert_array_equal(v, whole[k] if k.startswith("vision.") else params_np(state)[k], err_msg=k)
    dropped = {k: a for k, a in restored.items() if not k.startswith("vision.")}
    total = sum(a.nbytes for a in dropped.values())
    on_one = sum(s.data.nbytes for a in dropped.values() for s in a.addressable_shards if s.device == jax.devices()[0])
    assert dropped and on_one * 8 == total, (on_one, total)


def test_init_fresh_need_only_match_one_of_the_checkpoints_fit_loads(tmp_path):
    """train.init_fresh drops an untied lm_head of the init_from checkpoint (the model ties its
    embeddings): it matches nothing of the vision tower's own checkpoint, which is no typo; a
    regex that matches nothing anywhere still is."""
    untied = params_np(_fresh_state(tiny_mllm_experiment(**{"model.decoder.tie_word_embeddings": False}), TOY_MLLM)[0])
    assert any(".lm_head." in k for k in untied)
    _save(tmp_path / "whole", untied)
    _save(tmp_path / "tower", {k[len("vision."):]: v for k, v in untied.items() if k.startswith("vision.")})
    base = {"model.decoder.tie_word_embeddings": True, "train.steps": 0, "train.init_from": str(tmp_path / "whole"),
            "train.init_parts": {"vision": str(tmp_path / "tower")}}
    new = params_np(fit_toy(tiny_mllm_experiment(**base, **{"train.run_dir": str(tmp_path / "a"),
                                                              "train.init_fresh": [r"^decoder\.lm_head\."]})).state)
    for k, v in new.items():
        np.testing.assert_array_equal(v, untied[k], err_msg=k)
    with pytest.raises(StageHandoverError, match=r"init_fresh: \['\^vison.*'\] match no param"):
        fit_toy(tiny_mllm_experiment(**base, **{"train.run_dir": str(tmp_path / "b"),
                                                "train.init_fresh": [r"^decoder\.lm_head\.", r"^vison\."]}))


def test_init_parts_names_parts_and_demo_arms_do_not_reload_them():
    """An empty or dotted-at-the-end part name is a config error (an empty one loaded the
    checkpoint as init_from); the demo's arms start from the shared stage only, whose run loaded
    train.init_parts (a reload would undo what it trained of them)."""
    from pathlib import Path

    from mllm_jax.demo import arm_config
    for bad in ("", "vision.", ".vision", 3):
        with pytest.raises(ConfigError, match=r"train\.init_parts: .* is not a part of the model"):
            tiny_mllm_experiment(**{"train.init_parts": {bad: "ckpt/x"}})
    assert tiny_mllm_experiment(**{"train.init_parts": {"decoder.layers": "x"}}).train.init_parts == {"decoder.layers": "x"}
    base = apply_updates(ExperimentConfig(), {"train.init_parts": {"vision": "ckpt/clip"}})
    arm = arm_config(base, "sugar", Path("out"), "minilm")
    assert arm.train.init_from == str(Path("out") / "demo" / "pretrain") and arm.train.init_parts == {}


def test_a_chained_stage_does_not_inherit_init_fresh():
    """``train.init_fresh`` of the base config or of the command line (applied to every stage) is
    the first stage's, as ``init_parts``: a chained stage starts from the previous stage, which
    trained those params. It kept them fresh, silently discarding what the first stage trained
    (a recipe started with ``train.init_from=ckpt/llava train.init_fresh=['^projector\\.']``
    re-initialised stage 1's adapter in stages 2 and 3). A stage that sets its own keeps it."""
    fresh = [r"^projector\."]
    recipe = dataclasses.replace(
        apply_updates(ExperimentConfig(), {"train.init_fresh": fresh}),
        stages=(StageConfig("one", init_from_previous=False), StageConfig("two"),
                StageConfig("three", {"train.init_fresh": [r"^embed_head\."]})))
    got = [c.train.init_fresh for _, c in stage_configs(recipe)]
    assert got == [tuple(fresh), (), (r"^embed_head\.",)]
    wide = {"train.init_fresh": fresh}
    got = [c.train.init_fresh for _, c in stage_configs(recipe, overrides=wide)]
    assert got[:2] == [tuple(fresh), ()]
