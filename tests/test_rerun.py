"""A rerun never overwrites finished work: a finished student run or teacher bundle is reused when the recipe
matches, refused (naming the differing keys and --force / another name) when it does not, replaced with --force."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from attnfd_pipeline.config import dump_toml
from attnfd_pipeline.runs import student_dir
from attnfd_pipeline.teacher import bundle_path
from stages.cli import app

runner = CliRunner()


def _cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    return r


def _config(cfg, tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(dump_toml(cfg))
    return p


@pytest.mark.slow
def test_a_finished_student_run_is_reused_refused_or_replaced_with_force(tiny_cfg, tmp_path):
    p = _config(tiny_cfg, tmp_path)
    r = _cli("student", "-c", p, "--alpha", "0")
    assert r.exit_code == 0, r.output
    from attnfd_pipeline.config import load_config

    result = student_dir(load_config(p, ["student.alpha=0"])) / "result.json"
    first = result.read_bytes()
    r = _cli("student", "-c", p, "--alpha", "0")
    assert r.exit_code == 0 and "finished run reused" in r.output, r.output
    assert result.read_bytes() == first
    r = _cli("student", "-c", p, "--alpha", "0", "--set", "student.train.epochs=2")
    assert r.exit_code == 2, r.output
    assert "student.train.epochs: 1 → 2" in r.output and "--force" in r.output and "name=" in r.output
    assert result.read_bytes() == first  # nothing finished was touched
    import attnfd_pipeline.runs.student as runs_student

    real = runs_student.fit

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    runs_student.fit = interrupted  # a forced retrain cut short: the old result is not found as finished
    try:
        r = _cli("student", "-c", p, "--alpha", "0", "--set", "student.train.epochs=2", "--force")
    finally:
        runs_student.fit = real
    assert r.exit_code == 130 and not result.exists(), r.output
    r = _cli("student", "-c", p, "--alpha", "0", "--set", "student.train.epochs=2", "--force")
    assert r.exit_code == 0, r.output
    assert json.loads(result.read_text())["epochs"] == 2


def test_a_finished_teacher_bundle_is_reused_or_refused(tiny_cfg, tmp_path):
    p = _config(tiny_cfg, tmp_path)
    r = _cli("teacher", "-c", p)
    assert r.exit_code == 0, r.output
    bundle = bundle_path(tiny_cfg)
    first = bundle.read_bytes()
    r = _cli("teacher", "-c", p, "--resume")
    assert r.exit_code == 0 and "reused" in r.output, r.output
    r = _cli("teacher", "-c", p, "--set", "teacher.train.lr=0.03")
    assert r.exit_code == 2, r.output
    assert "teacher.train.lr: 0.02 → 0.03" in r.output and "--force" in r.output and str(bundle) in r.output
    r = _cli("teacher", "-c", p, "--set", "teacher.train.device=\"cpu\"")  # where it runs is no other recipe
    assert r.exit_code == 0 and "reused" in r.output, r.output
    assert bundle.read_bytes() == first
    bundle.with_suffix(".json").unlink()  # a save killed between the .pt and its .json: not finished work
    from attnfd_pipeline.runs import reusable_teacher

    assert reusable_teacher(tiny_cfg) is None
