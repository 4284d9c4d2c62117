"""`attnfd report` on synthetic result.json files, and `attnfd visualize` on a tiny teacher + student."""

from __future__ import annotations

import json
import re
import statistics

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attnfd_pipeline.config import dump_toml, load_config
from attnfd_pipeline.experiments.report import build_report, collect_runs
from fakes import write_student_result as _student
from fakes import write_teacher_result as _teacher

@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs" / "demo"
    _teacher(root)
    for seed, (m, a) in enumerate([(0.50, 0.80), (0.52, 0.82), (0.54, 0.84)]):
        _student(root, alpha=0, seed=seed, miou=m, acc=a, per_class=[0.9, 0.4, 0.2])
    for seed, m in enumerate([0.60, 0.61, 0.62]):
        _student(root, seed=seed, miou=m, per_class=[0.95, 0.6, 0.25])
    _student(root, method="kd", alpha=1.0, miou=0.55)  # no run at the reference α: its own α is used
    _student(root, method="attnfd+kd", miou=0.59)
    _student(root, mode="online", miou=0.605)
    for alpha, m in ((0.1, 0.52), (10.0, 0.58)):
        _student(root, alpha=alpha, miou=m)
    for K, m in ((1, 0.57), (2, 0.59)):
        _student(root, K=K, miou=m)
    _student(root, alpha=0, K=1, miou=0.49)
    _student(root, points=("D",), miou=0.58)
    _student(root, norm="channel", miou=0.57)
    _student(root, norm="channel", points=("D",), miou=0.3)  # varies two factors: in no study
    other = tmp_path / "runs" / "demo_fitted"  # another teacher CBAM mode lives in its own run root
    _teacher(other, miou=0.78, mode="fitted")
    _student(other, teacher_mode="fitted", miou=0.63)
    cfg = load_config("configs/demo.toml", [f'runs_root="{tmp_path / "runs"}"', "student.alpha=2", "cache.K=4",
                                               'student.points=["B", "E", "D"]'])
    return cfg, other


def _rows(md: str, section: str) -> list[list[str]]:
    block = md.split(f"## {section}")[1].split("\n## ")[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()
            if line.startswith("|") and not line.startswith("| ---") and "---" not in line][1:]


