"""``plan``: a 7B-LLM + ViT-L run sized for 256 chips on this machine, parameter count checked
against transformers' LLaVA (meta device: nothing allocated, nothing downloaded)."""
import re
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from mllm_jax.cli import main
from mllm_jax.config import ExperimentConfig, apply_overrides, load_config
from mllm_jax.sharding import ShardingError
from mllm_jax.train import flops as F
from mllm_jax.train.plan import abstract_params, make_plan
from tests.toy import TOY_LM, tiny_experiment

ROOT = Path(__file__).resolve().parents[2]
VILA = ROOT / "experiments/configs/vila7b_sugar.yaml"


@pytest.fixture(scope="module")
def vila():
    return load_config(VILA, ExperimentConfig)


def _hf_llava_7b_count() -> int:
    """LLaVA-1.5-7B's architecture (LLaMA-2-7B + CLIP ViT-L/14-336, 2-layer MLP projector),
    written out from the published configs, counted by transformers on the meta device."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    text = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                          image_token_index=32000, vision_feature_layer=-2))
    return sum(p.numel() for p in model.parameters())


def test_vila7b_param_count_agrees_with_transformers(vila):
    specs = F.mllm_params(vila.model)
    base = sum(int(np.prod(s.shape)) for s in specs if ".lora." not in s.path)
    lora = sum(int(np.prod(s.shape)) for s in specs if ".lora." in s.path)
    hf = _hf_llava_7b_count()
    assert abs(base - hf) / hf < 0.01, (base, hf)
    assert lora == 32 * 2 * (4096 * 128 + 128 * 4096)  # rank-128 LoRA on q and v of 32 layers


def test_plan_vila7b_on_256_chips(vila, capsys):
    plan = make_plan(vila, (1, 256, 1), global_batch=256, mfu=0.4)
    total = sum(int(np.prod(s.shape)) for s in F.mllm_params(vila.model))
    assert plan.total_params == total and plan.source == "jax.eval_shape of the model"
    assert plan.trainable_params == sum(int(np.prod(s.shape)) for s in F.mllm_params(vila.model)
                                        if ".lora." in s.path or s.path.startswith("projector."))
    # fsdp over 256 splits every matrix 256 ways along its embed dim; only vectors (norm scales,
    # biases) may stay whole. Without LoRA that is all:
    no_lora_cfg = apply_overrides(vila, ["model.lora.rank=0", "train.optim.trainable=['^projector']"])
    no_lora = make_plan(no_lora_cfg, (1, 256, 1), global_batch=256)
    n = no_lora.total_params
    vectors = sum(s.shape[0] for s in F.mllm_params(no_lora_cfg.model) if len(s.shape) == 1)
    assert 4 * n / 256 <= no_lora.bytes_per_device["params"] <= 4 * n / 256 + 4 * vectors
    # LoRA's a [embed, r] is split along embed; b [r, heads] has no fsdp-sharded dim (r = 128 <
    # 256 devices, heads go to the tensor axis): replicated on every device
    a = 32 * 2 * 4096 * 128
    assert plan.bytes_per_device["params"] - no_lora.bytes_per_device["params"] == 4 * (a / 256 + a)
    # Adam: two float32 moments of the trainable params only, at most replicated
    assert plan.bytes_per_device["opt_state"] <= 2 * 4 * plan.trainable_params + 64
    tokens = 256 * max(vila.data.seq_buckets)
    assert plan.tokens_per_step == tokens
    # LoRA on a frozen LLM and ViT: the forward pass (2N per token), the LLM's input gradient
    # (2N) and the small weight gradients (LoRA, projector), plus attention and the ViT forward;
    # not PaLM's 6N of a fully trained model
    four_n = 4 * 7.0e9 * tokens
    assert four_n < plan.flops_per_step < 1.3 * four_n
    full = make_plan(apply_overrides(vila, ["model.lora.rank=0", "train.optim.trainable=['.*']"]), (1, 256, 1),
                     global_batch=256)
    assert 1.5 * four_n < full.flops_per_step < 1.3 * 1.5 * four_n        # 6N
    assert plan.step_time_s["h100"] == pytest.approx(plan.flops_per_step / (256 * 989e12 * 0.4))
    assert main(["plan", "--config", str(VILA), "--mesh", "1,256,1", "--global-batch", "256"]) == 0
    out = capsys.readouterr().out
    assert "decoder.layers" in out and "vision.layers" in out and "tpu-v5p" in out and "h200" in out


@pytest.mark.slow  # > 5 s on 2 cores: `make test-slow`
def test_plan_names_the_param_a_mesh_does_not_divide(vila, capsys):
    with pytest.raises(ShardingError, match=r"decoder\..* does not divide"):
        make_plan(vila, (1, 1, 3))
    assert main(["plan", "--config", str(VILA), "--mesh", "1,1,3"]) == 2
    assert "mesh axis 'tensor' of size 3 does not divide" in capsys.readouterr().err
    # 8 KV heads over a tensor axis of 16: the sizes divide (8 x 128 = 1024) but a head would be cut
    gqa = apply_overrides(vila, ["model.decoder.num_kv_heads=8"])
    with pytest.raises(ShardingError, match=r"k_proj.kernel: .* packs 8 heads"):
        make_plan(gqa, (1, 16, 16), global_batch=256)


def test_plan_uses_eval_shape_of_a_buildable_model():
    cfg = tiny_experiment()
    plan = make_plan(cfg, (1, 4, 2))
    model = TOY_LM.build(cfg, nnx.Rngs(0))
    assert plan.source == "jax.eval_shape of the model"
    assert plan.total_params == sum(x.size for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param)))


def test_mllm_eval_shape_matches_the_arithmetic_table(vila):
    """Runs once mllm_jax/models/mllm.py has landed: the real model's abstract params (eval_shape)
    against the table ``plan`` used until then."""
    pytest.importorskip("mllm_jax.models.mllm")
    _, params, _, source = abstract_params(vila)
    assert source == "jax.eval_shape of the model"
    got = sum(int(np.prod(x.shape)) for _, x in nnx.to_flat_state(nnx.as_pure(params)))
    want = sum(int(np.prod(s.shape)) for s in F.mllm_params(vila.model))
    assert abs(got - want) / want < 0.01, (got, want)


@pytest.mark.parametrize("kind", ["pool", "mlp"])
def test_projector_flops_agree_with_xla_cost_analysis(kind):
    """The projector's share of ``mllm_forward_flops`` ~ XLA's count for the module alone (the
    pool adapter's MLP runs on the pooled P*P tokens: it was counted on every patch, 16x here).
    XLA also counts the elementwise work (layer norm, pooling, GELU): a few %."""
    import jax
    import jax.numpy as jnp
    from mllm_jax.config import DecoderConfig, MLLMConfig, ProjectorConfig, VisionConfig
    from mllm_jax.models.projector import MLPProjector, PoolAdapter
    v = VisionConfig(image_size=32, patch_size=4, hidden_size=256)
    cfg = MLLMConfig(vision=v, decoder=DecoderConfig(hidden_size=512),
                     projector=ProjectorConfig(kind=kind, pool_size=2))
    ours = (F.mllm_forward_flops(cfg, 1, 8, 3) - F.mllm_forward_flops(cfg, 1, 8, 0)
            - F.vision_forward_flops(v, 3, F.vision_layers_run(cfg)))
    rngs = nnx.Rngs(0)
    mod = (PoolAdapter(256, 512, v.grid_size, cfg.projector, rngs=rngs) if kind == "pool"
           else MLPProjector(256, 512, cfg.projector, rngs=rngs))
    cost = jax.jit(lambda x: mod(x)).lower(jnp.zeros((3, v.num_patches, 256))).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert 0.85 < ours / xla < 1.1, (ours, xla)


@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_mllm_vision_flops_count_the_layers_up_to_the_feature_layer(feature_layer):
    """The vision + projector share of ``mllm_forward_flops`` ~ XLA's count for ``encode_images``,
    which runs the ViT only up to ``vision_feature_layer`` (LLaVA's -2 skips the last layer: all
    4 layers were counted, 1.29x XLA's count here; 3.4x with feature layer 1). XLA also counts
    the elementwise work (layer norms, GELU, softmax): a few %."""
    import jax
    import jax.numpy as jnp
    from mllm_jax.config import DecoderConfig, MLLMConfig, VisionConfig
    from mllm_jax.models.mllm import MLLM
    v = VisionConfig(image_size=32, patch_size=4, hidden_size=128, intermediate_size=512, num_layers=4)
    cfg = MLLMConfig(vision=v, decoder=DecoderConfig(hidden_size=128, intermediate_size=256, num_layers=1),
                     vision_feature_layer=feature_layer)
    model = MLLM(cfg, rngs=nnx.Rngs(0))
    cost = jax.jit(lambda px: model.encode_images(px)).lower(jnp.zeros((2, 32, 32, 3))).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = F.mllm_forward_flops(cfg, 1, 1, 2) - F.mllm_forward_flops(cfg, 1, 1, 0)
    assert 0.95 < ours / xla < 1.02, (ours, xla)


def test_shape_only_rngs_build_the_same_abstract_model():
    """plan builds models with numpy RNG counters (fast under eval_shape): the same params,
    variables and dtypes as nnx.Rngs, and the same keys when run for real."""
    import jax
    from mllm_jax.train.registry import model_spec
    from mllm_jax.train.state import abstract_model, shape_only_rngs
    from tests.toy import tiny_mllm_experiment
    cfg = tiny_mllm_experiment(**{"model.lora.rank": 2})
    spec = model_spec(cfg.model_name)
    shapes = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(m))  # noqa: E731
    assert shapes(abstract_model(lambda: spec.build(cfg, shape_only_rngs(0)))) == \
        shapes(abstract_model(lambda: spec.build(cfg, nnx.Rngs(0))))
    a, b = shape_only_rngs(3), nnx.Rngs(3)
    for _ in range(3):
        assert (jax.random.key_data(a.params()) == jax.random.key_data(b.params())).all()


def test_plan_activations_are_one_micro_batchs_under_grad_accum(vila):
    """The step scans over grad_accum micro-batches, one micro-batch's activations live at a time:
    grad_accum=4 on a global batch of 64 holds the activations of 16 sequences (plan counted
    all 64 for any grad_accum). FLOPs and tokens per step are the whole batch's."""
    from mllm_jax.train.plan import activation_bytes
    mesh = {"data": 1, "fsdp": 8, "tensor": 1}
    acc4 = apply_overrides(vila, ["train.optim.grad_accum=4"])
    p1 = make_plan(vila, (1, 8, 1), global_batch=64)
    p4 = make_plan(acc4, (1, 8, 1), global_batch=64)
    act = activation_bytes(vila.resolved(), mesh, 16, max(vila.data.seq_buckets), vila.data.max_images)
    assert p4.bytes_per_device["activations (estimate)"] == pytest.approx(act)
    assert p4.bytes_per_device["activations (estimate)"] == pytest.approx(p1.bytes_per_device["activations (estimate)"] / 4)
    assert p4.flops_per_step == p1.flops_per_step and p4.tokens_per_step == p1.tokens_per_step
    with pytest.raises(ValueError, match="not divisible by train.optim.grad_accum=3"):
        make_plan(apply_overrides(vila, ["train.optim.grad_accum=3"]), (1, 8, 1), global_batch=64)


def test_plan_refuses_sizes_it_cannot_plan_for(capsys):
    """A -1 mesh size (the config's "all remaining devices") has no devices to resolve against in
    plan: it printed "-1 devices", negative bytes and step times, and "fits". A zero --devices,
    --mfu, or an unknown accelerator ended in a ZeroDivisionError / KeyError traceback."""
    with pytest.raises(ValueError, match="each >= 1"):
        make_plan(tiny_experiment(), (1, -1, 1))
    tiny = str(Path(__file__).resolve().parents[2] / "experiments/configs/tiny.yaml")
    for bad in (["--mesh", "1,-1,1"], ["--mesh", "1,x,1"]):
        with pytest.raises(SystemExit, match="expected data,fsdp,tensor sizes >= 1"):
            main(["plan", "--config", tiny, *bad])
    for bad, msg in ((["--devices", "0"], "each >= 1"), (["--mfu", "0"], "mfu 0.0: must be > 0"),
                     (["--accelerators", "h100,foo"], r"accelerators \['foo'\]: unknown"),
                     (["--global-batch", "0"], "global batch 0: must be >= 1")):
        assert main(["plan", "--config", tiny, *bad]) == 2, bad
        assert re.search(msg, capsys.readouterr().err), bad


def test_plan_of_a_recipe_plans_each_stage(capsys):
    """infmllm_3stage.yaml: plan sized the recipe's base config, which no stage runs (everything
    trainable, no LoRA: 7.06B trainable, 109.5 GiB on one device); each stage trains its own set."""
    path = Path(__file__).resolve().parents[2] / "experiments/configs/infmllm_3stage.yaml"
    base = load_config(path, ExperimentConfig)

    def count(model_cfg, keep):
        return sum(int(np.prod(s.shape)) for s in F.mllm_params(model_cfg) if keep(s.path))
    assert main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("== stage")] == \
        ["== stage align", "== stage multitask", "== stage instruct"]
    trainable = [int(line.split()[-1].replace(",", "")) for line in out.splitlines() if line.strip().startswith("trainable")]
    lora = apply_overrides(base, ["model.lora.rank=8", "model.lora.target=decoder\\..*(q_proj|v_proj)$"]).model
    assert trainable == [count(base.model, lambda p: p.startswith("projector.")),
                         count(lora, lambda p: p.startswith(("vision.", "projector.")) or ".lora." in p),
                         count(base.model, lambda p: p.startswith(("projector.", "decoder.")))]
    assert main(["plan", "--config", str(path), "--stage", "multitask"]) == 0
    out = capsys.readouterr().out
    assert "== stage multitask" in out and "(LoRA)" in out and "== stage align" not in out
    assert main(["plan", "--config", str(path), "--stage", "nope"]) == 2
    assert "no such stage" in capsys.readouterr().err


def test_plan_of_a_multi_stream_config_counts_every_stream():
    """With ``streams`` a step reads one batch of each stream and never ``data``: plan sized
    ``data`` (8 x 256 tokens here) and ignored the streams (2 x 64 + 4 x 32 = 256 tokens). Each
    stream's FLOPs and activations add up to those of a plan of that stream alone."""
    import dataclasses

    from mllm_jax.config import DataConfig, StreamConfig
    base = apply_overrides(ExperimentConfig(), ["data.batch_size=8", "data.seq_buckets=[256]", "data.max_images=4"])
    gen = DataConfig(batch_size=2, seq_buckets=(64,), max_images=1)
    disc = DataConfig(batch_size=4, seq_buckets=(32,), max_images=2)
    cfg = dataclasses.replace(base, streams=(StreamConfig("gen", gen), StreamConfig("disc", disc)))
    plan = make_plan(cfg, (1, 2, 1))
    assert plan.tokens_per_step == 2 * 64 + 4 * 32
    alone = [make_plan(dataclasses.replace(base, data=d), (1, 2, 1)) for d in (gen, disc)]
    assert plan.flops_per_step == pytest.approx(sum(p.flops_per_step for p in alone))
    act = "activations (estimate)"
    assert plan.bytes_per_device[act] == pytest.approx(sum(p.bytes_per_device[act] for p in alone))
    assert plan.bytes_per_device["params"] == alone[0].bytes_per_device["params"]
    with pytest.raises(ValueError, match=r"streams \['gen', 'disc'\].*--processes N"):
        make_plan(cfg, (1, 2, 1), global_batch=8)
    # a 4-process run: every stream's per-process batch 4 times, as if each stream had it alone
    four = make_plan(cfg, (1, 8, 1), processes=4)
    assert four.tokens_per_step == 4 * (2 * 64 + 4 * 32)
    alone = [make_plan(dataclasses.replace(base, data=d), (1, 8, 1), global_batch=4 * d.batch_size)
             for d in (gen, disc)]
    assert four.flops_per_step == pytest.approx(sum(p.flops_per_step for p in alone))
    assert four.bytes_per_device[act] == pytest.approx(sum(p.bytes_per_device[act] for p in alone))
    with pytest.raises(ValueError, match="give one"):
        make_plan(base, (1, 2, 1), global_batch=8, processes=2)
    with pytest.raises(ValueError, match="processes 0"):
        make_plan(base, (1, 2, 1), processes=0)
    with pytest.raises(ShardingError, match="stream 'gen': global batch 2 is not divisible by data x fsdp = 4"):
        make_plan(cfg, (1, 4, 1))


def _mllm_cfg(**kw):
    from mllm_jax.config import DecoderConfig, LoRAConfig, MLLMConfig, VisionConfig
    v = VisionConfig(image_size=32, patch_size=4, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4)
    d = DecoderConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2)
    return MLLMConfig(vision=v, decoder=d, lora=LoRAConfig(**kw.pop("lora", {"rank": 0})), **kw)


