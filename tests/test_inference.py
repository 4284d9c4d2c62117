"""Using trained networks: every checkpoint kind evaluates, the three protocols score hand-computed numbers,
predict writes palette masks at the original sizes, exports match the eager network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from attnfd_pipeline.config import ConfigError, load_config
from attnfd_pipeline.data.datasets import voc_colormap
from attnfd_pipeline.data.io import write_jpeg, write_palette_png
from attnfd_pipeline.engine.protocol import EvalProtocol, sliding_window_logits
from attnfd_pipeline.inference import (Segmenter, compare_outputs, dataset_info, evaluate_checkpoint,
                                       evaluate_segmenter, export_segmenter, format_metrics, load_segmenter,
                                       predict_images)
from stages.cli import app

runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# the protocols on a hand-made case


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory):
    """VOC layout, val = two images: A is 40x80 (h x w) with class 1 in its outer 20 columns on each side
    and class 0 between; B is 60x60, all class 2."""
    root = tmp_path_factory.mktemp("two_sizes")
    a = np.zeros((40, 80), np.uint8)
    a[:, :20] = a[:, 60:] = 1
    b = np.full((60, 60), 2, np.uint8)
    for sid, lab in (("a", a), ("b", b)):
        write_jpeg(root / "JPEGImages" / f"{sid}.jpg", np.full((3, *lab.shape), 128, np.uint8))
        write_palette_png(root / "SegmentationClass" / f"{sid}.png", lab, voc_colormap(256))
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    return root


def constant(cls: int = 0, num_classes: int = 21) -> Segmenter:
    def net(x):
        out = torch.zeros(x.shape[0], num_classes, *x.shape[-2:])
        out[:, cls] = 1.0
        return out

    return Segmenter(net, num_classes, "student", Path("constant-model"))


# Class 0 predicted everywhere. Counting the pixels each protocol scores (rows: truth; all predicted 0):
#   center_crop (crop 20x20): A → short side 20 → 20x40, centre 20 columns = original columns 20..59: 400 px of
#     class 0; B → 20x20: 400 px of 2.  IoU0 = 400 / 800 = 0.5, IoU2 = 0 → mIoU 0.25, pixel acc 0.5
#   reference: A → short side 20 → 20x40 whole (aspect kept; PIL nearest takes source column 2j + 1): columns
#     0-9 and 30-39 are class 1 (400 px), 10-29 class 0 (400 px); B → 20x20: 400 px of 2.
#     IoU0 = 400 / 1200, IoU1 = IoU2 = 0 → mIoU 1/9, pixel acc 1/3
#   whole: A 3200 px (1600 of 1, 1600 of 0), B 3600 of 2.  IoU0 = 1600 / 6800 → mIoU 1600 / 20400, acc 1600 / 6800
EXPECTED = {
    "center_crop": (0.25, 0.5, [0.5, None, 0.0]),
    "reference": (1 / 9, 1 / 3, [1 / 3, 0.0, 0.0]),
    "whole": (1600 / 20400, 1600 / 6800, [1600 / 6800, 0.0, 0.0]),
}


@pytest.mark.parametrize("protocol,window", [("center_crop", None), ("reference", None), ("whole", None),
                                             ("whole", "[16, 16]")])
def test_protocols_give_the_hand_computed_numbers(two_sizes, protocol, window):
    overrides = ['data.dataset="voc"', f'data.root="{two_sizes}"', "data.num_workers=0", "augment.crop_size=[20, 20]",
                 f'eval.protocol="{protocol}"']
    overrides += [f"eval.window={window}", "eval.stride=[7, 5]"] if window else []
    cfg = load_config("configs/demo.toml", overrides)
    m = evaluate_segmenter(cfg, constant(0))
    miou, acc, first = EXPECTED[protocol]
    assert m["miou"] == pytest.approx(miou, abs=1e-12) and m["pixel_acc"] == pytest.approx(acc, abs=1e-12)
    assert m["per_class_iou"][:3] == [None if v is None else pytest.approx(v, abs=1e-12) for v in first]
    assert m["protocol"]["name"] == protocol and m["images"] == 2
    assert m["class_names"][:3] == ["background", "aeroplane", "bicycle"]


def test_sliding_window_covers_every_pixel_once_on_average():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 1)  # pointwise: windows must reproduce the whole-image logits exactly
    x = torch.randn(2, 3, 37, 53)
    seen = []

    def predict(t):
        seen.append(tuple(t.shape[-2:]))
        return conv(t)

    with torch.no_grad():
        out = sliding_window_logits(predict, x, (16, 24), (11, 16))
        torch.testing.assert_close(out, conv(x), atol=1e-6, rtol=0)
    assert set(seen) == {(16, 24)} and len(seen) == 3 * 3  # rows at 0, 11, 21 (the last ends at the border); cols 0, 16, 29
    seen.clear()
    with torch.no_grad():
        sliding_window_logits(predict, x, (40, 60), (20, 30))
    assert seen == [(37, 53)]  # no larger than the window: one whole-image forward


def test_eval_config_checks_and_paper_defaults():
    with pytest.raises(ConfigError, match="eval.stride"):
        load_config(None, ["eval.window=[8, 8]", "eval.stride=[9, 4]"])
    with pytest.raises(ConfigError, match="eval.protocol"):
        load_config(None, ['eval.protocol="slide"'])
    for name in ("voc", "voc_aug", "cityscapes", "camvid", "coco"):
        assert load_config(f"configs/{name}.toml").eval.protocol == "reference"
    cfg = load_config("configs/demo.toml")
    assert cfg.eval.protocol == "center_crop"
    p = EvalProtocol.from_config(load_config("configs/cityscapes.toml", ['eval.protocol="whole"']))
    assert p.window == (512, 1024) and p.stride == (341, 683)  # mmsegmentation's Cityscapes sliding window


# ---------------------------------------------------------------------------------------------
# every checkpoint kind


@pytest.fixture(scope="module")
def trained(tiny_pipeline, tmp_path_factory):
    """The tiny teacher bundle and a distilled (AttnFD, α 2) 1-epoch student run from its cache."""
    import dataclasses

    from attnfd_pipeline.runs import run_student, student_dir

    cfg, bundle = tiny_pipeline
    s = cfg.student  # a seed no other test trains: this module's run is its own
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(s, train=dataclasses.replace(s.train, seed=17)))
    result = run_student(cfg, progress=False)
    return cfg, bundle, student_dir(cfg), result


@pytest.mark.slow
def test_every_checkpoint_kind_evaluates_with_class_names(trained):
    from attnfd_pipeline.engine.checkpoint import load_checkpoint

    cfg, bundle, run, result = trained
    state = load_checkpoint(run / "best.pt")
    assert any(k.startswith("methods.") for k in state["modules"])  # the distillation heads are in the run …
    assert state["model_state"] and not any(k.startswith(("student.", "methods.")) for k in state["model_state"])
    names = list(dataset_info(cfg).class_names)
    t = evaluate_checkpoint(cfg, bundle)
    assert t["checkpoint"]["kind"] == "teacher bundle" and t["class_names"] == names
    assert evaluate_checkpoint(cfg, bundle.parent)["miou"] == t["miou"]  # the teacher folder
    s = evaluate_checkpoint(cfg, run)
    assert s["checkpoint"]["kind"] == "student" and len(s["per_class_iou"]) == len(names) == 11
    # … and the plain student alone scores what training recorded (same protocol, same split, CPU-deterministic)
    assert s["miou"] == pytest.approx(result["best_miou"], abs=1e-12)
    assert s["protocol"]["name"] == result["eval_protocol"] == "center_crop"  # result.json records the name
    assert evaluate_checkpoint(cfg, run / "best.pt")["miou"] == s["miou"]
    text = format_metrics(s)
    assert "protocol: **center_crop**" in text and all(f"| {n} |" in text for n in names)


@pytest.mark.slow
def test_a_checkpoint_written_before_model_state_still_loads(trained, tmp_path):
    from attnfd_pipeline.engine.checkpoint import load_checkpoint

    cfg, _, run, _ = trained
    state = load_checkpoint(run / "best.pt")
    state.pop("model_state")  # as a /1 checkpoint written before the plain student was stored apart
    state["extra"].pop("model_spec")
    state["format"] = "attnfd-checkpoint/1"
    old = tmp_path / "best.pt"
    torch.save(state, old)
    assert compare_outputs(load_segmenter(run), load_segmenter(old), (40, 56)) == 0.0


def test_cli_evaluate_names_the_protocol_and_rejects_a_non_checkpoint(trained, tmp_path):
    from attnfd_pipeline.config import dump_toml

    cfg, _, run, _ = trained
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    r = runner.invoke(app, ["evaluate", "--config", str(p), "--checkpoint", str(run), "--json",
                            "--set", 'eval.protocol="reference"', "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert m["protocol"]["name"] == "reference" and m["checkpoint"]["kind"] == "student" and "confusion" not in m
    assert json.loads((tmp_path / "m.json").read_text())["miou"] == m["miou"]
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    r = runner.invoke(app, ["evaluate", "--config", str(p), "--checkpoint", str(junk)])
    assert r.exit_code == 2 and str(junk) in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------------------------------------
# predict


@pytest.mark.slow
def test_predict_writes_palette_masks_at_original_size_and_skips_a_corrupt_image(trained, tmp_path):
    cfg, _, run, _ = trained
    images = tmp_path / "in"
    sizes = {"wide": (37, 71), "tall": (66, 30)}
    for stem, (h, w) in sizes.items():
        write_jpeg(images / f"{stem}.jpg", np.random.default_rng(h).integers(0, 256, (3, h, w), dtype=np.uint8))
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    logged = []
    seg = load_segmenter(run)
    res = predict_images(cfg, seg, images, tmp_path / "out", overlay=True, batch_size=2, progress=False,
                         log=logged.append)
    assert sorted(p.name for p in res.written) == ["tall.png", "wide.png"]
    assert [Path(p).name for p, _ in res.skipped] == ["broken.jpg"] and "broken.jpg" in logged[0]
    palette = [v for c in dataset_info(cfg).palette for v in c]
    for stem, (h, w) in sizes.items():
        with Image.open(tmp_path / "out" / f"{stem}.png") as im:
            assert im.mode == "P" and im.size == (w, h) and im.getpalette()[: len(palette)] == palette
            assert np.asarray(im).max() < seg.num_classes
        with Image.open(tmp_path / "out" / "overlay" / f"{stem}.jpg") as im:
            assert im.size == (w, h)
    r = runner.invoke(app, ["predict", "--config", str(_cfg_file(cfg, tmp_path)), "--checkpoint", str(run),
                            "--input", str(images / "*.jpg"), "--out", str(tmp_path / "cli"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "2 masks written" in r.output and "1 skipped" in r.output and "broken.jpg" in r.output


def _cfg_file(cfg, tmp_path):
    from attnfd_pipeline.config import dump_toml

    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    return p


# ---------------------------------------------------------------------------------------------
# export


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_eager_and_scores_the_same(trained, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    cfg, _, run, _ = trained
    seg = load_segmenter(run)
    path = export_segmenter(seg, fmt, tmp_path / f"student.{'onnx' if fmt == 'onnx' else 'pt'}",
                            example_hw=tuple(cfg.augment.crop_size), info=dataset_info(cfg))
    exported = load_segmenter(path)
    assert exported.kind == fmt and exported.module is None and exported.num_classes == seg.num_classes
    # another batch size and image size than the traced example: the exported graph keeps them dynamic
    assert compare_outputs(seg, exported, (40, 72), batch=3) < 1e-4
    m_eager, m_exported = evaluate_checkpoint(cfg, run), evaluate_checkpoint(cfg, path)
    assert m_exported["miou"] == pytest.approx(m_eager["miou"], abs=1e-6)
    assert m_exported["checkpoint"]["dataset"] == cfg.data.dataset
    with pytest.raises(ValueError, match="already an exported"):
        export_segmenter(exported, fmt, tmp_path / "again", example_hw=(32, 32))
