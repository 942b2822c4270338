"""The training system (imports are per module; nothing heavy happens on package import).

    state.py        TrainState (graphdef + trainable / frozen params + other variables + optimiser
                    state + step + RNG) and its abstract, sharded twin
    optim.py        optax AdamW / SGD / Adafactor, schedules, clipping, freeze and weight-decay masks
    loop.py         the jitted train / eval steps and ``fit`` (NaN guard, preemption, metrics, eval)
    checkpoint.py   Orbax: params, optimiser, data-iterator state, RNG, config; fallback on corruption
    stages.py       multi-stage recipes (InfMLLM's three stages), hand-over between stages
    distributed.py  jax.distributed for multi-host runs, process-local batches
    registry.py     model / objective / data names in configs -> code
    experiment.py   ExperimentConfig -> a run (what the CLI calls)
    plan.py         size a run for any mesh without allocating (``python -m mllm_jax plan``)
    flops.py        parameter tables, FLOPs per step, device peaks (MFU)
    metrics.py      metrics.jsonl, TensorBoard, progress bar
"""