def test_report_tables_figures_and_json(runs, tmp_path):
    cfg, other = runs
    files = build_report(cfg, tmp_path / "report", extra_roots=[other])
    md = files["report"].read_text()
    main = {r[0]: r for r in _rows(md, "Methods")}
    assert main["Teacher (deeplabv3plus_resnet101, inpath CBAM)"][3] == "80.00"
    student = main["Student (deeplabv3plus_resnet18)"]
    assert student[2] == "3" and student[3] == f"52.00 ± {statistics.stdev([50, 52, 54]):.2f}"
    assert student[6] == "82.00 ± 2.00" and student[5] == ""
    attnfd = main["S + AttnFD"]
    assert attnfd[1:5] == ["2", "3", "61.00 ± 1.00", "+9.00"]
    # paired over seeds 0–2: differences 10, 9, 8 → mean 9, SE 1/√3, t(0.975, 2) = 4.303
    half = 4.3027 / 3 ** 0.5
    assert attnfd[5] == f"+9.00 [+{9 - half:.2f}, +{9 + half:.2f}] (n = 3)" == "+9.00 [+6.52, +11.48] (n = 3)"
    assert main["S + KD"][1:6] == ["1", "1", "55.00", "+3.00", "+5.00 (n = 1)"]  # only seed 0 is shared
    assert main["S + AttnFD + KD"][3] == "59.00" and main["S + AttnFD (online)"][3] == "60.50"
    assert list(main)[:3] == ["Teacher (deeplabv3plus_resnet101, inpath CBAM)", "Student (deeplabv3plus_resnet18)",
                              "S + KD"]  # rivals first, AttnFD last, combinations after single methods
    alpha = {(r[0], r[1]): r for r in _rows(md, "α sweep")}
    assert set(alpha) == {("0 (student)", ""), ("0.1", "cached"), ("2", "cached"), ("10", "cached"), ("2", "online")}
    # the ablations are paired with AttnFD at the reference setting (α = 2: 60, 61, 62 on seeds 0–2)
    assert alpha[("10", "cached")][3:] == ["58.00", "+6.00", "-2.00 (n = 1)"]
    assert alpha[("2", "cached")][5] == "reference" and alpha[("2", "online")][5] == "+0.50 (n = 1)"
    k = {r[0]: r for r in _rows(md, "Cached augmentation seeds K")}
    assert list(k) == ["1", "2", "4", "online"]
    assert k["1"][2:] == ["57.00", "49.00", "+8.00", "+8.00 (n = 1)"] and k["4"][2] == "61.00 ± 1.00"
    assert k["2"][3:] == ["–", "", ""]  # no student at K = 2: nothing to pair with
    assert k["4"][5] == "+9.00 [+6.52, +11.48] (n = 3)"
    points = {r[0]: r[2] for r in _rows(md, "Distillation points")}
    assert points == {"D": "58.00", "B+E+D": "61.00 ± 1.00"}
    assert {r[0]: r[4] for r in _rows(md, "Distillation points")} == {"D": "-2.00 (n = 1)", "B+E+D": "reference"}
    assert {r[0]: r[2] for r in _rows(md, "Normalisation")} == {"batch": "61.00 ± 1.00", "channel": "57.00"}
    cbam = {r[0]: r for r in _rows(md, "Teacher CBAM mode")}
    assert cbam["inpath"][1] == "80.00" and cbam["fitted"][1:4] == ["78.00", "1", "63.00"]
    assert cbam["fitted"][5] == "+3.00 (n = 1)" and cbam["inpath"][5] == "reference"
    # the header names the dataset and the evaluation protocol; the methods table says what is resolved
    assert "Dataset `demo`; evaluation protocol `center_crop`" in md and "Paired Δ: the mean of" in md
    assert "Differences resolved (95 % interval of the paired Δ vs the student excludes 0): S + AttnFD;" in md
    per_class = {r[0]: r for r in _rows(md, "Per-class IoU")}
    assert "Best method among the methods with 2 or more seeds: **S + AttnFD**" in md
    assert per_class["circle"][1:] == ["40.00", "60.00", "+20.00"] and per_class["square"][3] == "+5.00"
    for name, (w, min_h) in {"alpha_sweep": (760, 460), "k_study": (760, 460), "per_class_iou": (760, 100)}.items():
        assert f"({name}.png)" in md
        with Image.open(files[name]) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] == w and im.size[1] >= min_h
            assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 5  # not blank
    data = json.loads(files["json"].read_text())
    assert data["main"][1]["miou"]["n"] == 3 and data["per_class"]["best"] == "S + AttnFD"
    row = next(r for r in data["main"] if r["label"] == "S + AttnFD")
    assert row["seeds"] == {"0": pytest.approx(60.0), "1": pytest.approx(61.0), "2": pytest.approx(62.0)}
    assert row["paired_vs_student"]["se"] == pytest.approx(1 / 3 ** 0.5) and row["paired_vs_student"]["n"] == 3
    # one lucky run does not stand for its method while others have seeds to average; the header names the
    # seed orders the runs followed (a result without one predates the setting: random), not the config's
    _student(cfg.run_root, method="lad", miou=0.70, seed_order=None)
    again = build_report(cfg, tmp_path / "report2", extra_roots=[other])
    assert "cached seed order `cycle`, `random`." in again["report"].read_text()
    assert {r[0]: r[3] for r in _rows(again["report"].read_text(), "Methods")}["S + LAD"] == "70.00"
    assert json.loads(again["json"].read_text())["per_class"]["best"] == "S + AttnFD"


def test_report_without_runs_says_so(tmp_path):
    cfg = load_config("configs/demo.toml", [f'runs_root="{tmp_path / "runs"}"', "student.alpha=2"])
    files = build_report(cfg, tmp_path / "out")
    md = files["report"].read_text()
    for section in ("Methods", "α sweep", "Cached augmentation seeds K", "Distillation points", "Normalisation",
                    "Teacher CBAM mode", "Per-class IoU"):
        assert re.search(rf"## {section}[^\n]*\n\nno runs", md), section
    assert set(files) == {"report", "json"}
    # a single study with runs: the others still say "no runs"
    _student(tmp_path / "runs" / "demo", alpha=0, miou=0.5)
    md = build_report(cfg, tmp_path / "out")["report"].read_text()
    assert "| Student (deeplabv3plus_resnet18) |  | 1 | 50.00 |" not in md  # α column shows 0
    assert "| Student (deeplabv3plus_resnet18) | 0 | 1 | 50.00 |" in md and md.count("no runs") == 6


