"""Bad input: each case gives one clear message naming the file or key, a non-zero exit through the CLI,
and writes nothing (no run, cache or output directory appears). Each test fails without its check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnfd_pipeline.config import dump_toml
from attnfd_pipeline.data import DataError, write_palette_png
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.utils import sha256_file
from stages.cli import app
from fakes import FakeTeacher, cache_cli

runner = CliRunner()


def cli(*args) -> "object":
    r = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    return r


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*")) if Path(d).exists() else []


@pytest.fixture
def setup(tiny_data, tmp_path):
    """A private copy of the tiny dataset and a config over it; runs and caches go under tmp_path."""
    from conftest import make_cfg

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    cfg = make_cfg(root, tmp_path)
    p = tmp_path / "cfg.toml"
    p.write_text(dump_toml(cfg))
    return cfg, p, root, tmp_path


def _read(path: Path) -> np.ndarray:
    from attnfd_pipeline.data import read_label_raw

    return read_label_raw(path)


# (what to break, file named in the message, words in the message)
DATASET_CASES = {
    "missing image": ("JPEGImages/train_00003.jpg", "missing"),
    "unreadable image": ("JPEGImages/train_00003.jpg", "unreadable image"),
    "missing label": ("SegmentationClass/train_00003.png", "missing"),
    "unreadable label": ("SegmentationClass/train_00003.png", "unreadable label"),
    "size mismatch": ("SegmentationClass/train_00003.png", "size mismatch"),
    "label values": ("SegmentationClass/train_00003.png", "label values {20, 99}"),
    "empty split": ("ImageSets/Segmentation/train.txt", "is empty"),
}


def _break(case: str, root: Path) -> Path:
    rel, _ = DATASET_CASES[case]
    f = root / rel
    if case.startswith("missing"):
        f.unlink()
    elif case.startswith("unreadable"):
        f.write_bytes(b"this is not an image")
    elif case == "size mismatch":
        write_palette_png(f, np.zeros((7, 9), np.uint8), [(0, 0, 0)])
    elif case == "label values":
        arr = _read(f).copy()
        arr[0, :2] = (20, 99)  # demo has 11 classes; 255 is the only other legal value
        write_palette_png(f, arr, [(0, 0, 0)])
    elif case == "empty split":
        f.write_text("")
    return f


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_bad_dataset_stops_teacher_before_writing(case, setup):
    """Missing / unreadable image or label, size mismatch, label values outside the classes and 255, an
    empty split: `attnfd teacher` names the file and exits 2 before it writes anything."""
    cfg, p, root, tmp = setup
    f = _break(case, root)
    r = cli("teacher", "--config", p)
    assert r.exit_code == 2 and str(f) in r.output and DATASET_CASES[case][1] in r.output, r.output
    assert not Path(cfg.runs_root).exists()


@pytest.mark.slow
def test_bad_dataset_stops_student_and_cache_build_before_writing(setup, tiny_pipeline):
    cfg, p, root, tmp = setup
    f = _break("label values", root)
    r = cli("student", "--config", p, "--alpha", "0")
    assert r.exit_code == 2 and str(f) in r.output and "label values {20, 99}" in r.output, r.output
    _, bundle = tiny_pipeline
    r = cli("cache", "build", "--config", p, "--teacher", bundle, "--no-progress")
    assert r.exit_code == 2 and str(f) in r.output, r.output
    assert not Path(cfg.runs_root).exists() and not Path(cfg.cache.root).exists()


def test_label_values_are_checked_when_loaded(setup):
    """The loader itself refuses an out-of-range label (the loss would crash or learn garbage on it),
    naming the file — also when the dataset was never checked."""
    cfg, _, root, _ = setup
    f = _break("label values", root)
    src = ImageSource.from_config(cfg)
    i = list(src.ids).index("train_00003")
    with pytest.raises(DataError, match=r"train_00003\.png has values \{20, 99\} outside the 11 classes"):
        src.load(i)
    src.load(i - 1)


def test_worker_errors_are_reported_without_the_worker_traceback():
    """An error raised in a DataLoader worker arrives as "Caught DataError in DataLoader worker process 0.
    Original Traceback …"; the CLI prints only the worker's own message."""
    from torch._utils import ExceptionWrapper

    from stages.common import message_of

    try:
        raise DataError("/d/x.png", "label /d/x.png has values {20} outside the 11 classes")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as e:
        wrapped.reraise()
    assert "Original Traceback" in str(e.value)
    assert message_of(e.value) == "label /d/x.png has values {20} outside the 11 classes"


