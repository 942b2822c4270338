"""The jitted train step and ``fit``: sharding parity, accumulation, NaN guard, freeze masks,
metrics files, eval hook and best-by-metric retention. Toy model and data: ``tests/toy.py``."""
import dataclasses
import json
import struct

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from mllm_jax import sharding as shd
from mllm_jax.config import ExperimentConfig, LoRAConfig, from_dict
from mllm_jax.models.lora import LoRAParam, apply_lora
from mllm_jax.train.loop import NonFiniteLossError
from mllm_jax.train.optim import LORA_ONLY
from tests.toy import TOY_LM, ToyLM, fit_toy, params_np, scaled_ntp, tiny_experiment


def _close(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=tol, rtol=0, err_msg=k)


def _init_params(cfg, model_fn=None):
    """The params ``fit`` starts from (initialised under jit exactly as ``fit`` does)."""
    from mllm_jax.train.optim import build_optimizer
    from mllm_jax.train.state import create_train_state
    from tests.toy import one_device_mesh
    model_fn = model_fn or (lambda: TOY_LM.build(cfg, nnx.Rngs(cfg.train.seed)))
    tx, _ = build_optimizer(cfg.train.optim, cfg.train.steps)
    state, _ = create_train_state(model_fn, tx, cfg.train.optim, one_device_mesh(), seed=cfg.train.seed)
    return params_np(state)


