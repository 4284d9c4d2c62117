import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnfd_pipeline.data import DataError, check_dataset, generate_demo, list_split, load_pair, render_sample
from attnfd_pipeline.data.demo import DEMO_CLASS_NAMES, DEMO_PALETTE

SMALL = dict(n_train=12, n_val=4)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    a = generate_demo(base / "a", seed=0, workers=1, **SMALL)
    b = generate_demo(base / "b", seed=0, workers=2, **SMALL)  # process pool path
    c = generate_demo(base / "c", seed=1, workers=1, **SMALL)
    return a, b, c


def test_same_seed_identical_bytes_different_seed_differs(demo_dirs):
    a, b, c = demo_dirs
    ta, tb, tc = _tree(a), _tree(b), _tree(c)
    assert len(ta) == 2 * (12 + 4) + 2 + 1  # jpg + png per sample, two lists, demo.json
    assert ta == tb
    differing = [k for k in ta if k.endswith((".jpg", ".png")) and ta[k] != tc.get(k)]
    assert len(differing) == 2 * (12 + 4)


def test_layout_content_and_loader(demo_dirs):
    a = demo_dirs[0]
    assert (a / "ImageSets/Segmentation/train.txt").read_text().split() == [f"train_{i:05d}" for i in range(12)]
    meta = json.loads((a / "demo.json").read_text())
    assert meta["complete"] is True and meta["params"]["seed"] == 0 and meta["class_names"] == list(DEMO_CLASS_NAMES)
    seen = set()
    for split, n in (("train", 12), ("val", 4)):
        files = list_split("demo", a, split)
        assert len(files) == n
        for i in range(n):
            img, lbl = load_pair("demo", files, i)
            h, w = lbl.shape
            assert 96 <= h <= 160 and 96 <= w <= 160 and img.shape == (3, h, w)
            seen |= set(np.unique(lbl.numpy()).tolist())
    with Image.open(a / "SegmentationClass" / "train_00000.png") as im:
        assert im.mode == "P" and tuple(im.getpalette()[3:6]) == DEMO_PALETTE[1]
    with Image.open(a / "JPEGImages" / "train_00000.jpg") as im:
        assert im.format == "JPEG" and im.mode == "RGB"
    classes = seen - {255}
    assert 255 in seen  # boundary band
    assert len(classes) >= 9 and classes <= set(range(11))
    assert check_dataset("demo", a, ["train", "val"]) == []


def test_rerun_is_idempotent_and_repairs_missing_files(demo_dirs):
    a = demo_dirs[0]
    before = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}
    generate_demo(a, seed=0, workers=1, **SMALL)
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()} == before
    victim = a / "JPEGImages" / "train_00003.jpg"
    data = victim.read_bytes()
    victim.unlink()
    generate_demo(a, seed=0, workers=1, **SMALL)
    assert victim.read_bytes() == data
    assert (a / "demo.json").stat().st_mtime_ns == before[a / "demo.json"]
    untouched = a / "JPEGImages" / "train_00004.jpg"
    assert untouched.stat().st_mtime_ns == before[untouched]


def test_changed_params_regenerate_and_drop_stale_files(tmp_path):
    d = generate_demo(tmp_path / "d", seed=3, n_train=6, n_val=2, workers=1)
    generate_demo(d, seed=3, n_train=4, n_val=2, workers=1)
    assert sorted(p.name for p in (d / "JPEGImages").iterdir()) == [f"train_{i:05d}.jpg" for i in range(4)] + [
        "val_00000.jpg",
        "val_00001.jpg",
    ]
    assert json.loads((d / "demo.json").read_text())["params"]["n_train"] == 4
    assert not any(p.name.startswith(".") for p in d.rglob("*"))  # no temp files left


def test_growing_the_val_split_keeps_every_existing_image(tmp_path):
    # a larger val split changes neither the train images (a trained teacher stays valid) nor the first
    # val images
    small = generate_demo(tmp_path / "small", seed=5, n_train=3, n_val=1, min_size=24, max_size=32, workers=1)
    big = generate_demo(tmp_path / "big", seed=5, n_train=3, n_val=3, min_size=24, max_size=32, workers=1)
    for sub in ("JPEGImages", "SegmentationClass"):
        for f in (small / sub).iterdir():
            assert (big / sub / f.name).read_bytes() == f.read_bytes(), f"{sub}/{f.name} changed"
    assert (big / "ImageSets/Segmentation/train.txt").read_bytes() == (small / "ImageSets/Segmentation/train.txt").read_bytes()
    assert len((big / "ImageSets/Segmentation/val.txt").read_text().split()) == 3


def test_refuses_foreign_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "something.txt").write_text("mine")
    with pytest.raises(DataError) as ei:
        generate_demo(tmp_path / "x", n_train=2, n_val=1, workers=1)
    assert ei.value.path == str((tmp_path / "x").resolve())


def test_render_sample_is_deterministic_and_varied():
    img1, lbl1 = render_sample(7, 0, 5)
    img2, lbl2 = render_sample(7, 0, 5)
    assert np.array_equal(img1, img2) and np.array_equal(lbl1, lbl2)
    img3, _ = render_sample(7, 1, 5)  # other split, same index: different scene
    assert img1.shape != img3.shape or not np.array_equal(img1, img3)
    assert img1.dtype == np.uint8 and img1.ndim == 3 and img1.shape[2] == 3
    # foreground is present but not everything; ignore band is thin
    fg = np.mean((lbl1 > 0) & (lbl1 < 255))
    assert 0.0 < fg < 0.9 and np.mean(lbl1 == 255) < 0.2
