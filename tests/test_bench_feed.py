"""`attnfd bench-feed --quick`: the harness runs end to end on tiny shapes and writes consistent figures."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from stages.cli import app

KEYS = ("target_read_ms", "image_side_ms", "build_host_ms", "device_encode_ms", "device_decode_ms",
        "stored_bytes_per_sample", "shm_bytes_per_sample", "h2d_bytes_per_sample", "floor_memcpy_ms",
        "floor_page_cache_ms", "disk_bytes_per_sample", "targets_plus_image_ms", "cores_feed_at_S", "cores_build_at_R")


def test_bench_feed_quick_writes_consistent_figures(tmp_path):
    out = tmp_path / "bench"
    r = CliRunner().invoke(app, ["bench-feed", "--quick", "--out", str(out), "--work-dir", str(tmp_path),
                                 "--demo-config", str(tmp_path / "absent.toml")])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "feed.json").read_text())
    assert "feed.md" in {p.name for p in out.iterdir()} and "## Goals (int8)" in (out / "feed.md").read_text()
    for enc in ("int8", "float16"):
        f = res[enc]
        for k in KEYS:
            assert isinstance(f[k], (int, float)) and f[k] > 0, (enc, k, f[k])
        assert f["targets_plus_image_ms"] == f["target_read_ms"] + f["image_side_ms"]
        assert f["cores_feed_at_S"] == 200.0 * f["targets_plus_image_ms"] / 1e3
        assert f["h2d_bytes_per_sample"] == f["shm_bytes_per_sample"]
        assert f["disk_bytes_per_sample"] > 0
        assert {g["figure"] for g in f["goals"]} == {"target_read_ms", "image_side_ms", "targets_plus_image_ms",
                                                     "build_host_ms", "h2d_bytes_per_sample"}
    # stored bytes = the sum of the stored arrays: float16 2 B per value; int8 1 B per value + a float32 scale
    # and offset per channel (the quick R18 teacher: B 512, E 256, D 256 channels)
    values = res["float16"]["float32_bytes_per_sample"] // 4
    assert res["float16"]["stored_bytes_per_sample"] == 2 * values
    assert res["int8"]["stored_bytes_per_sample"] == values + 8 * (512 + 256 + 256)
    assert res["float16"]["shm_bytes_per_sample"] == res["float16"]["stored_bytes_per_sample"]
    # int8 reaches the loader either decoded (float32) or as stored
    assert res["int8"]["shm_bytes_per_sample"] in (res["int8"]["stored_bytes_per_sample"], 4 * values)
    met = {g["figure"]: g["met"] for g in res["int8"]["goals"]}
    i8 = res["int8"]
    assert met["h2d_bytes_per_sample"] == (i8["h2d_bytes_per_sample"] == i8["stored_bytes_per_sample"])
    # the image side per implementation: the newest ships uint8 crops (a quarter of the float32 bytes)
    img = res["image_side"]
    assert img["impl1"]["image_shm_bytes_per_sample"] == 4 * img["impl2"]["image_shm_bytes_per_sample"]
    assert res["int8"]["image_side_ms"] == img["impl2"]["image_side_ms"]
    codecs = res["codecs"]["workload_teacher"]["int8"]
    assert set(codecs) == {"zstd-1", "blosc-lz4-shuffle", "blosc-lz4-noshuffle", "none"}
    assert codecs["none"]["ratio"] == 1.0 and codecs["zstd-1"]["ratio"] > 1.0
    assert "demo_teacher" not in res["codecs"] and "absent.toml" in res["codecs"]["demo_teacher_source"]
