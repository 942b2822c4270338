"""Reports: a Markdown table of arms side by side, a JSON dump, and matplotlib figures (loss
curves from ``metrics.jsonl`` files, model vs target similarity matrices).

    md = markdown_table({"generative": res_g, "vladva": res_v, "sugar": res_s})
    write_json({"generative": res_g, ...}, "results/demo.json")
    plot_losses({"sugar": "runs/sugar/metrics.jsonl", ...}, "results/losses.png")
    plot_similarity(sim_model, sim_target, "results/similarity.png")

Every metric is higher-is-better, so the best value of a row is its maximum (all ties bold).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np


def _fmt(v, digits: int) -> str:
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)


def markdown_table(results: Mapping[str, Mapping[str, float]], metrics: Optional[Sequence[str]] = None, *,
                   digits: int = 3, bold_best: bool = True) -> str:
    """Arms as columns, metrics as rows (default: every scalar key of the first arm, in order;
    nested dicts such as ``details`` are left out). Missing / None / NaN values show as "–"."""
    arms = list(results)
    if not arms:
        raise ValueError("markdown_table: no arms")
    if metrics is None:
        metrics = [k for k, v in results[arms[0]].items() if v is None or isinstance(v, (int, float, np.number))]
    lines = ["| metric | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    for m in metrics:
        vals = [results[a].get(m) for a in arms]
        nums = [float(v) for v in vals if isinstance(v, (int, float, np.number)) and not math.isnan(float(v))]
        best = max(nums) if nums else None
        cells = []
        for v in vals:
            s = _fmt(v, digits)
            if bold_best and best is not None and len(nums) > 1 and s != "–" and float(v) == best:
                s = f"**{s}**"
            cells.append(s)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x


def write_json(obj, path: str | Path) -> Path:
    """Writes ``obj`` (numpy scalars/arrays converted, NaN/inf -> null) as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    return path


def read_metrics(path: str | Path, prefix: str = "loss") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (steps, values)}`` for every key starting with ``prefix`` in a ``metrics.jsonl``
    (one JSON object per line with a ``step``); non-numeric values are skipped."""
    series: dict[str, tuple[list, list]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e}); expected one metrics object per line") from None
        for k, v in rec.items():
            if k.startswith(prefix) and isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in rec:
                s = series.setdefault(k, ([], []))
                s[0].append(rec["step"])
                s[1].append(v)
    return {k: (np.asarray(s), np.asarray(v, float)) for k, (s, v) in series.items()}


def _figure(**kw):
    """A matplotlib ``Figure`` that does not touch pyplot's global state or backend."""
    from matplotlib.figure import Figure
    return Figure(**kw)


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def plot_losses(runs: Mapping[str, str | Path], out: str | Path, *, prefix: str = "loss") -> Path:
    """One panel per loss part (``loss``, ``loss/ntp``, ``loss/structure``, ...), one line per arm."""
    data = {arm: read_metrics(p, prefix) for arm, p in runs.items()}
    parts = sorted({k for d in data.values() for k in d}, key=lambda k: (k != prefix, k))
    if not parts:
        raise ValueError(f"plot_losses: no '{prefix}*' metrics in {list(map(str, runs.values()))}")
    fig = _figure(figsize=(4 * len(parts), 3.2), layout="tight")
    axes = fig.subplots(1, len(parts), squeeze=False)
    for ax, part in zip(axes[0], parts):
        for arm, d in data.items():
            if part in d:
                ax.plot(*d[part], label=arm)
        ax.set_title(part)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_similarity(model_sim: np.ndarray, target_sim: np.ndarray, out: str | Path, *,
                    titles: Sequence[str] = ("model", "target"), labels: Optional[Sequence[str]] = None,
                    shared_scale: bool = True) -> Path:
    """The model's and the target's similarity matrices of one batch, side by side (one colour
    scale for both unless ``shared_scale=False``)."""
    a, b = np.asarray(model_sim, float), np.asarray(target_sim, float)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"plot_similarity: model {a.shape} and target {b.shape} must be equal 2-D shapes")
    fig = _figure(figsize=(9, 4), layout="tight")
    axes = fig.subplots(1, 2)
    lim = dict(vmin=min(a.min(), b.min()), vmax=max(a.max(), b.max())) if shared_scale else {}
    for ax, m, t in zip(axes, (a, b), titles):
        im = ax.imshow(m, cmap="viridis", **lim)
        ax.set_title(t)
        fig.colorbar(im, ax=ax, fraction=0.046)
        if labels is not None:
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
    return _save(fig, out)


__all__ = ["markdown_table", "write_json", "read_metrics", "plot_losses", "plot_similarity"]
