"""`attnfd teacher import`: a teacher checkpoint in the reference layout (written by tests/reference_deeplab.py
from the published facts) or this project's state dict becomes a teacher bundle whose outputs equal the
source network's; bad files are refused naming the problem."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnfd_pipeline.config import dump_toml
from attnfd_pipeline.models import build_model
from attnfd_pipeline.runs import run_teacher_import
from attnfd_pipeline.teacher import bundle_path, load_teacher
from attnfd_pipeline.teacher_import import check_state_fits, map_reference
from reference_deeplab import RefDeepLab, randomize
from stages.cli import app

runner = CliRunner()
TOL = dict(rtol=1e-5, atol=1e-5)  # same operations in the same order: any key mix-up is O(1) off


def save_reference(path, ref, prefix="module."):
    """The reference code's checkpoint layout: DataParallel-prefixed state_dict, NumPy best_pred, optimizer."""
    opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    torch.save({"state_dict": {prefix + k: v for k, v in ref.state_dict().items()}, "epoch": 50,
                "best_pred": np.float64(0.7785), "optimizer": opt.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def ref11():
    return randomize(RefDeepLab("resnet18", 11), seed=0)


def _x():
    return torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))


def test_reference_checkpoint_imports_exactly(tiny_cfg, tmp_path, ref11):
    """--cbam-mode untrained keeps the file's CBAMs: logits, B/E/D and the refined targets all equal the
    reference forward; the bundle records the source's SHA-256, its format and the key map."""
    src = save_reference(tmp_path / "model_best.pth.tar", ref11)
    bundle = run_teacher_import(tiny_cfg, src, cbam_mode="untrained", progress=False)
    teacher = load_teacher(bundle)
    x = _x()
    with torch.no_grad():
        want, got = ref11(x), teacher(x)
        targets = teacher.targets(x, ["B", "E", "D"])
    for k in ("out", "logits", "B", "E", "D"):
        torch.testing.assert_close(got[k], want[k], **TOL)
    for p in "BED":
        torch.testing.assert_close(targets[p], want[f"{p}_refined"], **TOL)
    info = json.loads(bundle.with_suffix(".json").read_text())
    assert info["cbam_mode"] == "untrained" and info["source"]["format"] == "reference"
    assert info["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert ["aspp.aspp1.atrous_conv.", "aspp.branches.0.0."] in info["source"]["key_map"]
    assert ["module.", ""] in info["source"]["key_map"] and "optimizer" in info["source"]["ignored_entries"]


@pytest.mark.slow
def test_resnet101_multigrid_layout_maps_exactly():
    """The paper's teacher: the reference R101 (multi-grid layer4) maps onto deeplabv3plus_resnet101 with
    every key used and the same outputs (in memory: the file path is the test above)."""
    ref = randomize(RefDeepLab("resnet101", 21), seed=2)
    state, cbam = map_reference(ref.state_dict())
    model = build_model("deeplabv3plus_resnet101", 21)
    model.load_state_dict(check_state_fits(model, state, "ref", "R101"))
    model.eval()
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = ref(x), model(x)
    for k in ("logits", "B", "E", "D"):
        torch.testing.assert_close(got[k], want[k], **TOL)
    assert sorted(cbam) == ["B", "D", "E"] and cbam["B"]["channel_gate.mlp.0.weight"].shape == (128, 2048, 1, 1)


@pytest.mark.slow
def test_cli_import_fitted_by_default_then_export_and_reimport(tiny_cfg, tmp_path, ref11):
    """`attnfd teacher import` (default `fitted`: the network is untouched, its side CBAMs are fitted), then
    `attnfd teacher export` → `teacher import --format state_dict`: same network, same mIoU."""
    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_text(dump_toml(tiny_cfg))
    src = save_reference(tmp_path / "ref.pth", ref11, prefix="")
    r = runner.invoke(app, ["teacher", "import", str(src), "--config", str(cfg_file)])
    assert r.exit_code == 0, r.output
    bundle = bundle_path(tiny_cfg)
    first = json.loads(bundle.with_suffix(".json").read_text())
    assert first["cbam_mode"] == "fitted" and (tiny_cfg.teacher_dir / "fit_cbam" / "best.pt").is_file()
    with torch.no_grad():
        torch.testing.assert_close(load_teacher(bundle)(_x())["logits"], ref11(_x())["logits"], **TOL)
    out = tmp_path / "exported.pt"
    assert runner.invoke(app, ["teacher", "export", str(out), "--config", str(cfg_file)]).exit_code == 0
    r = runner.invoke(app, ["teacher", "import", str(out), "--config", str(cfg_file), "--format", "state_dict",
                            "--cbam-mode", "parameter_free"])
    assert r.exit_code == 2 and "--force" in r.output  # an existing bundle is not replaced silently
    r = runner.invoke(app, ["teacher", "import", str(out), "--config", str(cfg_file), "--format", "state_dict",
                            "--cbam-mode", "parameter_free", "--force"])
    assert r.exit_code == 0, r.output
    second = json.loads(bundle.with_suffix(".json").read_text())
    assert second["source"]["format"] == "state_dict" and second["cbam_mode"] == "parameter_free"
    assert second["metrics"]["miou"] == first["metrics"]["miou"]


@pytest.mark.slow
def test_inpath_teacher_round_trips_with_the_same_weights_hash(tiny_cfg, tmp_path):
    """A teacher with in-path CBAMs (this project's default), exported and imported: the bundle is `inpath`
    with the same weights SHA-256 (so the cache fingerprint is the same) and the same val mIoU."""
    from attnfd_pipeline.runs import evaluate_bundle
    from attnfd_pipeline.teacher import build_teacher_model, export_state_dict, save_bundle

    torch.manual_seed(0)
    model = randomize(build_teacher_model(tiny_cfg, 11), seed=4)
    original = save_bundle(tmp_path / "original" / "teacher_bundle.pt", tiny_cfg, model, None, 11)
    info = json.loads(original.with_suffix(".json").read_text())
    exported = export_state_dict(original, tmp_path / "plain.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(exported) == []
    with pytest.raises(ValueError, match="in-path CBAMs at B, E, D .*--cbam-mode fitted cannot apply"):
        run_teacher_import(tiny_cfg, exported, cbam_mode="fitted", progress=False)
    again = json.loads(run_teacher_import(tiny_cfg, exported, progress=False).with_suffix(".json").read_text())
    assert again["cbam_mode"] == "inpath" and again["sha256"] == info["sha256"] and again["points"] == info["points"]
    assert again["metrics"]["miou"] == evaluate_bundle(tiny_cfg, original)["miou"]


@pytest.mark.parametrize("problem", ["truncated", "wrong architecture", "wrong class count", "unknown layout",
                                     "wrong format flag"])
def test_bad_teacher_files_are_refused_naming_the_problem(problem, tiny_cfg, tmp_path, ref11):
    path = save_reference(tmp_path / "t.pth", ref11)
    fmt, cfg, words = "auto", tiny_cfg, ""
    if problem == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        words = "truncated or corrupt"
    elif problem == "wrong architecture":
        from conftest import make_cfg

        cfg = make_cfg(tiny_cfg.data.root, tmp_path, 'teacher.model.name="deeplabv3plus_resnet34"')
        # named as the file spells them (its DataParallel prefix too), this project's name beside
        words = (r"does not fit deeplabv3plus_resnet34 .*missing keys: module\.backbone\.layer1\.2\.conv1\.weight "
                 r"\(here backbone\.layer1\.2\.conv1\.weight\)")
    elif problem == "wrong class count":
        save_reference(path, randomize(RefDeepLab("resnet18", 5)))
        words = "predicts 5 classes, dataset 'demo' has 11"
    elif problem == "unknown layout":
        torch.save({"conv.weight": torch.zeros(1)}, path)
        words = "cannot tell the checkpoint's format"
    else:
        fmt, words = "state_dict", "--format state_dict but the keys are in the reference layout"
    with pytest.raises(ValueError, match=words) as e:
        run_teacher_import(cfg, path, fmt=fmt, progress=False)
    assert str(path) in str(e.value)
    assert not bundle_path(cfg).exists()


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_refusal_names_the_keys_of_the_file_being_imported(prefix, tiny_cfg, tmp_path, ref11):
    """A reference checkpoint without ``aspp.conv1.weight``: the message names that key (what the user can
    find in the file), with this project's ``aspp.project.0.weight`` beside it; CBAM keys the same way."""
    state = dict(ref11.state_dict())
    del state["aspp.conv1.weight"]
    state["decoder.last_conv.8.bias"] = torch.zeros(3)  # mis-shaped: 3 classes' bias for an 11-class head
    path = tmp_path / "t.pth"
    torch.save({"state_dict": {prefix + k: v for k, v in state.items()}}, path)
    with pytest.raises(ValueError) as e:
        run_teacher_import(tiny_cfg, path, progress=False)
    msg = str(e.value)
    assert f"missing keys: {prefix}aspp.conv1.weight (here aspp.project.0.weight)" in msg
    assert f"mis-shaped keys: {prefix}decoder.last_conv.8.bias (here classifier.bias) (file (3,), expected (11,))" in msg
    # the file's own CBAMs (--cbam-mode untrained): a missing MLP weight under its reference name
    state = dict(ref11.state_dict())
    del state["backbone.cbam.ChannelGate.mlp.1.weight"]
    torch.save({"state_dict": {prefix + k: v for k, v in state.items()}}, path)
    with pytest.raises(ValueError, match="a CBAM at point B") as e:
        run_teacher_import(tiny_cfg, path, cbam_mode="untrained", progress=False)
    assert (f"missing keys: {prefix}backbone.cbam.ChannelGate.mlp.1.weight "
            f"(here attention.B.channel_gate.mlp.0.weight)") in str(e.value)
