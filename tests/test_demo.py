"""`make demo` end to end in its --quick form (slow: ~2 min of compiles on 2 cores)."""
import json

import pytest

from mllm_jax.demo import ARMS, HEADLINE, main


@pytest.mark.slow
def test_quick_demo_writes_the_table_json_and_plots(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "demo.json").read_text())
    assert set(res) == set(ARMS) | {"seconds"} and res["seconds"] > 0
    for arm in ARMS:
        assert set(res[arm]) == set(HEADLINE)
        assert all(0.0 <= v <= 1.0 for v in res[arm].values()), res[arm]
    for f in ("demo.md", "demo/losses.png", "demo/similarity_sugar.png", "demo/details.json"):
        assert (tmp_path / f).stat().st_size > 0, f
    # a second run reuses the cached stages (config hashes match) and gives the same table
    assert main(["--quick", "--out", str(tmp_path), "--arms", "generative"]) == 0
    again = json.loads((tmp_path / "demo.json").read_text())
    assert again["generative"] == res["generative"]
