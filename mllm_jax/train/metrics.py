"""Run output on process 0: ``metrics.jsonl`` (one JSON object per logged step, every loss part
named), TensorBoard event files (tensorboardX, as MaxText writes them), and a tqdm progress bar.

Other processes get a writer that does nothing, so the loop calls it unconditionally.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps the records of ``path`` up to ``last_step`` (and none that do not parse: a line a
    kill cut short), rewritten atomically."""
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = int(json.loads(line)["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        tmp.replace(path)


class MetricsWriter:
    """``write(step, {"loss": .., "loss/ntp": .., ...})`` -> JSONL + TensorBoard scalars."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: Optional[int] = None):
        """``resume_step``: the step a resumed run restored. The steps after it, logged by the run
        that was stopped or killed and now trained again, are dropped from ``metrics.jsonl`` (with
        a line cut short by a kill), and TensorBoard is told to purge them (tensorboardX's
        ``purge_step``), so each step is logged once, by the run the checkpoints hold."""
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            _truncate_jsonl(self.path, resume_step)
        self._jsonl = self.path.open("a", buffering=1)  # line-buffered: a killed run keeps its lines
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(logdir=str(run_dir / "tensorboard"), flush_secs=30,
                                     purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: _scalar(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _scalar(v):
    """A JSON-able scalar: bools and ints stay, floats that are not finite become strings."""
    if isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    f = float(v)
    return f if math.isfinite(f) else str(f)


class Progress:
    """A tqdm bar showing loss, tokens/s and MFU (process 0, when enabled)."""

    def __init__(self, total: int, initial: int, *, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")

    def update(self, n: int, metrics: Optional[dict] = None) -> None:
        if self._bar is None:
            return
        if metrics:     # before update(), whose refresh shows it: the bar at step n shows step n's loss
            post = {"loss": f"{metrics['loss']:.4f}"}
            if "tokens_per_s" in metrics:
                post["tok/s"] = f"{metrics['tokens_per_s']:.3g}"
            if metrics.get("mfu") is not None:
                post["mfu"] = f"{100 * metrics['mfu']:.1f}%"
            self._bar.set_postfix(post, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Throughput:
    """Step time, tokens/s and MFU over the steps ticked since the last ``measure``/``reset``.

    ``peak_flops`` is the whole mesh's peak (None: no MFU)."""

    def __init__(self, peak_flops: Optional[float]):
        self.peak = peak_flops
        self.reset()

    def reset(self) -> None:
        self._t, self._steps, self._tokens, self._flops = time.perf_counter(), 0, 0, 0.0

    def tick(self, tokens: int, flops: float) -> None:
        self._steps += 1
        self._tokens += tokens
        self._flops += flops

    def measure(self) -> dict[str, float]:
        dt, n = time.perf_counter() - self._t, self._steps
        out = {}
        if n and dt > 0:
            out = {"step_time_s": dt / n, "tokens_per_s": self._tokens / dt}
            if self.peak:
                out["mfu"] = self._flops / dt / self.peak
        self.reset()
        return out


__all__ = ["MetricsWriter", "Progress", "Throughput"]
