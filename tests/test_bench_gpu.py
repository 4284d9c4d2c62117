"""`scripts/gpu_check.sh --quick`: the prepared GPU check runs on CPU at tiny sizes and writes gpu.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_quick(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "bench"), "FEED": "0", "ATTNFD": f"{sys.executable} -m stages.cli",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--quick"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "bench" / "gpu.json").read_text())
    for key in ("step_ratio_cached_over_online", "step_ratio_cached_over_inmemory",
                "peak_mem_ratio_cached_over_online", "cache_build_over_teacher_inference"):
        assert res[key]["value"] > 0, key
    assert res["step_ratio_cached_over_online"]["goal"] == "<= 0.6"
    assert res["peak_mem_ratio_cached_over_online"]["goal"] == "< 1"
    steps = res["step_s"]
    assert set(steps) == {"plain", "inmemory", "cached", "online"} and all(v > 0 for v in steps.values())
    # the ratio is the median of per-repeat ratios: one repeat in --quick, so it is that repeat's ratio
    assert abs(res["step_ratio_cached_over_online"]["value"] - steps["cached"] / steps["online"]) < 1e-9
    assert set(res["peak_memory_bytes"]) == {"inmemory", "cached", "online"}
    assert res["feed_samples_per_s"]["0"] > 0 and res["device"]["type"] == "cpu" and res["quick"] is True
    assert (tmp_path / "bench" / "gpu.md").read_text().startswith("# bench-gpu")
