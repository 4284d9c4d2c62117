"""`attnfd cache plan|build|info|verify` through typer's CliRunner on the fake teacher and dataset
(the cache_cli_env fixture of conftest.py)."""

from __future__ import annotations

import json

from attnfd_pipeline.cache.writer import shard_file
from fakes import cache_cli, tree_bytes


def test_plan_build_info_verify(cache_cli_env):
    cfg_path, tmp_path, seen = cache_cli_env
    r = cache_cli("plan", "--config", cfg_path)
    assert r.exit_code == 0, r.output
    assert "samples: 5 images × K=2 = 10" in r.output and "fits on disk" in r.output
    assert str(seen["teacher"]).endswith("runs/tiny/teacher/teacher_bundle.pt")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("part-*"))  # plan writes nothing

    r = cache_cli("build", "--config", cfg_path, "--no-progress", "--teacher", tmp_path / "t.pt")
    assert r.exit_code == 0, r.output
    assert "shards written 3, skipped 0 of 3" in r.output and seen["teacher"] == tmp_path / "t.pt"
    (cache_dir,) = [p for p in (tmp_path / "cache").iterdir()]
    before = tree_bytes(cache_dir)
    r = cache_cli("build", "--config", cfg_path, "--no-progress")
    assert r.exit_code == 0 and "shards written 0, skipped 3 of 3" in r.output
    assert tree_bytes(cache_dir) == before

    r = cache_cli("info", "--config", cfg_path, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["complete"] and d["targets"]["D"]["shape"] == [5, 2, 8, 8, 8] and d["codec"] == "zstd"
    r = cache_cli("info", "--path", cache_dir)
    assert r.exit_code == 0 and "complete: yes (3/3 shards, 10/10 samples)" in r.output

    r = cache_cli("verify", "--config", cfg_path)
    assert r.exit_code == 0, r.output
    assert "OK" in r.output and "replayed: 8" in r.output

    shard_file(cache_dir, "B", 1).unlink()
    r = cache_cli("verify", "--config", cfg_path)
    assert r.exit_code == 1
    assert "image 'img_002' (index 2), aug seed 0, target 'B'" in r.output
    assert "image 'img_003' (index 3), aug seed 1, target 'B'" in r.output


def test_errors_are_one_line_exit_2(cache_cli_env):
    cfg_path, tmp_path, _ = cache_cli_env
    r = cache_cli("build", "--config", tmp_path / "missing.toml")
    assert r.exit_code == 2 and "config file not found" in r.output
    r = cache_cli("plan", "--config", cfg_path, "--set", "cache.K=0")
    assert r.exit_code == 2 and "cache.K" in r.output
    r = cache_cli("info", "--config", cfg_path)  # nothing built yet
    assert r.exit_code == 2 and "no cache" in r.output
    r = cache_cli("plan", "--config", cfg_path, "--set", "cache.points=['E']", "--set", "cache.extra=['raw']")
    assert r.exit_code == 0 and "raw_E" in r.output
    r = cache_cli("verify", "--config", cfg_path, "--set", "cache.K=3")
    assert r.exit_code == 2 and "no cache" in r.output and "Traceback" not in r.output
