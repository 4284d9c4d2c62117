import json

import pytest
import torch

from attnfd_pipeline.config import load_config
from attnfd_pipeline.runs import evaluate_bundle, run_teacher
from attnfd_pipeline.teacher import FrozenTeacher, build_teacher_model, load_teacher, load_teacher_info
from attnfd_pipeline.utils import seed_everything
from hand_metrics import hand_metrics, val_loader


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inpath", "fitted", "parameter_free", "untrained"])
def test_teacher_modes_write_a_frozen_bundle(tiny_data, tmp_path, mode):
    from conftest import make_cfg

    cfg = make_cfg(tiny_data, tmp_path, f'teacher.cbam_mode="{mode}"')
    path = run_teacher(cfg, progress=False)
    info = load_teacher_info(path)
    assert info["cbam_mode"] == mode and info["num_classes"] == 11 and len(info["sha256"]) == 64
    assert load_config(cfg.teacher_dir / "config.resolved.toml") == cfg  # the run records the config it ran
    teacher = load_teacher(path)
    assert isinstance(teacher, FrozenTeacher) and teacher.sha256 == info["sha256"]
    # what is frozen is the trained network (the best checkpoint of the CE run), not its seeded initialisation
    best = torch.load(cfg.teacher_dir / "train" / "best.pt", weights_only=True)["modules"]
    trained = teacher.model.state_dict()
    assert set(best) == set(trained) and all(torch.equal(trained[k], v) for k, v in best.items())
    seed_everything(cfg.teacher.train.seed)  # the network run_teacher starts from
    initial = build_teacher_model(cfg, 11)
    assert [n for n, p in initial.named_parameters() if torch.equal(trained[n], p)] == []  # every one stepped
    teacher.train()  # cannot be switched back to train mode
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 48, 48)
    t = teacher.targets(x, ["B", "E", "D", "logits", "raw_D"])
    assert t["B"].shape == (2, 512, 3, 3) and t["E"].shape == (2, 256, 3, 3) and t["D"].shape == (2, 256, 12, 12)
    assert t["logits"].shape == (2, 11, 12, 12)
    if mode == "parameter_free":
        assert sum(p.numel() for p in teacher.attention.parameters()) == 0
    # a target depends only on the image, never on the batch it is computed in (eval-mode BN)
    assert torch.allclose(teacher.targets(x[:1], ["D"])["D"], t["D"][:1], atol=1e-5)
    if mode == "inpath":  # refined maps come from the CBAM inside the forward path
        out = teacher.model(x)
        assert torch.equal(out["D_refined"], t["D"])
    else:
        assert torch.allclose(teacher.attention["D"](t["raw_D"]), t["D"], atol=1e-6)
    m = evaluate_bundle(cfg, path)
    hand = hand_metrics(teacher.model, val_loader(cfg), 11)  # the bundle's network, scored class by class
    assert m["miou"] == pytest.approx(hand["miou"], abs=1e-12)
    assert m["pixel_acc"] == pytest.approx(hand["pixel_acc"], abs=1e-12)
    assert m["per_class_iou"] == pytest.approx(hand["per_class_iou"], abs=1e-12)
    assert json.loads((cfg.teacher_dir / "result.json").read_text())["miou"] == pytest.approx(m["miou"])


@pytest.mark.slow
def test_fitted_mode_trains_only_the_cbams(tiny_data, tmp_path):
    from conftest import make_cfg

    cfg = make_cfg(tiny_data, tmp_path, 'teacher.cbam_mode="fitted"', "teacher.fit_epochs=2")
    path = run_teacher(cfg, progress=False)
    teacher = load_teacher(path)
    plain = torch.load(cfg.teacher_dir / "train" / "best.pt", weights_only=True)["modules"]
    for k, v in teacher.model.state_dict().items():  # the teacher itself is untouched by CBAM fitting
        assert torch.equal(v, plain[k]), k
    untrained = load_teacher(run_teacher(
        make_cfg(tiny_data, tmp_path / "u", 'teacher.cbam_mode="untrained"'), progress=False))
    a = teacher.attention["D"].state_dict()
    b = untrained.attention["D"].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # fitting moved the CBAM weights


@pytest.mark.slow
def test_bundle_tampering_is_detected(tiny_data, tmp_path):
    from conftest import make_cfg

    cfg = make_cfg(tiny_data, tmp_path)
    path = run_teacher(cfg, progress=False)
    state = torch.load(path, weights_only=True)
    k = next(iter(state["model_state"]))
    state["model_state"][k] = state["model_state"][k] + 1
    torch.save(state, path)
    with pytest.raises(ValueError, match="SHA-256 of the file"):  # the bytes, before deserialising
        load_teacher(path)
    side = path.with_suffix(".json")
    info = json.loads(side.read_text())
    del info["file_sha256"]  # a /1 sidecar as the first versions wrote it: the weights hash still catches it
    side.write_text(json.dumps({**info, "format": "attnfd-teacher-bundle/1"}))
    with pytest.raises(ValueError, match="does not match the recorded"):
        load_teacher(path)
    side.unlink()  # a .pt alone is not read: nothing records the hash of its bytes
    with pytest.raises(ValueError, match="not found beside teacher_bundle.pt"):
        load_teacher(path)
    with pytest.raises(FileNotFoundError, match="teacher bundle not found"):
        load_teacher(tmp_path / "nope.pt")