def test_collect_fills_old_results_from_the_resolved_config(tmp_path):
    root = tmp_path / "runs" / "demo"
    cfg = load_config("configs/demo.toml", [f'runs_root="{tmp_path / "runs"}"', "student.alpha=2", "cache.K=3"])
    d = root / "student" / "old"
    d.mkdir(parents=True)
    (d / "config.resolved.toml").write_text(dump_toml(cfg))
    (d / "result.json").write_text(json.dumps({"run": "old", "model": "deeplabv3plus_resnet18", "method": "attnfd",
                                               "alpha": 2.0, "norm": "batch", "points": ["B"], "mode": "cached",
                                               "seed": 0, "final_miou": 0.5, "final_pixel_acc": 0.8}))
    (root / "student" / "unfinished").mkdir()
    (root / "student" / "unfinished" / "result.json").write_text(json.dumps({"alpha": 2.0, "final_miou": None}))
    _, students = collect_runs(cfg)
    assert len(students) == 1 and students[0]["K"] == 3 and students[0]["teacher_mode"] == "inpath"


def test_fresh_online_runs_are_the_k_study_reference(runs, tmp_path):
    """An online run with fresh augmentation ("augment": "fresh") is its own row: the K study's
    "online (fresh augmentation)" reference; replayed online runs (and older results) stay "online"."""
    cfg, _ = runs
    root = cfg.run_root
    for seed, m in enumerate([0.64, 0.66]):
        _student(root, mode="online-fresh", seed=seed, miou=m)
        d = root / "student" / f"attnfd_a2_batch_B-E-D_online-fresh_K4_inpath_s{seed}"
        rec = json.loads((d / "result.json").read_text())
        (d / "result.json").write_text(json.dumps(rec | {"mode": "online", "augment": "fresh"}))
    _student(root, alpha=0, mode="online", seed=9, miou=0.10)  # a fresh-crop plain student: online-fresh's baseline
    d = root / "student" / "attnfd_a0_batch_B-E-D_online_K4_inpath_s9"
    (d / "result.json").write_text(json.dumps(json.loads((d / "result.json").read_text()) | {"augment": "fresh"}))
    files = build_report(cfg, tmp_path / "report")
    md = files["report"].read_text()
    k = {r[0]: r for r in _rows(md, "Cached augmentation seeds K")}
    assert list(k) == ["1", "2", "4", "online", "online (fresh augmentation)"]
    assert k["online (fresh augmentation)"][1:5] == ["2", "65.00 ± 1.41", "10.00", "+55.00"]
    # online on the replayed crops is compared with the student on those crops (K = 4), not the fresh one
    assert k["online"][2] == "60.50" and k["online"][3] == k["4"][3] != "10.00"
    assert k["4"][6] == "-4.00" and k["1"][6] == "-8.00"  # cached K vs the fresh reference (means)
    # paired on seeds 0, 1: 60 − 64, 61 − 66 → −4.5, SE 0.5, t(0.975, 1) = 12.706
    assert k["4"][7] == "-4.50 [-10.85, +1.85] (n = 2)" and k["1"][7] == "-7.00 (n = 1)"
    assert k["online (fresh augmentation)"][5] == "no shared seeds"  # its student ran seed 9 only
    main = {r[0]: r for r in _rows(md, "Methods")}
    assert main["S + AttnFD (online, fresh augmentation)"][3] == "65.00 ± 1.41"
    assert main["S + AttnFD (online)"][3] == "60.50" and main["Student (deeplabv3plus_resnet18)"][2] == "3"
    alpha = {(r[0], r[1]) for r in _rows(md, "α sweep")}
    assert ("2", "online-fresh") in alpha and ("2", "online") in alpha
    data = json.loads(files["json"].read_text())
    assert data["K"][-1] == {"K": "online-fresh",
                             "miou": {"n": 2, "mean": pytest.approx(65.0), "std": pytest.approx(1.4142, abs=1e-4)},
                             "student": {"n": 1, "mean": pytest.approx(10.0), "std": None},
                             "seeds": {"0": pytest.approx(64.0), "1": pytest.approx(66.0)}, "paired_vs_student": None}


