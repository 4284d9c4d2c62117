"""The result table that `make demo` / `attnfd results` print: grouping, mean ± std, gain, α · weight."""

from __future__ import annotations

import json

from attnfd_pipeline.config import load_config
from attnfd_pipeline.experiments.results import alpha_cell, collect_results, format_table


def _student(run_root, name, *, method="attnfd", alpha=2.0, seed=0, miou=0.2, weights=None, mode="cached",
             augment="replay", **settings):
    d = run_root / "student" / name
    d.mkdir(parents=True)
    methods = [] if alpha == 0 else method.split("+")
    r = {"model": "deeplabv3plus_resnet18", "method": method if alpha else "none", "alpha": alpha, "mode": mode,
         "augment": augment, "seed": seed, "final_miou": miou, "final_pixel_acc": 0.9, "train_seconds": 10.0,
         "weights": weights if weights is not None else {m: 1.0 for m in methods}, **settings}
    (d / "result.json").write_text(json.dumps(r))


def test_table_groups_seeds_and_states_gain_and_effective_weight(tmp_path):
    cfg = load_config(None, [f"runs_root={tmp_path.as_posix()}", "name=t"])
    root = cfg.run_root
    cfg.teacher_dir.mkdir(parents=True)
    (cfg.teacher_dir / "result.json").write_text(json.dumps({"miou": 0.3, "pixel_acc": 0.95, "seconds": 5.0}))
    _student(root, "none_s0", alpha=0.0, seed=0, miou=0.10)
    _student(root, "none_s1", alpha=0.0, seed=1, miou=0.12)
    _student(root, "attnfd_s0", alpha=100.0, seed=0, miou=0.14)
    _student(root, "attnfd_s1", alpha=100.0, seed=1, miou=0.16)
    _student(root, "kd_s0", method="kd", alpha=100.0, miou=0.13, weights={"kd": 0.01})
    _student(root, "fresh_s0", alpha=100.0, miou=0.15, mode="online", augment="fresh")

    rows = collect_results(cfg)
    assert len(rows) == 7
    table = format_table(rows).splitlines()
    by_method = {tuple(c.strip() for c in line.split("|")[3:6]): line for line in table[2:]}

    student = by_method[("none", "0", "")]
    assert "| 2 | 11.00 ± 1.41 |" in student  # mean and sample std (ddof 1) of 10 and 12
    attnfd = by_method[("attnfd", "100", "cached")]
    # gain over the student's mean, then paired over seeds 0, 1 (4, 4: no spread, so the interval is the point)
    assert "| 2 | 15.00 ± 1.41 | +4.00 | +4.00 [+4.00, +4.00] (n = 2) |" in attnfd
    kd = by_method[("kd", "1 (= 100 × 0.01)", "cached")]  # the weight KD actually trained with
    # the means differ by 2, the paired Δ (seed 0 only: 13 − 10) by 3, as report.md would say
    assert "| 1 | 13.00 | +2.00 | +3.00 (n = 1) |" in kd
    assert ("attnfd", "100", "online-fresh") in by_method
    teacher = next(line for line in table if line.startswith("| teacher"))
    assert "| 30.00 |" in teacher
    # teacher, then the plain student every Δ refers to (its run name sorts after "attnfd_…"), then the rest
    assert table[2] == teacher and table[3] == student


def test_alpha_cell():
    assert alpha_cell(None, {}) == ""
    assert alpha_cell(0.0, {}) == "0"
    assert alpha_cell(2.0, {"attnfd": 1.0}) == "2"
    assert alpha_cell(100.0, {"kd": 0.01}) == "1 (= 100 × 0.01)"
    assert alpha_cell(100.0, {"attnfd": 1.0, "kd": 0.01}) == "100 × (attnfd 1, kd 0.01)"


