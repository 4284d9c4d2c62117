"""`attnfd bench --quick`: the harness runs end to end at tiny sizes and writes results.json (exact
top-level schema) and results.md (the table). Figures at these sizes mean nothing: no speed asserts."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from attnfd_pipeline.experiments.bench import GOALS, METRIC_KEYS, SWEEP_N, TOP_KEYS, VARIANTS
from stages.cli import app


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_bench_quick_writes_results(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--quick", "--out", str(out), "--config", "configs/demo.toml",
                                      "--work-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    res = json.loads((out / "results.json").read_text())

    assert set(res) == set(TOP_KEYS)
    assert set(TOP_KEYS) == set(METRIC_KEYS) | {"device", "torch_version", "config", "samples"}
    for key in METRIC_KEYS[:7]:
        m = res[key]
        assert _number(m["value"]), (key, m)
        if key in GOALS:
            assert m["goal"].startswith(GOALS[key][0]) and isinstance(m["met"], bool)
    for key in ("step_ratio_cached_over_plain", "step_ratio_online_over_cached", "saving_efficiency",
                "cache_build_over_teacher_inference", "reader_over_consumer"):
        assert len(res[key]["per_repeat"]) == res["config"]["workload"]["repeats"] == 1
    assert set(res["step_ratio_cached_over_plain"]["breakdown_s"]) == set(VARIANTS)
    assert set(res["peak_mem_ratio_cached_over_plain"]["bytes"]) == set(VARIANTS)

    st = res["storage"]
    assert set(st["bytes_per_sample"]) == {"B", "E", "D"}
    assert _number(st["compression_vs_float32"])
    assert any(o["mantissa_bits"] < 10 for o in st["options"].values())  # a mantissa-rounded option
    for o in st["options"].values():
        assert _number(o["rel_error"]) and _number(o["compression_vs_float32"])
        assert set(o["targets"]) == {"B", "E", "D"}

    sw = res["sweep_economics"]
    assert set(sw["N"]) == {str(n) for n in SWEEP_N}
    for row in sw["N"].values():
        assert _number(row["cached_s_per_image"]) and _number(row["online_s_per_image"])

    assert res["device"]["type"] in ("cpu", "cuda") and res["torch_version"]
    assert res["config"]["quick"] is True and res["config"]["workload"]["crop"] <= 48
    s = res["samples"]
    c = s["counts"]
    assert c["train_images"] > 0 and c["timed_steps_per_variant"] == len(s["step_s"]["plain"][0])
    for v in VARIANTS:
        assert len(s["step_s"][v]) == 1 and all(_number(t) for t in s["step_s"][v][0])
        assert s["memory"][v]["rss_peak_bytes"] > 0
    assert len(s["cache_build"]) == 1 and len(s["reader"]) == 1

    md = (out / "results.md").read_text()
    assert "| figure | value | goal | met |" in md
    for key in METRIC_KEYS[:7]:
        assert f"| `{key}` |" in md
    assert "Sweep economics" in md and "Storage per sample" in md
