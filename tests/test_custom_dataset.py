"""Datasets declared in TOML (``[data] dataset = "custom"``): both layouts, label maps, data check, every
stage, fingerprints, and the errors a wrong declaration gives.

The data is the tiny generated demo set (11 classes, VOC layout, 40-64 px) rewritten into a tmp dir in the
``folders`` layout, once with train ids as stored and once with shifted raw ids read through a label_map.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnfd_pipeline.config import ConfigError, dump_toml, load_config
from attnfd_pipeline.data.check import check_dataset
from attnfd_pipeline.data.datasets import (DataError, class_names, dataset_info, dataset_palette, get_dataset_info,
                                           list_split)
from attnfd_pipeline.data.io import read_label_raw
from attnfd_pipeline.data.source import ImageSource
from stages.cli import app
from tests.conftest import make_cfg

runner = CliRunner()
NAMES = ["background", "disc", "ring", "square", "triangle", "cross", "star", "bar", "crescent", "hexagon", "heart"]
CLASSES = "data.classes=[" + ", ".join(f'"{n}"' for n in NAMES) + "]"
# stored value = train id + 1, stored 0 = not labelled: every value has to go through the table
SHIFTED_MAP = "data.label_map={" + ", ".join(f"{t + 1} = {t}" for t in range(11)) + "}"


def _voc_pairs(voc: Path, split: str):
    for sid in (voc / f"ImageSets/Segmentation/{split}.txt").read_text().split():
        yield sid, voc / "JPEGImages" / f"{sid}.jpg", voc / "SegmentationClass" / f"{sid}.png"


def _write_mask(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)  # grayscale "L" PNG of stored values


@pytest.fixture(scope="module")
def layouts(tiny_data, tmp_path_factory):
    """{"voc": root, "folders": root, "shifted": root (folders, raw = id + 1, 0 = ignore), "listed": root
    (flat folders + splits/<split>.txt)}."""
    base = tmp_path_factory.mktemp("custom")
    voc = base / "voc"
    shutil.copytree(tiny_data, voc)
    out = {"voc": voc}
    for name in ("folders", "shifted", "listed"):
        root = base / name
        for split in ("train", "val"):
            sub = "" if name == "listed" else split
            ids = []
            for sid, img, lbl in _voc_pairs(voc, split):
                ids.append(sid)
                (root / "images" / sub).mkdir(parents=True, exist_ok=True)
                shutil.copy(img, root / "images" / sub / img.name)
                raw = read_label_raw(lbl)
                if name == "shifted":
                    raw = np.where(raw == 255, 0, raw + 1)
                _write_mask(root / "masks" / sub / lbl.name, raw)
            if name == "listed":
                (root / "splits").mkdir(exist_ok=True)
                (root / "splits" / f"{split}.txt").write_text("".join(f"images/{i}.jpg\n" for i in ids))
        out[name] = root
    return out


def _cfg(root, tmp_path, layout="voc", *extra):
    return make_cfg(root, tmp_path, 'data.dataset="custom"', CLASSES, f'data.layout="{layout}"', *extra)


def _write(cfg, tmp_path) -> Path:
    p = tmp_path / "custom.toml"
    p.write_text(dump_toml(cfg))
    return p


# -- declaration -----------------------------------------------------------------------------


def test_declared_dataset_info_and_palette(layouts, tmp_path):
    cfg = _cfg(layouts["voc"], tmp_path, "voc", "data.palette=" + json.dumps([[i * 20, 0, 255 - i] for i in range(11)]))
    info = dataset_info(cfg)
    assert info.num_classes == 11 and cfg.data.num_classes == 11
    assert class_names(cfg) == tuple(NAMES)
    pal = dataset_palette(cfg)
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[3].tolist() == [60, 0, 252] and pal[255].tolist() == [224, 224, 192]  # ignore keeps the VOC colour
    # no palette declared: the VOC colormap
    assert dataset_palette(_cfg(layouts["voc"], tmp_path))[1].tolist() == [128, 0, 0]
    # the resolved config reads back to the same declaration (label_map is a TOML table)
    shifted = _cfg(layouts["shifted"], tmp_path, "folders", SHIFTED_MAP, "data.ignore_index=0")
    assert load_config(_write(shifted, tmp_path)) == shifted


def test_stored_ignore_value_becomes_255():
    """CamVid-style: 11 classes stored as 0..10, 11 = void. Stored 11 reads as ignore; 12 is illegal."""
    from attnfd_pipeline.data.datasets import declared_dataset

    info = declared_dataset(NAMES, ignore_index=11)
    lut = info.label_lut()
    assert lut[:11].tolist() == list(range(11)) and lut[11] == 255
    assert np.flatnonzero(info.valid_stored_values()).tolist() == [*range(12), 255]
    plain = declared_dataset(NAMES)  # stored values are the train ids: no table at all
    assert plain.raw_to_train is None and np.flatnonzero(plain.valid_stored_values()).tolist() == [*range(11), 255]


@pytest.mark.parametrize("extra, key, words", [
    (['data.dataset="custom"', 'data.classes=["only"]'], "data.classes", "at least 2"),
    (['data.dataset="custom"', CLASSES, "num_classes=21"], "num_classes", "data.classes lists 11"),
    (['data.dataset="custom"', CLASSES, "data.palette=[[1, 2, 3]]"], "data.palette", "1 colours for 11 classes"),
    (['data.dataset="custom"', CLASSES, "data.label_map={3 = 11}"], "data.label_map.3", "train id 11 is not a class"),
    (['data.dataset="custom"', CLASSES, "data.label_map={300 = 1}"], "data.label_map.300", "0..255"),
    (['data.dataset="custom"', CLASSES, "data.ignore_index=4"], "data.ignore_index", "is a class train id"),
    (['data.dataset="custom"', 'data.classes=["a", "b", "a"]'], "data.classes", "repeated class names: 'a'"),
    (['data.dataset="voc"', "num_classes=11"], "num_classes", 'data.dataset = "custom"'),
    (['data.dataset="voc"', CLASSES], "data.classes", "only used with data.dataset"),
    (['data.dataset="vocc"'], "data.dataset", "unknown dataset 'vocc'"),
])
def test_bad_declarations_name_the_key(extra, key, words):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.toml", extra)
    assert f"{key}:" in str(e.value) and words in str(e.value), str(e.value)


def test_class_count_mismatch_refused_on_the_cli(tmp_path):
    """`--set num_classes=11` on the 21-class VOC recipe is one clear error pointing at a declaration."""
    r = runner.invoke(app, ["data", "check", "-c", "configs/voc.toml", "--set", "num_classes=11"])
    assert r.exit_code == 2
    assert "num_classes: 11 but data.dataset 'voc' has 21 classes" in r.output and "custom" in r.output


# -- layouts and labels ----------------------------------------------------------------------


def test_both_layouts_list_the_same_samples_and_labels(layouts, tmp_path):
    ref = ImageSource.from_config(_cfg(layouts["voc"], tmp_path, "voc"))
    for name, extra in (("folders", ()), ("listed", ()), ("shifted", (SHIFTED_MAP, "data.ignore_index=0"))):
        src = ImageSource.from_config(_cfg(layouts[name], tmp_path, "folders", *extra))
        assert src.ids.tolist() == ref.ids.tolist(), name
        for i in (0, len(src) - 1):
            img, lab = src.load(i)
            rimg, rlab = ref.load(i)
            assert (img == rimg).all() and (lab == rlab).all(), (name, i)  # train ids, ignore = 255
    assert (lab == 255).any()  # the demo's ignore band survived the label_map


def test_data_check_passes_in_both_layouts(layouts, tmp_path):
    for name, layout, extra in (("voc", "voc", ()), ("folders", "folders", ()), ("listed", "folders", ()),
                                ("shifted", "folders", (SHIFTED_MAP, "data.ignore_index=0"))):
        r = runner.invoke(app, ["data", "check", "-c", str(_write(_cfg(layouts[name], tmp_path, layout, *extra),
                                                                 tmp_path))])
        assert r.exit_code == 0, (name, r.output)
        assert "splits train, val OK" in r.output


def test_data_check_names_bad_label_values_and_files(layouts, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(layouts["folders"], root)
    masks = sorted((root / "masks" / "train").iterdir())
    arr = read_label_raw(masks[0])
    arr[0, :3] = 11  # one past the 11 classes
    _write_mask(masks[0], arr)
    masks[1].unlink()
    shutil.copy(root / "images" / "train" / (masks[2].stem + ".jpg"), root / "images" / "train" / (masks[2].stem + ".png"))
    cfg = _cfg(root, tmp_path, "folders")
    with pytest.raises(DataError, match="same stem"):
        list_split(dataset_info(cfg), root, "train")
    (root / "images" / "train" / (masks[2].stem + ".png")).unlink()
    problems = {p.path: p.message for p in check_dataset(dataset_info(cfg), root, ["train"])}
    assert problems == {str(masks[0]): "label values {11} outside [0, 11) ∪ {255}",
                        str(masks[1]): "listed label file is missing"}
    r = runner.invoke(app, ["data", "check", "-c", str(_write(cfg, tmp_path))])
    assert r.exit_code == 1 and str(masks[0]) in r.output and "{11}" in r.output


def test_data_check_with_label_map_refuses_unmapped_raw_values(layouts, tmp_path):
    root = tmp_path / "bad_raw"
    shutil.copytree(layouts["shifted"], root)
    mask = sorted((root / "masks" / "val").iterdir())[0]
    arr = read_label_raw(mask)
    arr[0, :2] = 40  # neither a key of the table nor the ignore value
    _write_mask(mask, arr)
    cfg = _cfg(root, tmp_path, "folders", SHIFTED_MAP, "data.ignore_index=0")
    problems = check_dataset(dataset_info(cfg), root, ["val"])
    assert [(p.path, p.message) for p in problems] == [
        (str(mask), "raw label values {40} outside [0, 12) ∪ {255} (the known raw ids of custom)")]


def test_missing_split_names_both_places(layouts, tmp_path):
    cfg = _cfg(layouts["folders"], tmp_path, "folders")
    with pytest.raises(DataError, match=r"no image folder .*images/test/ nor a split list file .*splits/test.txt"):
        list_split(dataset_info(cfg), layouts["folders"], "test")


# -- every stage -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name, layout", [("voc", "voc"), ("shifted", "folders")])
def test_pipeline_on_a_declared_dataset(layouts, tmp_path, name, layout):
    """teacher → cache → student through the CLI, in the VOC layout and in the label-mapped folders layout;
    class names reach the results; a changed class list or label table gets another fingerprint and the
    old cache is not reused."""
    from attnfd_pipeline.cache import CacheError, cache_fingerprint, find_cache
    from attnfd_pipeline.teacher import bundle_path, load_teacher_info

    extra = (SHIFTED_MAP, "data.ignore_index=0") if name == "shifted" else ()
    cfg = _cfg(layouts[name], tmp_path, layout, *extra)
    p = _write(cfg, tmp_path)
    for cmd in (["teacher"], ["cache", "build"], ["student", "--alpha", "2"]):
        r = runner.invoke(app, [*cmd, "-c", str(p)])
        assert r.exit_code == 0, (cmd, r.output)
    result = json.loads(next((cfg.run_root / "student").rglob("result.json")).read_text())
    assert result["class_names"] == NAMES and len(result["per_class_iou"]) == 11
    r = runner.invoke(app, ["evaluate", "-c", str(p), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["class_names"] == NAMES

    teacher = load_teacher_info(bundle_path(cfg))
    src = ImageSource.from_config(cfg)
    find_cache(cfg, teacher, src, require_complete=True)
    renamed = _cfg(layouts[name], tmp_path, layout, *extra, CLASSES.replace('"heart"', '"Heart"'))
    remap = (SHIFTED_MAP.replace("11 = 10", "11 = 255") if extra else "data.label_map={" +
             ", ".join(f"{t} = {t}" for t in range(10)) + ", 10 = 255}")  # stop training on class 10
    remapped = _cfg(layouts[name], tmp_path, layout, remap, *extra[1:])
    prints = {cache_fingerprint(c, teacher, ImageSource.from_config(c)) for c in (cfg, renamed, remapped)}
    assert len(prints) == 3
    for other in (renamed, remapped):
        with pytest.raises(CacheError, match="no cache"):
            find_cache(other, teacher, ImageSource.from_config(other))
    # built-in datasets keep their fingerprints: nothing about labels is added to their identity
    assert set(ImageSource.from_config(make_cfg(layouts["voc"], tmp_path)).identity()) == {
        "dataset", "num_classes", "split", "count", "listing_sha256"}
    assert get_dataset_info("demo").num_classes == 11


def test_shipped_example_declares_the_demo_classes(layouts):
    cfg = load_config("configs/custom_example.toml")
    assert cfg.data.dataset == "custom" and class_names(cfg) == tuple(NAMES)
    assert dataset_palette(cfg)[10].tolist() == [250, 190, 212]
    r = runner.invoke(app, ["data", "check", "-c", "configs/custom_example.toml", "--set", f'data.root="{layouts["voc"]}"'])
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_predict_export_and_cache_plan_on_a_declared_dataset(layouts, tmp_path):
    """Every command that needs the dataset's classes resolves the declared one (an untrained bundle: only
    the commands' plumbing is under test)."""
    import torch

    from attnfd_pipeline.teacher import build_teacher_model, bundle_path, save_bundle

    cfg = _cfg(layouts["voc"], tmp_path, "voc", "data.classes=" + json.dumps(NAMES[:3]),
               "data.label_map={" + ", ".join(f"{t} = {min(t, 2)}" for t in range(11)) + "}")
    p = _write(cfg, tmp_path)
    torch.manual_seed(0)
    save_bundle(bundle_path(cfg), cfg, build_teacher_model(cfg, 3).eval(), None, 3)
    images = next(layouts["voc"].glob("JPEGImages/*.jpg"))

    def ok(*args):
        r = runner.invoke(app, [*map(str, args), "-c", str(p)])
        assert r.exit_code == 0 and "unknown dataset" not in r.output and "Traceback" not in r.output, (args, r.output)
        return r

    ok("predict", "--input", images, "--out", tmp_path / "masks", "--no-progress")
    mask = np.asarray(Image.open(tmp_path / "masks" / f"{images.stem}.png"))
    assert mask.shape == Image.open(images).size[::-1] and mask.max() <= 2
    for fmt, name in (("torchscript", "t.pt"), ("onnx", "t.onnx")):
        ok("export", "--format", fmt, "--out", tmp_path / name, "--no-check")
        meta = json.loads(runner.invoke(app, ["evaluate", "-c", str(p), "-k", str(tmp_path / name), "--json"]).output)
        assert meta["class_names"] == NAMES[:3]
    r = ok("cache", "plan", "--images", "10")
    assert "float16" in r.output


def test_storage_bench_student_maps_and_chaos_classes_on_a_declared_dataset(layouts, tmp_path):
    """The storage fidelity bench and the chaos fixture take the class count from the config's dataset (here 3
    declared classes), not from a lookup of its name ("custom" is no built-in)."""
    from attnfd_pipeline.cache.plan import model_target_specs
    from attnfd_pipeline.experiments.fidelity import untrained_student_maps

    cfg = _cfg(layouts["voc"], tmp_path, "voc", "data.classes=" + json.dumps(NAMES[:3]),
               "data.label_map={" + ", ".join(f"{t} = {min(t, 2)}" for t in range(11)) + "}")
    specs = model_target_specs(cfg)
    maps = untrained_student_maps(cfg, ImageSource.from_config(cfg), 32, 2, specs)
    assert set(maps) <= set(specs) and all(m.shape[0] == 2 for m in maps.values())
    assert cfg.data.num_classes == 3  # what chaos' fixture and the cache plan use