# ---------------------------------------------------------------------------------------------
# wrong num_classes for a checkpoint / bundle


@pytest.fixture(scope="module")
def five_class_model():
    from attnfd_pipeline.models import build_model

    torch.manual_seed(0)
    return build_model("deeplabv3plus_resnet18", 5, inpath_attention=("B", "E", "D"))


def test_resume_from_a_checkpoint_for_other_classes_names_it(setup, five_class_model):
    """`attnfd teacher --resume` over a last.pt written for 5 classes (the dataset has 11): a clear error
    naming last.pt, exit 2, and the run directory is left as it was (not even its config is rewritten)."""
    cfg, p, _, _ = setup
    last = cfg.teacher_dir / "train" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save({"format": "attnfd-checkpoint/1", "modules": five_class_model.state_dict()}, last)
    before = files_under(cfg.teacher_dir)
    r = cli("teacher", "--config", p, "--resume")
    assert r.exit_code == 2 and str(last) in r.output and "does not fit this model" in r.output, r.output
    assert "(5, 256, 1, 1)" in r.output or "shape mismatch" in r.output
    assert files_under(cfg.teacher_dir) == before


def test_teacher_bundle_for_other_classes_names_it(setup, five_class_model):
    """A teacher bundle of 5 classes used with the 11-class dataset: `evaluate`, `cache build` and
    `student` name the bundle and exit 2 without writing; a bundle whose weights do not fit its own
    recorded model (tampered) names the file too."""
    from attnfd_pipeline.teacher import BUNDLE_FORMAT, bundle_path, save_bundle

    cfg, p, _, tmp = setup
    bundle = save_bundle(bundle_path(cfg), cfg, five_class_model, None, 5)
    before = files_under(cfg.runs_root)
    r = cli("evaluate", "--config", p)
    assert r.exit_code == 2 and str(bundle) in r.output and "5 classes" in r.output, r.output
    r = cli("cache", "build", "--config", p, "--no-progress")
    assert r.exit_code == 2 and str(bundle) in r.output and "5 classes" in r.output, r.output
    r = cli("student", "--config", p)
    assert r.exit_code == 2 and "teacher_bundle" in r.output and "5 classes" in r.output, r.output
    assert files_under(cfg.runs_root) == before and not Path(cfg.cache.root).exists()
    state = torch.load(bundle, weights_only=True)
    state["num_classes"] = 11  # claims 11, holds 5-class weights
    tampered = tmp / "tampered.pt"
    torch.save(state, tampered)
    side = json.loads(bundle.with_suffix(".json").read_text())  # with its sidecar: the bytes hash as recorded
    tampered.with_suffix(".json").write_text(json.dumps({**side, "file_sha256": sha256_file(tampered)}))
    assert state["format"] == BUNDLE_FORMAT
    r = cli("evaluate", "--config", p, "--bundle", tampered)
    assert r.exit_code == 2 and str(tampered) in r.output and "does not fit this model" in r.output, r.output


# ---------------------------------------------------------------------------------------------
# backbone weights


