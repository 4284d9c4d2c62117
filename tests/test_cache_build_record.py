"""What the library settles around a cache build: the input checks before anything is written
(``plan.plan_build`` → ``source.check``) and the run's build record (``cache_build.json``, written by the build
functions with ``record=True`` and read back by ``build.read_build_record``)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from attnfd_pipeline.cache import build_cache
from attnfd_pipeline.cache.build import BUILD_RECORD, read_build_record
from attnfd_pipeline.cache.plan import plan_build
from attnfd_pipeline.errors import UserError
from fakes import FakeSource, FakeTeacher
from fakes import fake_cfg as make_cfg
from fakes import cache_cli as invoke

KEYS = {"path", "seconds", "samples_written", "bytes_written", "samples_per_s", "teacher_samples_per_s", "resumed",
        "writers"}


def _cfg(tmp_path):
    return replace(make_cfg(tmp_path / "cache"), runs_root=str(tmp_path / "runs"))


def test_a_build_with_record_writes_the_runs_build_record_and_its_reader_reads_it(tmp_path):
    cfg = _cfg(tmp_path)
    assert read_build_record(cfg) is None
    build_cache(cfg, FakeTeacher(), FakeSource(n=3), progress=False)  # no record asked: none written
    assert not (cfg.run_root / BUILD_RECORD).exists()
    more = _cfg(tmp_path / "more")
    r = build_cache(more, FakeTeacher(), FakeSource(), progress=False, record=True)
    rec = read_build_record(more)
    assert rec == json.loads((more.run_root / BUILD_RECORD).read_text()) and set(rec) == KEYS
    assert (rec["path"], rec["samples_written"], rec["writers"], rec["resumed"]) == (str(r.path), 10, 1, False)
    build_cache(more, FakeTeacher(), FakeSource(), progress=False, record=True)  # nothing left to write
    assert read_build_record(more) == rec


class _Refusing(FakeSource):
    def check(self, teacher):
        raise UserError(f"refused for {teacher.info()['model']}")


def test_plan_build_checks_the_source_before_it_plans(tmp_path):
    cfg = _cfg(tmp_path)
    plan = plan_build(cfg, FakeTeacher(), FakeSource())  # an in-memory source: nothing to check
    assert (plan.num_images, plan.samples, plan.measured) == (5, 10, True)
    with pytest.raises(UserError, match="refused for fake"):
        plan_build(cfg, FakeTeacher(), _Refusing())
    assert not (tmp_path / "cache").exists()  # refused before the plan probed anything


def test_cache_build_cli_writes_the_same_record(cache_cli_env):
    cfg_path, tmp_path, _ = cache_cli_env
    r = invoke("build", "--config", cfg_path, "--no-progress")
    assert r.exit_code == 0 and "shards written 3, skipped 0 of 3" in r.output, r.output
    rec = json.loads((tmp_path / "runs" / "tiny" / BUILD_RECORD).read_text())
    assert set(rec) == KEYS and rec["writers"] == 1 and rec["samples_written"] == 10 and f"cache: {rec['path']}" in r.output
