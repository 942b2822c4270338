"""Reports: the side-by-side Markdown table, the JSON dump, and the two figures."""
import json

import numpy as np
import pytest

from mllm_jax.eval.report import markdown_table, plot_losses, plot_similarity, read_metrics, write_json

RESULTS = {"generative": {"vqa_acc": 0.5, "i2t_r1": 0.1, "pope_f1": None, "details": {"x": 1}},
           "vladva": {"vqa_acc": 0.25, "i2t_r1": 0.75, "pope_f1": 0.6},
           "sugar": {"vqa_acc": 0.5, "i2t_r1": 0.5, "pope_f1": float("nan")}}


def test_markdown_table_bolds_the_best_of_each_row():
    md = markdown_table(RESULTS).splitlines()
    assert md[0] == "| metric | generative | vladva | sugar |"
    assert md[1] == "|---|---:|---:|---:|"
    assert md[2] == "| vqa_acc | **0.500** | 0.250 | **0.500** |"         # ties: both bold
    assert md[3] == "| i2t_r1 | 0.100 | **0.750** | 0.500 |"
    assert md[4] == "| pope_f1 | – | 0.600 | – |"                          # a lone number is not "best"
    assert len(md) == 5                                                     # details left out
    assert markdown_table(RESULTS, ["i2t_r1"], digits=1, bold_best=False).splitlines()[2] == \
        "| i2t_r1 | 0.1 | 0.8 | 0.5 |"
    nan32 = markdown_table({"a": {"x": np.float32("nan")}, "b": {"x": 0.5}}).splitlines()[2]
    assert nan32 == "| x | – | 0.500 |"                                    # numpy NaN too


def test_write_json_handles_numpy_and_nan(tmp_path):
    p = write_json({"a": np.float32(0.5), "b": np.arange(3), "c": float("nan"), "d": {"e": np.int64(2)}},
                   tmp_path / "sub" / "r.json")
    assert json.loads(p.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": None, "d": {"e": 2}}


def _metrics_file(path, scale):
    lines = [json.dumps({"step": s, "loss": scale / (s + 1), "loss/ntp": scale / (s + 2), "lr": 1e-3,
                         "loss/bad": "nan"}) for s in range(5)]
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_loss_curves(tmp_path):
    a, b = _metrics_file(tmp_path / "a.jsonl", 1.0), _metrics_file(tmp_path / "b.jsonl", 2.0)
    m = read_metrics(a)
    assert set(m) == {"loss", "loss/ntp"}
    np.testing.assert_array_equal(m["loss"][0], np.arange(5))
    np.testing.assert_allclose(m["loss/ntp"][1], 1.0 / (np.arange(5) + 2))
    out = plot_losses({"sugar": a, "vladva": b}, tmp_path / "fig" / "losses.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        read_metrics(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="no 'acc"):
        plot_losses({"a": a}, tmp_path / "x.png", prefix="acc")


def test_similarity_figure(tmp_path):
    rng = np.random.default_rng(0)
    out = plot_similarity(rng.random((6, 6)), np.eye(6), tmp_path / "sim.png", labels=list("abcdef"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="equal 2-D shapes"):
        plot_similarity(np.eye(3), np.eye(4), tmp_path / "x.png")