@pytest.mark.parametrize("problem", ["missing", "mismatching keys"])
def test_bad_backbone_weights_name_the_file(problem, setup):
    cfg, p, _, tmp = setup
    w = tmp / "resnet18-imagenet.pt"
    if problem == "mismatching keys":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "not_a_resnet.weight": torch.zeros(3)}, w)
        words = "missing keys"
    else:
        words = "not found"
    r = cli("teacher", "--config", p, "--set", f'teacher.model.backbone_weights="{w}"')
    assert r.exit_code == 2 and str(w) in r.output and words in r.output, r.output
    r = cli("student", "--config", p, "--alpha", "0", "--set", f'student.model.backbone_weights="{w}"')
    assert r.exit_code == 2 and str(w) in r.output and words in r.output, r.output
    assert not Path(cfg.runs_root).exists()


# ---------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("override, named", [
    ("teacher.train.bogus=1", "teacher.train.bogus: unknown key"),
    ("cache.K='four'", "cache.K: expected an integer"),
    ("augment.crop_size=[400, 400]", "augment.crop_size: [400, 400] is larger than any scaled image can fill"),
    ("cache.K=0", "cache.K: must be > 0"),
    ("student.alpha=-1", "student.alpha: must be >= 0"),
    ("teacher.train.lr=-0.1", "teacher.train.lr: must be > 0"),
])
@pytest.mark.parametrize("command", [("teacher",), ("student",), ("cache", "build", "--no-progress")])
def test_bad_config_names_the_key_and_writes_nothing(command, override, named, setup):
    cfg, p, _, tmp = setup
    before = files_under(tmp)
    r = cli(*command, "--config", p, "--set", override)
    assert r.exit_code == 2 and named in r.output and str(p) in r.output, r.output
    assert files_under(tmp) == before


# ---------------------------------------------------------------------------------------------
# a cache path that is not a cache


@pytest.mark.parametrize("kind", ["empty folder", "other files", "bad cache.json", "foreign cache.json", "no folder"])
def test_a_path_that_is_not_a_cache(kind, tmp_path):
    d = tmp_path / "somewhere"
    if kind != "no folder":
        d.mkdir()
    if kind == "other files":
        (d / "notes.txt").write_text("hello")
    elif kind == "bad cache.json":
        (d / "cache.json").write_text("{not json")
    elif kind == "foreign cache.json":
        (d / "cache.json").write_text(json.dumps({"format": "something-else/2", "fingerprint": "x"}))
    before = files_under(d)
    for command in ("verify", "info"):
        r = cli("cache", command, "--path", d)
        assert r.exit_code == 2 and str(d) in r.output and "not a" in r.output, r.output
    assert files_under(d) == before and (d.exists() or kind == "no folder")


# ---------------------------------------------------------------------------------------------
# teacher outputs that cannot be stored


class HugeTeacher(FakeTeacher):
    """Targets beyond float16's range (|x| > 65504) for D."""

    def targets(self, x, names):
        out = super().targets(x, names)
        if "D" in out:
            out["D"] = out["D"] * 1e6 + 1e5
        return out


@pytest.mark.parametrize("teacher, words", [
    (FakeTeacher(poison="E"), "target 'E': 2 non-finite teacher values (first at image 'img_000', aug seed 0"),
    (HugeTeacher(), "target 'D'"),
], ids=["non-finite", "float16 overflow"])
def test_teacher_outputs_that_cannot_be_stored_are_refused(teacher, words, cache_cli_env, monkeypatch):
    """Non-finite teacher outputs or values beyond float16's range: `cache build` names the target, image
    and seed, exits 2, and commits nothing (no manifest part, no shard data)."""
    import stages.cache as cache_stage

    cfg_path, tmp_path, _ = cache_cli_env
    monkeypatch.setattr(cache_stage, "load_teacher", lambda path, device: teacher)
    monkeypatch.setattr(cache_stage, "load_teacher_info", lambda path: teacher.info())
    r = cache_cli("build", "--config", cfg_path, "--no-progress")
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
    if isinstance(teacher, HugeTeacher):
        assert "overflow float16" in r.output and "image 'img_000', aug seed 0" in r.output
    cache = tmp_path / "cache"  # refused by the plan's measurement or by the writer: nothing committed
    assert not list(cache.glob("*/manifest/part-*")) and not list(cache.glob("*/features.zarr/*/c/*"))