def test_runs_of_another_variant_are_rows_of_their_own(tmp_path):
    """A recipe switch or method setting (the run name's variant tag) makes another row, tagged, never a
    seed of the same row."""
    cfg = load_config(None, [f"runs_root={tmp_path.as_posix()}", "name=t"])
    for seed in (0, 1):
        _student(cfg.run_root, f"m_baseline_K4_s{seed}", alpha=0.0, seed=seed, miou=0.10)
        _student(cfg.run_root, f"m_attnfd_a30_batch_D_cached_K4_s{seed}", alpha=30.0, seed=seed, miou=0.20)
        _student(cfg.run_root, f"m_attnfd_a30_batch_D_cached_K4_ceavg_s{seed}", alpha=30.0, seed=seed, miou=0.40)
        _student(cfg.run_root, f"m_baseline_K4_ceavg_s{seed}", alpha=0.0, seed=seed, miou=0.30)
    table = format_table(collect_results(cfg)).splitlines()
    rows = {line.split("|")[3].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in table[2:]}
    assert rows["attnfd"][5:8] == ["2", "20.00 ± 0.00", "+10.00"]  # against the default recipe's plain student
    assert rows["attnfd [ceavg]"][5:8] == ["2", "40.00 ± 0.00", "+30.00"]
    assert rows["none [ceavg]"][5:8] == ["2", "30.00 ± 0.00", ""]


def test_runs_at_another_k_norm_or_points_are_rows_of_their_own_each_against_its_models_student(tmp_path):
    """The K, norm and points studies write into the config's run root: their runs are tagged rows, never seeds
    of the reference row; and a row is compared with the plain student of its own model."""
    cfg = load_config(None, [f"runs_root={tmp_path.as_posix()}", "name=t"])
    ref = {"K": cfg.cache.K, "norm": cfg.student.norm, "points": list(cfg.student.points)}
    other_points = ["B", "E", "D"] if ref["points"] != ["B", "E", "D"] else ["D"]
    for seed in (0, 1):
        _student(cfg.run_root, f"r18_plain_s{seed}", alpha=0.0, seed=seed, miou=0.10, **ref)
        _student(cfg.run_root, f"r18_plain_K8_s{seed}", alpha=0.0, seed=seed, miou=0.12, **ref | {"K": 8})
        _student(cfg.run_root, f"r18_ref_s{seed}", alpha=30.0, seed=seed, miou=0.20, **ref)
        _student(cfg.run_root, f"r18_K8_s{seed}", alpha=30.0, seed=seed, miou=0.30, **ref | {"K": 8})
        _student(cfg.run_root, f"r18_norm_s{seed}", alpha=30.0, seed=seed, miou=0.40, **ref | {"norm": "channel"})
        _student(cfg.run_root, f"r18_points_s{seed}", alpha=30.0, seed=seed, miou=0.50,
                 **ref | {"points": other_points})
    table = format_table(collect_results(cfg)).splitlines()
    rows = {line.split("|")[3].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in table[2:]}
    assert rows["none"][5:7] == ["2", "10.00 ± 0.00"]
    assert rows["none [K8]"][5:7] == ["2", "12.00 ± 0.00"]
    assert rows["attnfd"][5:8] == ["2", "20.00 ± 0.00", "+10.00"]
    assert rows["attnfd [K8]"][5:8] == ["2", "30.00 ± 0.00", "+20.00"]
    assert rows["attnfd [norm channel]"][5:8] == ["2", "40.00 ± 0.00", "+30.00"]
    assert rows[f"attnfd [points {'+'.join(other_points)}]"][5:8] == ["2", "50.00 ± 0.00", "+40.00"]

    # a second student model in the same root: its rows against its own plain student, not the other model's
    mnv2 = {"model": "deeplabv3plus_mobilenetv2", **ref}
    for seed in (0, 1):
        _student(cfg.run_root, f"a_mnv2_plain_s{seed}", alpha=0.0, seed=seed, miou=0.05, **mnv2)
        _student(cfg.run_root, f"a_mnv2_ref_s{seed}", alpha=30.0, seed=seed, miou=0.08, **mnv2)
    table = format_table(collect_results(cfg)).splitlines()
    by = {(c[1], c[2]): c for c in ([x.strip() for x in line.split("|")[1:-1]] for line in table[2:])}
    assert by[("deeplabv3plus_mobilenetv2", "attnfd")][7] == "+3.00"
    assert by[("deeplabv3plus_resnet18", "attnfd")][7] == "+10.00"
