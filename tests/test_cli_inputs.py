"""Inputs that used to slip through or crash: each is one line naming the option / key / file, exit code 2,
no traceback, nothing left written."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from attnfd_pipeline.config import dump_toml
from stages.cli import app

runner = CliRunner()


def _cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    r.text = " ".join(r.output.replace("│", " ").split())  # one line, whatever rich wrapped (usage errors)
    return r


@pytest.fixture
def config(tiny_cfg, tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(dump_toml(tiny_cfg))
    return p


@pytest.fixture
def bundle(tiny_cfg):
    """An untrained (seeded) teacher bundle of the tiny config: what export needs, without training."""
    from attnfd_pipeline.teacher import build_teacher_model, bundle_path, save_bundle

    torch.manual_seed(0)
    save_bundle(bundle_path(tiny_cfg), tiny_cfg, build_teacher_model(tiny_cfg, 11).eval(), None, 11)
    return bundle_path(tiny_cfg)


@pytest.mark.parametrize("fmt, name, want", [("onnx", "t.pt", "t.onnx"), ("torchscript", "t.onnx", "t.pt")])
def test_export_checks_the_output_name_before_writing(config, tmp_path, fmt, name, want):
    r = _cli("export", "-c", config, "--format", fmt, "--out", tmp_path / name)
    assert r.exit_code == 2 and f"--out {tmp_path / name}" in r.output and f"--out {want}" in r.output, r.output
    assert not (tmp_path / name).exists()


def test_a_failed_export_removes_what_it_wrote(config, bundle, tmp_path, monkeypatch):
    """A user error after the file was written (exit 2, one line) and a bug (any other exception: it keeps its
    traceback, exit 1) both leave no file behind."""
    import attnfd_pipeline.inference as inference
    from attnfd_pipeline.errors import UserError

    out = tmp_path / "model.pt"
    for error, code in ((UserError, 2), (ValueError, 1)):
        def broken(*a, **k):
            raise error("the exported model does not load")

        monkeypatch.setattr(inference, "compare_outputs", broken)
        r = runner.invoke(app, ["export", "-c", str(config), "--out", str(out)])
        assert r.exit_code == code and "torchscript model written" in r.output, r.output
        assert not out.exists() and not list(tmp_path.glob(".model*"))
        if code == 2:
            assert "error: the exported model does not load" in r.output and r.exception.__class__ is SystemExit
        else:  # not the project's own error type: not reported as the user's mistake
            assert type(r.exception) is ValueError and "error: the exported" not in r.output


@pytest.mark.parametrize("images", ["0", "-5"])
def test_cache_plan_refuses_a_non_positive_image_count(config, images):
    r = _cli("cache", "plan", "-c", config, "--images", images)
    assert r.exit_code == 2 and "'--images'" in r.text and "greater than or equal to 1" in r.text, r.output


def test_cache_plan_refuses_a_non_positive_throughput(config):
    r = _cli("cache", "plan", "-c", config, "--images", "4", "--teacher-images-per-s", "0")
    assert r.exit_code == 2 and "'--teacher-images-per-s': 0 is not > 0" in r.text, r.output


def test_conflicting_sources_are_refused_naming_both(config, tmp_path):
    r = _cli("student", "-c", config, "--alpha", "0", "--set", "student.alpha=5")
    assert r.exit_code == 2 and "--alpha 0.0 and --set student.alpha=5 both set student.alpha" in r.text, r.output
    r = _cli("teacher", "-c", config, "--seed", "1", "--set", "teacher.train.seed=2")
    assert r.exit_code == 2 and "--seed 1 and --set teacher.train.seed=2 both set" in r.text, r.output
    r = _cli("evaluate", "-c", config, "--checkpoint", tmp_path / "a.pt", "--bundle", tmp_path / "b.pt")
    assert r.exit_code == 2 and f"--checkpoint {tmp_path / 'a.pt'} and --bundle {tmp_path / 'b.pt'}" in r.text, r.output


def test_cache_plan_marks_the_configs_encoding_and_shows_free_disk(config, tmp_path):
    import shutil

    r = _cli("cache", "plan", "-c", config, "--images", "10", "--set", 'cache.encoding="int8"')
    assert r.exit_code == 0, r.output
    marked = [line.split()[0] for line in r.output.splitlines() if "<- this config" in line]
    assert marked == ["int8"]
    free = shutil.disk_usage(tmp_path).free / 1e9
    line = next(line for line in r.output.splitlines() if line.startswith("free disk at "))
    assert abs(float(line.split(": ")[1].split()[0].replace(",", "")) - free) < 1.0, line