def test_report_cli(runs, tmp_path):
    from stages.cli import app

    cfg, other = runs
    p = tmp_path / "cfg.toml"
    p.write_text(dump_toml(cfg))
    r = CliRunner().invoke(app, ["report", "--config", str(p), "--out", str(tmp_path / "rep"), "--runs", str(other)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "report.md").is_file() and "report.md" in r.output
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "fitted" in text and "cached seed order `cycle`." in text


# ---------------------------------------------------------------------------------------------
# attention pictures


@pytest.mark.slow
def test_visualize_teacher_and_student_maps(tiny_pipeline, tmp_path):
    from stages.cli import app

    from attnfd_pipeline.runs import run_student, student_dir
    from attnfd_pipeline.experiments.visualize import attention_maps, visualize

    cfg, _ = tiny_pipeline
    p = tmp_path / "cfg.toml"
    p.write_text(dump_toml(cfg))
    run = load_config(p, [f'runs_root="{tmp_path / "runs"}"', 'student.points=["E", "D"]'])
    import shutil

    shutil.copytree(cfg.teacher_dir, run.teacher_dir, dirs_exist_ok=True)
    run_student(run, progress=False)
    maps = attention_maps(run, image_index=1)
    assert maps["points"] == ["E", "D"] and maps["image"].shape == (48, 48, 3) and maps["image"].dtype == np.uint8
    for who in ("teacher", "student"):
        for kind in ("raw", "refined"):
            for pt in ("E", "D"):
                m = maps[who][kind][pt]
                assert m.ndim == 2 and np.isfinite(m).all()
    # the student's refined map is its CBAM output: not the raw map
    assert not np.allclose(maps["student"]["raw"]["D"], maps["student"]["refined"]["D"])
    out = visualize(run, 1, tmp_path / "fig" / "attn.png", cell=64)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 5 * 64 and im.size[1] > 2 * 64
    # CLI, with the run given explicitly
    p2 = tmp_path / "run.toml"
    p2.write_text(dump_toml(run))
    r = CliRunner().invoke(app, ["visualize", "--config", str(p2), "--image-index", "0", "--out",
                                 str(tmp_path / "cli.png"), "--run", str(student_dir(run))])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cli.png").is_file()
    r = CliRunner().invoke(app, ["visualize", "--config", str(p2), "--image-index", "99", "--out",
                                 str(tmp_path / "bad.png")])
    assert r.exit_code == 2 and "image index 99" in r.output


def test_runs_of_another_recipe_are_never_pooled_with_the_reference(tmp_path):
    """Runs that differ only in a recipe switch or a method setting (their run names' variant: ``_ceavg``,
    ``_p<hash>``) are other settings: the report takes the config's own variant, or the largest one when the
    config's has no runs, instead of averaging them into one row."""
    cfg = load_config("configs/demo.toml", [f'runs_root="{tmp_path / "runs"}"'])
    stem = f"{cfg.student.model.name}_{{m}}_a30_batch_D_cached_K4{{v}}_s{{s}}"

    def write(name, miou, method="attnfd", alpha=30.0):
        d = cfg.run_root / "student" / name
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({
            "run": name, "model": cfg.student.model.name, "method": method if alpha else "none", "alpha": alpha,
            "norm": "batch", "points": ["D"], "mode": "cached", "seed": int(name.rsplit("_s", 1)[1]), "K": 4,
            "final_miou": miou, "final_pixel_acc": 0.8, "best_miou": miou, "train_seconds": 1.0, "epochs": 1}))

    for s in (0, 1):
        write(f"{cfg.student.model.name}_baseline_K4_s{s}", 0.10 + s / 100, alpha=0.0)
        write(stem.format(m="attnfd", v="", s=s), 0.20 + s / 100)  # the config's own recipe
        write(stem.format(m="attnfd", v="_ceavg_convbn_connwarm", s=s), 0.50)  # the released switches
    # two settings of a method the config does not name
    write(stem.format(m="aicsd", v="_p0000dead", s=0), 0.30, "aicsd")
    write(stem.format(m="aicsd", v="_p0000beef", s=0), 0.40, "aicsd")
    write(stem.format(m="aicsd", v="_p0000beef", s=1), 0.42, "aicsd")
    md = build_report(cfg, tmp_path / "report")["report"].read_text()
    main = {r[0]: r for r in _rows(md, "Methods")}
    assert main["S + AttnFD"][2:4] == ["2", "20.50 ± 0.71"]  # not 35.25: the released-switch runs stay out
    assert main["S + AttnFD"][5] == "+10.00 [+10.00, +10.00] (n = 2)"
    assert main["S + AICSD"][2:4] == ["2", "41.00 ± 1.41"]  # the variant with the most runs, alone
    alpha = {(r[0], r[1]): r for r in _rows(md, "α sweep")}
    assert alpha[("30", "cached")][2:4] == ["2", "20.50 ± 0.71"]