def _tb_scalar_tags(folder) -> set[str]:
    """Scalar tags in TensorBoard event files (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2
    tags = set()
    for f in folder.rglob("events.out.tfevents.*"):
        raw = f.read_bytes()
        i = 0
        while i + 12 <= len(raw):
            (n,) = struct.unpack("<Q", raw[i:i + 8])
            ev = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
            tags.update(v.tag for v in ev.summary.value)
            i += 12 + n + 4
    return tags


def test_sharded_2x2x2_matches_one_device(tmp_path):
    """5 steps on 8 devices as (data, fsdp, tensor) = (2, 2, 2) == 5 steps on 1 device; also
    checks the run's files: config.yaml round-trips, metrics.jsonl names every loss part, the
    TensorBoard events hold the same scalars. The 1-device run is given a built module (moved
    onto the mesh), the sharded one a constructor (params created in their shards)."""
    cfg8 = tiny_experiment(**{"train.run_dir": str(tmp_path / "r8"), "train.tensorboard": True})
    r8 = fit_toy(cfg8, mesh=shd.make_mesh(2, 2, 2), forward_flops=lambda s: TOY_LM.forward_flops(cfg8, s))
    cfg1 = tiny_experiment(**{"train.run_dir": str(tmp_path / "r1")})
    r1 = fit_toy(cfg1, model_fn=TOY_LM.build(cfg1, nnx.Rngs(cfg1.train.seed)))
    assert len(r8.history) == len(r1.history) == 5
    np.testing.assert_allclose([h["loss"] for h in r8.history], [h["loss"] for h in r1.history], atol=1e-5, rtol=0)
    _close(params_np(r8.state), params_np(r1.state), 1e-5)
    assert r8.history[-1]["loss"] < r8.history[0]["loss"]
    # the sharded run really is sharded
    kernel = r8.state.params["layers"][0]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")

    run = tmp_path / "r8"
    assert from_dict(ExperimentConfig, yaml.safe_load((run / "config.yaml").read_text())) == cfg8
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5]
    for key in ("loss", "loss/ntp", "lr", "grad_norm", "skipped"):
        assert all(key in x for x in lines), key
    assert all(k in lines[-1] for k in ("tokens_per_s", "mfu", "step_time_s"))
    assert lines[-1]["loss"] == pytest.approx(r8.history[-1]["loss"])
    assert {"loss", "loss/ntp", "lr", "grad_norm", "mfu"} <= _tb_scalar_tags(run / "tensorboard")


def test_grad_accumulation_matches_full_batch(tmp_path):
    """grad_accum=2 (two micro-batches scanned inside the step) == one full batch (equal token
    counts per micro-batch, so the mean of means is the mean)."""
    base = {"train.steps": 3}
    r1 = fit_toy(tiny_experiment(**base, **{"train.run_dir": str(tmp_path / "a")}))
    r2 = fit_toy(tiny_experiment(**base, **{"train.run_dir": str(tmp_path / "b"), "train.optim.grad_accum": 2}))
    np.testing.assert_allclose([h["loss"] for h in r1.history], [h["loss"] for h in r2.history], atol=1e-5, rtol=0)
    _close(params_np(r1.state), params_np(r2.state), 1e-5)


class _Bigram(nnx.Module):
    """Logits from the current token alone: an 8-token vocabulary, hand-checkable losses."""

    def __init__(self, rngs):
        self.emb, self.out = nnx.Embed(8, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, input_ids, **_):
        return {"logits": self.out(self.emb(input_ids))}


def test_grad_accumulation_weights_micro_batches_by_tokens():
    """Micro-batches with 12 and 2 answer tokens: grad_accum=2 gives the full batch's token-mean
    loss, gradient (one SGD step) and token count (a mean of per-micro-batch means does not:
    loss 2.38 vs 2.32 here before the fix). Also: the logged lr is the applied one after a skipped
    step."""
    from mllm_jax.config import OptimConfig
    from mllm_jax.train.loop import jit_train_step, make_train_step
    from mllm_jax.train.optim import build_optimizer
    from mllm_jax.train.registry import make_loss_fn, ntp_objective
    from mllm_jax.train.state import create_train_state
    from tests.toy import one_device_mesh

    rng = np.random.default_rng(0)
    mask = np.zeros((4, 6), np.int32)
    mask[[0, 2], :] = 1                               # rows j::2 form micro-batch j: 12 and 2 tokens
    mask[[1, 3], 0] = 1
    batch = {"input_ids": rng.integers(0, 8, (4, 6)).astype(np.int32),
             "labels": rng.integers(0, 8, (4, 6)).astype(np.int32), "loss_mask": mask}
    mesh = one_device_mesh()
    out = {}
    for k in (1, 2):
        cfg = OptimConfig(name="sgd", lr=1.0, schedule="constant", momentum=0.0, clip_norm=0.0, grad_accum=k)
        tx, sched = build_optimizer(cfg, 10)
        state, shardings = create_train_state(lambda: _Bigram(nnx.Rngs(0)), tx, cfg, mesh, seed=0)
        step = jit_train_step(make_train_step(make_loss_fn(ntp_objective(None)), tx, sched, grad_accum=k,
                                              mesh=mesh), shardings, mesh)
        state, m = step(state, batch)
        out[k] = (float(m["loss"]), float(m["loss/ntp_tokens"]), params_np(state))
    assert out[2][0] == pytest.approx(out[1][0], abs=1e-6) and out[1][1] == out[2][1] == 14
    _close(out[1][2], out[2][2], 1e-6)

    # the logged lr is the one applied: a skipped (non-finite) step does not advance optax's count
    cfg = OptimConfig(name="sgd", lr=1.0, schedule="linear", warmup_steps=0, momentum=0.0, clip_norm=0.0)
    tx, sched = build_optimizer(cfg, 4)
    state, shardings = create_train_state(lambda: _Bigram(nnx.Rngs(0)), tx, cfg, mesh, seed=0)
    step = jit_train_step(make_train_step(make_loss_fn(scaled_ntp()), tx, sched, mesh=mesh), shardings, mesh)
    lrs = []
    for scale in (np.nan, 1.0, 1.0):
        state, m = step(state, {**batch, "scale": np.full((4,), scale, np.float32)})
        lrs.append(float(m["lr"]))
    assert lrs == [float(sched(0)), float(sched(0)), float(sched(1))] and lrs[1] > lrs[2]


def test_evaluate_pools_unequal_batches_as_one_batch():
    """Eval batches with 13 and 1 answer tokens (3 and 1 real rows, plus a padding row) give the
    metrics of one batch holding all 4 rows: a next-token objective's loss, ntp and z_loss are
    token means and ntp_tokens adds up; a per-example loss is weighted by real rows. The plain
    mean over batches gave eval/loss 3.072 vs 2.812 (ntp 2.513 vs 2.344, ntp_tokens 7 vs 14)."""
    import jax.numpy as jnp

    from mllm_jax.config import OptimConfig
    from mllm_jax.objectives.lm import next_token_loss
    from mllm_jax.train.loop import evaluate, make_eval_step
    from mllm_jax.train.optim import build_optimizer
    from mllm_jax.train.state import create_train_state
    from tests.toy import one_device_mesh

    def ntp_loss(model, batch, rngs):
        return next_token_loss(model(batch["input_ids"])["logits"], batch["labels"], batch["loss_mask"], z_loss=0.1)

    def per_example_loss(model, batch, rngs):
        real = (batch["sample_index"] >= 0).astype(jnp.float32)
        return jnp.sum(model(batch["input_ids"])["logits"][:, 0, 0] * real) / jnp.sum(real), {}

    rng = np.random.default_rng(0)
    mask = np.zeros((4, 6), np.int32)
    mask[[0, 1], :] = 1
    mask[[2, 3], 0] = 1
    full = {"input_ids": rng.integers(0, 8, (4, 6)).astype(np.int32),
            "labels": rng.integers(0, 8, (4, 6)).astype(np.int32), "loss_mask": mask,
            "sample_index": np.arange(4, dtype=np.int32)}
    first = {k: v[:3] for k, v in full.items()}                                   # 13 tokens, 3 rows
    pad = {k: np.zeros_like(v[:1]) for k, v in full.items()} | {"sample_index": np.full((1,), -1, np.int32)}
    last = {k: np.concatenate([v[3:], pad[k]]) for k, v in full.items()}        # 1 token, 1 row + padding
    mesh = one_device_mesh()
    cfg = OptimConfig(name="sgd", lr=1.0, schedule="constant")
    tx, _ = build_optimizer(cfg, 1)
    state, _ = create_train_state(lambda: _Bigram(nnx.Rngs(0)), tx, cfg, mesh, seed=0)
    for loss_fn, keys in ((ntp_loss, {"loss", "loss/ntp", "loss/z_loss", "loss/ntp_tokens"}),
                          (per_example_loss, {"loss"})):
        step = jax.jit(make_eval_step(loss_fn, mesh))
        pooled = evaluate(step, state, iter([first, last]), 5, mesh, shd.DEFAULT_RULES)
        whole = evaluate(step, state, iter([full]), 1, mesh, shd.DEFAULT_RULES)
        assert set(pooled) == set(whole) == {f"eval/{k}" for k in keys}
        _close(pooled, whole, 1e-6)
    assert pooled["eval/loss"] != pytest.approx((per_example_loss(state.model(), first, None)[0]
                                                 + per_example_loss(state.model(), last, None)[0]) / 2)


def test_evaluate_weights_each_metric_by_name():
    """The pooling rules of ``evaluate`` on hand-made per-batch metrics (the eval step returns the
    batch itself): counts add up, ``<p>ntp`` / ``<p>z_loss`` are weighted by ``<p>ntp_tokens``, a
    part with ``<part>_pairs`` by those, the rest (and a total of terms weighted differently) by
    ``examples``, or equally per batch when the eval step returns none."""
    from mllm_jax.train.loop import evaluate
    from tests.toy import one_device_mesh

    def run(*batches):
        to_np = [{k: np.float32(v) for k, v in b.items()} for b in batches]
        return evaluate(lambda state, b: b, None, iter(to_np), 9, one_device_mesh(), shd.DEFAULT_RULES)

    got = run({"loss": 2, "loss/ntp": 1, "loss/ntp_tokens": 3, "loss/disc_ntp": 4, "loss/disc_ntp_tokens": 1,
               "loss/structure": 0.5, "loss/structure_pairs": 6, "loss/structure_corr": 0.2, "examples": 3},
              {"loss": 6, "loss/ntp": 3, "loss/ntp_tokens": 1, "loss/disc_ntp": 0, "loss/disc_ntp_tokens": 3,
               "loss/structure": 1.5, "loss/structure_pairs": 2, "loss/structure_corr": 0.6, "examples": 1})
    assert got == {"eval/loss": 3.0, "eval/loss/ntp": 1.5, "eval/loss/ntp_tokens": 4, "eval/loss/disc_ntp": 1.0,
                   "eval/loss/disc_ntp_tokens": 4, "eval/loss/structure": 0.75, "eval/loss/structure_pairs": 8,
                   "eval/loss/structure_corr": pytest.approx(0.3)}
    got = run({"loss": 1, "loss/z_loss": 2, "loss/ntp_tokens": 3, "acc": 1},
              {"loss": 5, "loss/z_loss": 6, "loss/ntp_tokens": 1, "acc": 0})
    assert got == {"eval/loss": 2.0, "eval/loss/z_loss": 3.0, "eval/loss/ntp_tokens": 4, "eval/acc": 0.5}


def test_nan_batch_is_skipped_counted_and_changes_nothing(tmp_path):
    """A NaN in batch 2 skips step 3 and counts it; training continues. The result equals a run
    that never saw that batch (bit for bit): the skipped step changed no param and no optimiser
    state."""
    # (tiny_experiment's lr is constant, so the two runs' lengths do not change their updates)
    nan = fit_toy(tiny_experiment(**{"train.run_dir": str(tmp_path / "nan"), "data_options": {"nan_batches": [2]}}))
    assert [h["finite"] for h in nan.history] == [True, True, False, True, True]
    assert nan.history[-1]["skipped"] == 1 and nan.history[-1]["bad_streak"] == 0
    assert int(nan.state.skipped) == 1 and np.isfinite(nan.history[-1]["loss"])
    clean = fit_toy(tiny_experiment(**{"train.run_dir": str(tmp_path / "drop"), "train.steps": 4,
                                       "data_options": {"drop_batches": [2]}}))
    a, b = params_np(nan.state), params_np(clean.state)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_too_many_bad_steps_stop_with_a_clear_error(tmp_path):
    cfg = tiny_experiment(**{"train.run_dir": str(tmp_path / "r"), "train.max_bad_steps": 2,
                             "data_options": {"nan_batches": [1, 2]}})
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps .* non-finite"):
        fit_toy(cfg)


def test_frozen_params_are_bit_identical(tmp_path):
    cfg = tiny_experiment(**{"train.run_dir": str(tmp_path / "r"), "train.steps": 3,
                             "train.optim.trainable": [r"^layers\.0\."], "train.optim.weight_decay": 0.1})
    res = fit_toy(cfg)
    before, after = _init_params(cfg), params_np(res.state)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.startswith("layers.0.") for k in changed)
    assert {k for k in before if k.startswith("layers.0.") and k.endswith("kernel")} <= changed
    # no optimiser state for frozen params
    assert all(p.startswith("layers.0.") for p in
               [".".join(map(str, q)) for q, _ in nnx.to_flat_state(res.state.params)])


def test_lora_only_touches_only_lora(tmp_path):
    """LoRA (with dropout, so the model carries an RNG stream through the step) on q, v:
    base params stay bit-identical, every LoRA factor trains."""
    cfg = tiny_experiment(**{"train.run_dir": str(tmp_path / "r"), "train.steps": 3,
                             "train.optim.trainable": list(LORA_ONLY)})

    def model_fn():
        m = ToyLM(cfg.model.decoder, rngs=nnx.Rngs(0))
        apply_lora(m, LoRAConfig(rank=4, alpha=8, dropout=0.1, target=r"(q_proj|v_proj)$"), nnx.Rngs(1))
        return m

    res = fit_toy(cfg, model_fn=model_fn)
    before, after = _init_params(cfg, model_fn), params_np(res.state)
    lora = {k for k in before if ".lora." in k}
    assert len(lora) == cfg.model.decoder.num_layers * 2 * 2  # layers x (q, v) x (a, b)
    for k in before:
        same = np.array_equal(before[k], after[k])
        assert same != (k in lora), k
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model_fn(), LoRAParam)))
    assert len(jax.tree.leaves(res.state.extra)) > 0  # the dropout RNG stream is threaded through


def test_eval_hook_and_best_checkpoint_retention(tmp_path):
    """Eval every step; keep the last 1 and the best 1 by eval/loss in 'max' mode, so the
    first eval (highest loss) survives next to the last step."""
    cfg = tiny_experiment(**{"train.run_dir": str(tmp_path / "r"), "train.eval_every": 1, "train.eval_steps": 2,
                             "train.checkpoint.every_steps": 1, "train.checkpoint.keep_last": 1,
                             "train.checkpoint.keep_best": 1, "train.checkpoint.best_mode": "max"})
    from tests.toy import toy_data
    res = fit_toy(cfg, eval_data=lambda: toy_data(cfg, split="eval"),
                  eval_hooks=[lambda model, step: {"hook_step": step}])
    losses = [e["eval/loss"] for e in res.eval_history]
    assert [e["eval/hook_step"] for e in res.eval_history] == [1, 2, 3, 4, 5]
    best = 1 + int(np.argmax(losses))
    kept = sorted(int(p.name) for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == sorted({best, 5})
    # resumed for 2 more steps, the run still knows the saved steps' metrics (on disk): best kept
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=7))
    res2 = fit_toy(more, eval_data=lambda: toy_data(more, split="eval"))
    losses += [e["eval/loss"] for e in res2.eval_history]
    assert len(losses) == 7
    kept = sorted(int(p.name) for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == sorted({1 + int(np.argmax(losses)), 7})


def test_data_that_ends_early_stops_the_run_cleanly(tmp_path):
    """Training data that ends at batch 5 of train.steps=10 (data.num_epochs reached): fit stops
    there, saves step 5 with the eval metrics of that step, and logs it (log_every=0: only the
    last step). It raised a bare StopIteration and lost everything since the last save."""
    from tests.toy import toy_data
    cfg = tiny_experiment(**{"train.run_dir": str(tmp_path / "r"), "train.steps": 10, "train.log_every": 0,
                             "train.eval_every": 5, "train.eval_steps": 1, "train.checkpoint.every_steps": 4,
                             "train.checkpoint.keep_last": 5, "train.checkpoint.keep_best": 1,
                             "data_options": {"num_batches": 5}})
    res = fit_toy(cfg, eval_data=lambda: toy_data(cfg, split="eval"))
    assert res.status == "completed" and [h["step"] for h in res.history] == [1, 2, 3, 4, 5]
    ckpts = tmp_path / "r" / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [4, 5]
    saved = json.loads((ckpts / "5" / "metrics" / "metrics").read_text())     # Orbax's metrics item
    assert saved["eval/loss"] == pytest.approx(res.eval_history[-1]["eval/loss"])
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [5]


def test_skip_by_cond_and_by_select_give_the_same_state():
    """The NaN guard's two forms (``lax.cond`` on CPU, a select of new and old values elsewhere)
    train to bit-identical states over steps that include a skipped one."""
    from mllm_jax.train.loop import jit_train_step, make_train_step
    from mllm_jax.train.optim import build_optimizer
    from mllm_jax.train.registry import make_loss_fn
    from mllm_jax.train.state import create_train_state
    from tests.toy import one_device_mesh, scaled_ntp, toy_data
    cfg = tiny_experiment(**{"data_options": {"nan_batches": [1]}})
    batches = [b for _, b in zip(range(3), iter(toy_data(cfg)))]
    tx, sched = build_optimizer(cfg.train.optim, cfg.train.steps)
    mesh = one_device_mesh()
    final = {}
    for cond in (True, False):
        state, shardings = create_train_state(lambda: TOY_LM.build(cfg, nnx.Rngs(0)), tx, cfg.train.optim, mesh,
                                              seed=0)
        step = jit_train_step(make_train_step(make_loss_fn(scaled_ntp()), tx, sched, mesh=mesh,
                                              skip_with_cond=cond), shardings, mesh)
        finite = []
        for b in batches:
            state, m = step(state, b)
            finite.append(bool(m["finite"]))
        assert finite == [True, False, True] and int(state.skipped) == 1
        final[cond] = jax.tree.leaves(jax.device_get((state.params, state.opt_state, state.step)))
    assert all(np.array_equal(a, b) for a, b in zip(final[True], final[False]))


def test_state_model_is_in_eval_mode():
    """``TrainState.model()`` (what eval, the demo and generate_cli use) has dropout off: LoRA
    dropout applied silently to eval scores and embeddings before."""
    from mllm_jax.config import OptimConfig
    from mllm_jax.train.optim import build_optimizer
    from mllm_jax.train.state import create_train_state
    from tests.toy import one_device_mesh

    def build():
        m = TOY_LM.build(tiny_experiment(), nnx.Rngs(params=0, dropout=1))
        apply_lora(m, LoRAConfig(rank=2, dropout=0.5, target=r"q_proj$"), nnx.Rngs(params=2, dropout=3))
        return m
    tx, _ = build_optimizer(OptimConfig(), 1)
    state, _ = create_train_state(build, tx, OptimConfig(), one_device_mesh(), seed=0)
    drops = [m for _, m in nnx.iter_modules(state.model()) if isinstance(m, nnx.Dropout)]
    assert drops and all(m.deterministic for m in drops)


def test_progress_bar_shows_the_loss_of_the_step_it_counts(monkeypatch):
    """Each refresh of the bar at step n (``update``) carries step n's loss, not step n-1's."""
    import tqdm.auto

    from mllm_jax.train.metrics import Progress
    shown = []

    class Bar:
        def __init__(self, **kw):
            self.n, self.post = kw.get("initial", 0), {}

        def set_postfix(self, post, refresh=True):
            self.post = dict(post)

        def update(self, n):
            self.n += n
            shown.append((self.n, self.post.get("loss")))

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    bar = Progress(3, 0, enabled=True)
    for loss in (3.0, 2.0, 1.0):
        bar.update(1, {"loss": loss})
    assert shown == [(1, "3.0000"), (2, "2.0000"), (3, "1.0000")]
