"""Paths resolve from the config file's folder; `data check` counts, warns and explains; the CLI names
where a bad value came from; `attnfd --version`; no config outside the repository says what to pass."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

import attnfd_pipeline
from stages.cli import app

runner = CliRunner()


def _cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    return r


@pytest.fixture
def dataset(tiny_data, tmp_path):
    root = tmp_path / "mine" / "data"
    shutil.copytree(tiny_data, root)
    return root


def _config(folder, root_text: str):
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "mine.toml"
    p.write_text(f'name = "mine"\nruns_root = "runs"\n\n[data]\ndataset = "demo"\nroot = "{root_text}"\n'
                 f'num_workers = 0\n\n[cache]\nroot = "../cache"\n')
    return p


def test_relative_paths_in_a_config_file_are_from_its_folder(dataset, tmp_path):
    from attnfd_pipeline.config import load_config, write_resolved

    p = _config(tmp_path / "mine" / "configs", "../data")
    r = _cli("data", "check", "-c", p)  # run from the repository, not from the config's folder
    assert r.exit_code == 0 and "splits train, val OK" in r.output, r.output
    assert f"data {dataset} | runs {tmp_path / 'mine' / 'configs' / 'runs' / 'mine'}" in r.output  # resolved
    cfg = load_config(p)
    assert cfg.data.root == str(dataset) and cfg.runs_root == str(tmp_path / "mine" / "configs" / "runs")
    assert cfg.cache.root == str(tmp_path / "mine" / "cache")
    assert load_config(p, [f'data.root="{dataset}"']).data.root == str(dataset)  # absolute stays absolute
    assert load_config(p, ['data.root="elsewhere"']).data.root == "elsewhere"  # --set: from the current folder
    run = tmp_path / "mine" / "runs" / "x"
    assert load_config(write_resolved(cfg, run)) == cfg  # a resolved config loads back the same from anywhere
    demo = load_config("configs/demo.toml")  # the shipped configs, from the repository, keep their paths
    assert (demo.data.root, demo.runs_root, demo.cache.root) == ("data/demo", "runs", "cache")


def test_data_check_counts_warns_about_orphan_masks_and_explains_jpeg_masks(dataset, tmp_path):
    p = _config(tmp_path / "mine", "data")
    labels = dataset / "SegmentationClass"
    shutil.copy(labels / "train_00000.png", labels / "lost_00000.png")
    r = _cli("data", "check", "-c", p)
    assert r.exit_code == 0, r.output
    assert "11 classes, train 10 images, val 4 images" in r.output
    assert "warning: 1 mask(s) without their image" in r.output and str(labels / "lost_00000.png") in r.output
    mask = labels / "train_00003.png"
    Image.open(mask).convert("L").save(mask.with_suffix(".jpg"))
    mask.unlink()
    r = _cli("data", "check", "-c", p)
    assert r.exit_code == 1 and f"{mask}: listed label file is missing, but {mask.with_suffix('.jpg')}" in r.output
    assert "JPEG masks are refused" in r.output and "save masks as PNG" in r.output


def test_set_errors_name_the_override(tmp_path):
    r = _cli("student", "-c", "configs/demo.toml", "--set", "student.bogus=1")
    assert r.exit_code == 2 and "--set student.bogus=1 (over configs/demo.toml): student.bogus: unknown key" in r.output
    r = _cli("student", "-c", "configs/demo.toml", "--set", "student.alpha")
    assert r.exit_code == 2 and "--set 'student.alpha': expected KEY=VALUE" in r.output, r.output


def test_version_and_no_config_outside_the_repository(tmp_path, monkeypatch):
    r = _cli("--version")
    assert r.exit_code == 0 and r.output.strip() == f"attnfd {attnfd_pipeline.__version__}"
    monkeypatch.chdir(tmp_path)
    r = _cli("data", "check")
    assert r.exit_code == 2 and "configs/demo.toml" in r.output and "pass --config FILE" in r.output, r.output