@pytest.mark.parametrize("kw", [dict(lora={"rank": 4}, num_soft_prompts=2),
                                dict(vision=None, lora={"rank": 2, "target": r"(q_proj|fc1)$"})])
def test_param_table_names_and_shapes_are_the_models(kw):
    """The table plan and the FLOPs count use lists every param under the model's own path and
    shape (the ViT's were HF names, 'encoder.layers.i', so a trainable-param lookup missed them)."""
    from mllm_jax.config import VisionConfig
    from mllm_jax.models.mllm import MLLM
    from mllm_jax.models.vision import VisionTower
    from mllm_jax.train.optim import path_str
    if kw.get("vision", 1) is None:        # a SigLIP tower with its attention-pooling head, alone
        cfg = VisionConfig(variant="siglip", image_size=16, patch_size=4, hidden_size=32, num_heads=2,
                           intermediate_size=64, num_layers=2, use_head=True)
        model, table = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0))), F.vision_params(cfg)
    else:
        cfg = _mllm_cfg(**kw)
        model, table = nnx.eval_shape(lambda: MLLM(cfg, rngs=nnx.Rngs(0))), F.mllm_params(cfg)
    got = {path_str(p): tuple(x.shape) for p, x in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert got == {s.path: tuple(s.shape) for s in table}


@pytest.mark.parametrize("trained", ["all", "projector", "lora", "vision+projector"])
def test_train_flops_of_frozen_parts_agree_with_xla(trained):
    """``train_flops_of`` ~ XLA's count for the compiled value-and-gradient of the trained
    params only: all of them (3x forward), InfMLLM stage 1 (the projector: the ViT needs no
    backward pass, the decoder only its input gradient), LoRA on the LLM's q, v with the rest
    frozen, and stage 2's vision tower + projector: within 2 % of XLA here, where 3x forward
    overcounted the frozen ones by 1.27-1.65x. XLA also counts elementwise work (norms, softmax,
    GELU, the loss)."""
    import jax
    import jax.numpy as jnp
    from mllm_jax.models.mllm import MLLM
    from mllm_jax.train.optim import path_str
    cfg = _mllm_cfg(lora={"rank": 8, "target": r"decoder\..*(q_proj|v_proj)$"} if trained == "lora" else {"rank": 0})
    keep = {"all": lambda p: True, "projector": lambda p: p.startswith("projector."),
            "lora": lambda p: ".lora." in p,
            "vision+projector": lambda p: p.startswith(("vision.", "projector."))}[trained]
    model = MLLM(cfg, rngs=nnx.Rngs(0))
    is_trained = nnx.All(nnx.Param, lambda path, _: keep(path_str(path)))
    graphdef, params, rest = nnx.split(model, is_trained, ...)
    B, T, M = 2, 96, 1
    k = cfg.tokens_per_image
    ids = np.full((B, T), 5, np.int32)
    ids[:, 1:1 + k] = cfg.image_token_id
    pix = np.zeros((B, M, 32, 32, 3), np.float32)

    def loss(params, rest, ids, pix):         # all arguments: XLA folds what is constant
        logits = nnx.merge(graphdef, params, rest)(ids, pixel_values=pix).logits
        return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1))
    cost = jax.jit(jax.value_and_grad(loss)).lower(params, rest, ids, pix).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    parts = F.mllm_flops_parts(cfg, B, T, B * M)
    ours = F.train_flops_of(parts, {s.path for s in F.mllm_params(cfg) if keep(s.path)})
    fwd = sum(p.forward for p in parts)
    assert 0.95 < ours / xla < 1.05, (ours, xla, 3 * fwd)
    if trained == "all":
        assert ours == pytest.approx(3 * fwd, rel=2e-3)      # the patch embedding's CLS row aside
    else:
        assert 3 * fwd / xla > 1.25, (3 * fwd, xla)            # what the 3x count said


def test_train_flops_of_by_hand():
    """Two parts, bottom a (forward 10, 2 of it weightless, weight a.w of 3 on 1 row) and top b
    (20, 4, b.w of 5 on 2 rows). A trained param without a weight (a soft prompt, a norm) still
    makes the gradient flow back through its part and those above it."""
    parts = [F.FlopsPart(("a.",), 10.0, 2.0, (("a.w", 3),), 1), F.FlopsPart(("b.",), 20.0, 4.0, (("b.w", 5),), 2)]
    assert F.train_flops_of(parts, set()) == 30
    assert F.train_flops_of(parts, {"b.prompt"}) == 30 + 24
    assert F.train_flops_of(parts, {"b.w"}) == 30 + 24 + 2 * 2 * 5
    assert F.train_flops_of(parts, {"a.norm"}) == 30 + 12 + 24
    assert F.train_flops_of(parts, {"a.w", "b.w"}) == 30 + 12 + 24 + 2 * 3 + 2 * 2 * 5
