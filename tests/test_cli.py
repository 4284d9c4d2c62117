"""The `attnfd` CLI end to end on tiny data: exit codes, messages, files written."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnfd_pipeline.engine.train import read_log
from attnfd_pipeline.teacher import load_teacher
from hand_metrics import hand_metrics, val_loader
from stages.cli import app

runner = CliRunner()


def _opts(cfg_path):
    return ["--config", str(cfg_path)]


def _write_cfg(cfg, tmp_path):
    from attnfd_pipeline.config import dump_toml

    p = tmp_path / "tiny.toml"
    p.write_text(dump_toml(cfg))
    return p


@pytest.mark.slow
def test_teacher_evaluate_student_results(tiny_cfg, tmp_path):
    p = _write_cfg(tiny_cfg, tmp_path)
    r = runner.invoke(app, ["teacher", *_opts(p)])
    assert r.exit_code == 0, r.output
    assert (tiny_cfg.teacher_dir / "teacher_bundle.pt").is_file()
    r = runner.invoke(app, ["evaluate", *_opts(p), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    hand = hand_metrics(load_teacher(tiny_cfg.teacher_dir / "teacher_bundle.pt").model, val_loader(tiny_cfg), 11)
    assert m["miou"] == pytest.approx(hand["miou"], abs=1e-12) and len(m["per_class_iou"]) == 11
    assert m["per_class_iou"] == pytest.approx(hand["per_class_iou"], abs=1e-12)
    r = runner.invoke(app, ["evaluate", *_opts(p)])
    assert f"mIoU {hand['miou'] * 100:.2f}  pixel acc {hand['pixel_acc'] * 100:.2f}" in r.output
    r = runner.invoke(app, ["cache", "build", *_opts(p)])
    assert r.exit_code == 0, r.output
    for alpha in ("0", "2"):
        r = runner.invoke(app, ["student", *_opts(p), "--alpha", alpha, "--seed", "1"])
        assert r.exit_code == 0, r.output
    (cache_dir,) = [d for d in Path(tiny_cfg.cache.root).iterdir() if d.is_dir()]
    runs = {json.loads((d / "result.json").read_text())["alpha"]: d for d in tiny_cfg.run_root.glob("student/*")}
    assert sorted(runs) == [0.0, 2.0]
    for alpha, run in runs.items():
        result, log = json.loads((run / "result.json").read_text()), read_log(run / "metrics.parquet")
        # the flags reach the run, and result.json reports what the run logged
        assert (result["alpha"], result["seed"], result["method"]) == (alpha, 1, "attnfd" if alpha else "none")
        assert result["final_miou"] == log[-1]["miou"]
        assert result["best_miou"] == max(e["miou"] for e in log if e["miou"] is not None)
        assert (Path(result["cache"]).name == cache_dir.name) if alpha else result["cache"] is None  # α = 0: no teacher
        # the loss trained on is CE + α·distillation (epoch means of per-step float32 values: rel 1e-5)
        want = log[-1]["train_ce"] + alpha * log[-1].get("train_distill", 0.0)
        assert log[-1]["train_loss"] == pytest.approx(want, rel=1e-5)
        assert (log[-1]["train_distill"] > 0) if alpha else ("train_distill" not in log[-1])
    r = runner.invoke(app, ["results", *_opts(p)])
    assert r.exit_code == 0
    lines = [line for line in r.output.splitlines() if line.startswith("| ")]
    assert len(lines) == 2 + 3  # header, rule, teacher, baseline, attnfd
    assert "baseline" not in r.output and "| student | deeplabv3plus_resnet18 | attnfd | 2 | cached |" in r.output
    # each student row shows its own run's final mIoU (result.json), the teacher row the bundle's
    (attnfd_row,) = [line for line in lines if "| attnfd | 2 |" in line]
    result = json.loads(next(tiny_cfg.run_root.glob("student/*_a2_*/result.json")).read_text())
    assert f"{result['final_miou'] * 100:.2f}" in attnfd_row
    (teacher_row,) = [line for line in lines if line.startswith("| teacher")]
    assert f"{hand['miou'] * 100:.2f}" in teacher_row


def test_bad_config_and_missing_teacher_are_one_clear_line(tiny_cfg, tmp_path):
    p = _write_cfg(tiny_cfg, tmp_path)
    r = runner.invoke(app, ["teacher", *_opts(p), "--set", "teacher.train.lr=-1"])
    assert r.exit_code == 2 and "teacher.train.lr: must be > 0" in r.output
    r = runner.invoke(app, ["student", *_opts(p), "--set", "student.bogus=1"])
    assert r.exit_code == 2 and "student.bogus: unknown key" in r.output
    r = runner.invoke(app, ["student", *_opts(p), "--alpha", "2"])
    assert r.exit_code == 2 and "teacher_bundle.json" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["evaluate", *_opts(p)])
    assert r.exit_code == 2 and "teacher bundle" in r.output


def test_data_demo_prepare_and_check(tmp_path):
    from attnfd_pipeline.config import load_config, dump_toml

    root = tmp_path / "demo"
    r = runner.invoke(app, ["data", "demo", "--out", str(root), "--n-train", "6", "--n-val", "2"])
    assert r.exit_code == 0, r.output
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 8
    cfg = load_config(None, [f'data.root="{root}"'])
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    r = runner.invoke(app, ["data", "check", "--config", str(p)])
    assert r.exit_code == 0, r.output
    (root / "JPEGImages" / "train_00001.jpg").write_bytes(b"not a jpeg")
    (root / "SegmentationClass" / "val_00000.png").unlink()
    r = runner.invoke(app, ["data", "check", "--config", str(p)])
    assert r.exit_code == 1
    assert "train_00001.jpg" in r.output and "val_00000.png" in r.output


def test_student_targets_flag_sets_student_targets(tiny_cfg, tmp_path, monkeypatch):
    """``--targets`` reaches the run's config; its older spelling ``--mode`` / ``--online-fresh`` still does,
    and both spellings at once are refused before anything runs."""
    import attnfd_pipeline.runs as runs
    from attnfd_pipeline.config import TargetSource

    seen = []
    monkeypatch.setattr(runs, "check_student_inputs", lambda cfg: None)
    monkeypatch.setattr(runs, "run_student", lambda cfg, resume=False: seen.append(cfg.student.targets) or
                        {"run": "r", "best_miou": 0.5, "epochs": 1, "train_seconds": 1.0})
    p = _write_cfg(tiny_cfg, tmp_path)
    for flags, want in ((["--targets", "online-fresh"], TargetSource.ONLINE_FRESH),
                        (["--targets", "online-replay"], TargetSource.ONLINE_REPLAY),
                        (["--mode", "online", "--online-fresh"], TargetSource.ONLINE_FRESH),
                        ([], TargetSource.CACHED)):
        r = runner.invoke(app, ["student", *_opts(p), *flags])
        assert r.exit_code == 0, r.output
        assert seen[-1] is want, flags
    r = runner.invoke(app, ["student", *_opts(p), "--targets", "online-fresh", "--mode", "online"])
    assert r.exit_code == 2 and "--targets" in r.output and "older spelling" in r.output
    r = runner.invoke(app, ["student", *_opts(p), "--targets", "teacher"])
    assert r.exit_code == 2 and "teacher" in r.output
    assert len(seen) == 4
