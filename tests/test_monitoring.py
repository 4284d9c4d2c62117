"""Seeing a run: log.txt in every run folder, per-step rows (steps.parquet), TensorBoard, curves, job progress."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from attnfd_pipeline.config import dump_toml
from attnfd_pipeline.runs import run_student, student_dir

TIMING = ("samples_per_s", "data_wait_s", "peak_mem_bytes", "lr")
runner = CliRunner()


def _override(cfg, *extra):
    """``cfg`` with a plain student (α = 0) and ``extra`` overrides."""
    import tempfile
    from pathlib import Path

    from attnfd_pipeline.config import load_config

    cfg.run_root.mkdir(parents=True, exist_ok=True)
    p = Path(tempfile.mkdtemp(dir=cfg.run_root)) / "cfg.toml"
    p.write_text(dump_toml(cfg))
    return load_config(p, ["student.alpha=0", *extra])


@pytest.mark.slow
def test_a_run_leaves_log_txt_and_one_step_row_every_log_every_steps(tiny_cfg):
    """10 images, batch 4 → 2 steps per epoch; 3 epochs, log_every 2 → rows at steps 2, 4, 6."""
    cfg = _override(tiny_cfg, "student.train.epochs=3", "student.train.log_every=2", "student.train.eval_every=3")
    run_student(cfg, progress=False)
    d = student_dir(cfg)
    t = pq.read_table(d / "steps.parquet")
    assert t.column("step").to_pylist() == [2, 4, 6] and t.column("epoch").to_pylist() == [1, 2, 3]
    assert {"step", "epoch", "loss", "ce", *TIMING} <= set(t.column_names)
    row = t.to_pylist()[0]
    assert row["samples_per_s"] > 0 and 0 <= row["data_wait_s"] < 60 and row["peak_mem_bytes"] > 10 * 2**20
    assert row["loss"] == pytest.approx(row["ce"], rel=1e-6)  # α = 0: the loss is the CE
    log = (d / "log.txt").read_text()
    assert "epoch 3/3 loss" in log and "val mIoU" in log and "epoch 1/3 loss" in log


@pytest.mark.slow
def test_a_distilled_run_logs_each_methods_term(tiny_pipeline, tmp_path):
    cfg, _ = tiny_pipeline
    import shutil

    c = _override(cfg, f'runs_root="{tmp_path / "runs"}"', "student.train.log_every=1", "student.alpha=2")

    shutil.copytree(cfg.teacher_dir, c.teacher_dir, dirs_exist_ok=True)
    run_student(c, progress=False)
    t = pq.read_table(student_dir(c) / "steps.parquet")
    assert {"ce", "distill", "attnfd"} <= set(t.column_names) and t.num_rows == 2
    r = t.to_pylist()[-1]
    assert r["loss"] == pytest.approx(r["ce"] + 2 * r["distill"], rel=1e-5)  # L = CE + α·L_Attn


@pytest.mark.slow
def test_a_killed_and_resumed_run_has_no_duplicated_steps(tiny_cfg, monkeypatch):
    """Killed while saving epoch 2's last.pt (its step rows already on disk): --resume drops the rows after
    the checkpoint's step and writes them again; the result equals an uninterrupted run's, step for step."""
    import attnfd_pipeline.engine.train as train

    short = ("student.train.epochs=2", "student.train.eval_every=2", "student.train.log_every=1")
    ref = _override(tiny_cfg, *short, f'runs_root="{tiny_cfg.run_root.parent / "ref"}"')
    run_student(ref, progress=False)
    cut = _override(tiny_cfg, *short)
    real, saves = train.save_checkpoint, []

    def killed_on_second_last_pt(path, **kw):
        if path.name == "last.pt":
            saves.append(path)
            if len(saves) == 2:
                raise KeyboardInterrupt("killed")
        return real(path, **kw)

    monkeypatch.setattr(train, "save_checkpoint", killed_on_second_last_pt)
    with pytest.raises(KeyboardInterrupt):
        run_student(cut, progress=False)
    d = student_dir(cut)
    assert pq.read_table(d / "steps.parquet").column("step").to_pylist() == [1, 2, 3, 4]  # 3, 4: after last.pt
    monkeypatch.setattr(train, "save_checkpoint", real)
    run_student(cut, resume=True, progress=False)
    got = pq.read_table(d / "steps.parquet").to_pylist()
    want = pq.read_table(student_dir(ref) / "steps.parquet").to_pylist()
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    log = (d / "log.txt").read_text()
    assert "run ended by an error: KeyboardInterrupt" in log and "resumed at epoch 1/2 (step 2)" in log
    assert "dropped 2 step rows" in log


@pytest.mark.slow
def test_tensorboard_writes_an_event_file(tiny_cfg):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    cfg = _override(tiny_cfg, "student.train.tensorboard=true", "student.train.log_every=1")
    run_student(cfg, progress=False)
    events = list((student_dir(cfg) / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"train/loss", "train/ce", "val/miou"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def test_a_missing_tensorboard_extra_is_one_error_naming_it(tiny_cfg, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    cfg = _override(tiny_cfg, "student.train.tensorboard=true")
    with pytest.raises(ValueError, match=r"pip install -e '\.\[tensorboard\]'"):
        run_student(cfg, progress=False)
    assert not (student_dir(cfg) / "steps.parquet").exists()


@pytest.mark.slow
def test_cli_logs_and_an_error_that_ends_the_run_reaches_log_txt(tiny_cfg, monkeypatch, tmp_path):
    from attnfd_pipeline.distill import StudentTask
    from attnfd_pipeline.errors import UserError
    from stages.cli import app

    p = tmp_path / "c.toml"
    p.write_text(dump_toml(tiny_cfg))
    r = runner.invoke(app, ["student", "--config", str(p), "--alpha", "0", "--verbose", "--set",
                            "student.train.log_every=1"])
    assert r.exit_code == 0, r.output
    d = student_dir(_override(tiny_cfg))
    log = (d / "log.txt").read_text()
    assert " DEBUG step step=1 epoch=1 loss=" in log and " DEBUG step step=2 " in log  # --verbose: the rows
    assert "epoch 1/1 loss" in log

    def boom(self, batch, epoch):
        raise UserError("the batch is broken")

    monkeypatch.setattr(StudentTask, "train_step", boom)
    r = runner.invoke(app, ["student", "--config", str(p), "--alpha", "0", "--quiet", "--force"])
    assert r.exit_code == 2 and "error: the batch is broken" in r.output
    log = (d / "log.txt").read_text()
    assert log.rstrip().endswith("run ended by an error: error: the batch is broken")
    assert "epoch 1/1 loss" not in r.output  # --quiet: warnings only on the console


def test_progress_prints_plain_lines_with_run_epoch_step_and_job_eta_when_not_a_tty():
    from attnfd_pipeline.progress import Progress, job

    out = io.StringIO()
    with job("studies", runs=3) as j:
        j.skip("done before")
        j.next("student a=30 s1")
        bar = Progress(6, "student", "it", stream=out, log_every=0, done=2, epochs=3)
        for e in (2, 2, 3, 3):
            bar.update(1, epoch=e, loss=0.5)
        bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue()
    assert lines[-1].startswith("studies run 2/3 (student a=30 s1) | student epoch 3/3: 6/6 it")
    assert "loss=0.5" in lines[-1] and "(job " in lines[-1]


def _fake_run(d, seed: int, *, steps: bool = True):
    """A run folder as ``fit`` leaves it: 3 epochs of 4 steps, eval at epochs 2 and 3."""
    from attnfd_pipeline.engine.steps import write_table

    d.mkdir(parents=True, exist_ok=True)
    epochs = [{"epoch": e, "step": 4 * e, "lr": 0.01, "train_loss": 1.0 / e + seed, "train_ce": 0.9 / e,
               **({"miou": 0.1 * e + 0.01 * seed, "pixel_acc": 0.5} if e > 1 else {})} for e in (1, 2, 3)]
    write_table(d / "metrics.parquet", epochs)
    if steps:
        write_table(d / "steps.parquet", [{"step": s, "epoch": (s - 1) // 4 + 1, "loss": 1.0 / s, "ce": 0.9 / s,
                                           "lr": 0.01, "samples_per_s": 10.0, "data_wait_s": 0.01,
                                           "peak_mem_bytes": 2**30} for s in range(2, 13, 2)])


def test_curves_draws_one_png_per_quantity_for_two_runs(tiny_cfg, tmp_path):
    from PIL import Image

    from stages.cli import app

    _fake_run(tiny_cfg.run_root / "student" / "a0_s0", 0)
    _fake_run(tiny_cfg.run_root / "student" / "a30_s0", 1, steps=False)  # trained before steps.parquet
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(tiny_cfg))
    r = runner.invoke(app, ["curves", "--config", str(p), "--out", str(tmp_path / "curves")])
    assert r.exit_code == 0, r.output
    got = sorted(f.name for f in (tmp_path / "curves").glob("*.png"))
    assert {"overview.png", "epoch_miou.png", "epoch_train_loss.png", "epoch_train_ce.png", "step_loss.png",
            "step_ce.png", "step_samples_per_s.png", "step_peak_mem_bytes.png"} <= set(got)
    for name in got:
        with Image.open(tmp_path / "curves" / name) as im:
            assert im.size[0] >= 300 and im.size[1] >= 200
    r = runner.invoke(app, ["curves", "--config", str(p), "--runs", "student/nothing*"])
    assert r.exit_code == 2 and "no run folder matching 'student/nothing*'" in r.output


def test_the_report_links_the_curves_of_the_student_and_attnfd(tmp_path):
    """The report draws the plain student and AttnFD at the reference setting (its first seeds)."""
    from fakes import write_student_result, write_teacher_result

    from attnfd_pipeline.config import load_config
    from attnfd_pipeline.experiments.curves import _series, load_run
    from attnfd_pipeline.experiments.report import build_report

    root = tmp_path / "runs" / "demo"
    write_teacher_result(root)
    for seed in range(4):
        write_student_result(root, alpha=0, seed=seed)
        write_student_result(root, seed=seed)
    write_student_result(root, method="kd", alpha=1.0)  # not in the curves
    runs = sorted((root / "student").iterdir())
    for i, d in enumerate(runs):
        _fake_run(d, i)
    cfg = load_config("configs/demo.toml", [f'runs_root="{tmp_path / "runs"}"', "student.alpha=2",
                                            'student.points=["B","E","D"]'])
    files = build_report(cfg, tmp_path / "report")
    md = files["report"].read_text()
    assert "## Training curves" in md and "![training curves](curves/overview.png)" in md
    assert "[step_loss](curves/step_loss.png)" in md and (tmp_path / "report" / "curves" / "epoch_miou.png").is_file()
    assert "6 runs" in md  # 3 seeds of each side
    two = [load_run(p) for p in runs[:2]]
    assert [s.label for s in _series(two, "miou", "epoch")] == [p.name for p in runs[:2]]  # legend: run names
    assert _series(two, "miou", "epoch")[0].y == pytest.approx([20.0, 30.0])  # eval epochs 2, 3, in %
