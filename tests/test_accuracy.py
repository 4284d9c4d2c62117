"""`attnfd bench-accuracy`: the plan, a tiny resumable bench run, and the table / goals arithmetic."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
from typer.testing import CliRunner

import attnfd_pipeline.experiments.accuracy as acc
import attnfd_pipeline.experiments.plan as plan_mod
from attnfd_pipeline.config import TargetSource, dump_toml, load_config, write_resolved
from attnfd_pipeline.runs import finished_result, run_name, student_dir

REQUIRED = {"method", "seed", "miou", "pixel_acc"}


def _with(cfg, tmp_path, *overrides):
    """``cfg`` plus overrides, and a config file holding the result (for the CLI)."""
    p = tmp_path / "cfg.toml"
    p.write_text(dump_toml(cfg))
    new = load_config(p, list(overrides))
    p.write_text(dump_toml(new))
    return new, p


def test_plan_has_every_method_with_its_seeds():
    cfg = load_config("configs/demo.toml", ["student.train.seed=5"])
    plan = acc.plan_runs(cfg, seeds=3, extra_seeds=1)
    seeds = {p.label: p.seeds for p in plan}
    assert set(seeds) == set(acc.METHODS) - {"teacher", *acc.COMPACT_METHODS.values()}  # compact rows: asked for
    assert seeds["student"] == seeds["attnfd"] == seeds["attnfd_online"] == (5, 6, 7)  # the rows the goals compare
    assert acc.RIVALS == ("kd", "lad", "aicsd", "afdcd", "cirkd", "dist")  # every registered method but AttnFD
    assert all(seeds[m] == (5,) for m in acc.RIVALS)
    assert {p.label: len(p.seeds) for p in acc.plan_runs(cfg, seeds=2, extra_seeds=2)}["kd"] == 2
    bench = acc.bench_config(cfg, plan)
    assert bench.cache.extra == ("logits", "raw") and bench.cache.K == cfg.cache.K == 4
    runs = [(p.label, c) for p, c in plan_mod.schedule(bench, plan)]
    assert len(runs) == 3 * 3 + 6 and len({run_name(c) for _, c in runs}) == len(runs)
    assert [m for m, _ in runs[:9]] == ["student", *acc.RIVALS, "attnfd", "attnfd_online"]
    by = {(m, c.student.train.seed): c.student for m, c in runs}
    assert by[("student", 7)].alpha == 0
    for m in (*acc.RIVALS, "attnfd"):
        s = by[(m, 5)]
        assert (s.method, s.alpha, s.targets) == (m, cfg.student.alpha, TargetSource.CACHED)
    online = by[("attnfd_online", 5)]
    assert (online.method, online.targets, online.alpha) == ("attnfd", TargetSource.ONLINE_FRESH, cfg.student.alpha)
    with pytest.raises(ValueError, match="--seeds 0"):
        acc.plan_runs(cfg, seeds=0)
    with pytest.raises(ValueError, match="--extra-seeds 0"):
        acc.plan_runs(cfg, extra_seeds=0)


@pytest.mark.slow
def test_tiny_bench_writes_results_and_resumes(tiny_pipeline, tmp_path, monkeypatch):
    base, _ = tiny_pipeline
    # 32 px crops (the bundle does not depend on the crop): 8 one-epoch runs on 10 images stay fast
    cfg, cfg_file = _with(base, tmp_path, f'runs_root="{tmp_path / "runs"}"', f'cache.root="{tmp_path / "cache"}"',
                          "augment.crop_size=[32, 32]", "augment.base_size=32")
    shutil.copytree(base.teacher_dir, cfg.teacher_dir)  # the teacher is reused, not retrained
    monkeypatch.setattr(acc, "run_teacher", _forbidden)
    out = tmp_path / "bench"
    results = acc.run_accuracy_bench(cfg, out, seeds=1, extra_seeds=1, progress=False)

    rows = json.loads((out / "accuracy.json").read_text())
    assert rows == results and all(REQUIRED <= set(r) for r in rows)
    planned = [m for m in acc.METHODS if m not in acc.COMPACT_METHODS.values()]  # no compact storage asked
    count = {m: sum(r["method"] == m for r in rows) for m in acc.METHODS}
    assert count == dict.fromkeys(planned, 1) | dict.fromkeys(acc.COMPACT_METHODS.values(), 0)
    assert all(0 <= r["miou"] <= 1 and 0 <= r["pixel_acc"] <= 1 for r in rows)
    online = next(r for r in rows if r["method"] == "attnfd_online")
    assert online["augment"] == "fresh" and online["mode"] == "online"
    assert {r["student_method"] for r in rows if r["method"] in ("kd", "lad")} == {"kd", "lad"}
    cache = json.loads((out / "accuracy_cache.json").read_text())
    assert cache["extra"] == ["logits", "raw"] and cache["seconds"] > 0
    md = (out / "accuracy.md").read_text()
    for text in ("teacher − student ≥ 5 mIoU", "AttnFD (cached) − student ≥ 2 mIoU",
                 "|AttnFD cached − AttnFD online| ≤ 1 mIoU", "| S + Af-DCD | 1 | 0 |", "cache build (float16, K = 2"):
        assert text in md

    # second call: everything is done, nothing trains or builds (also through the CLI)
    for name in ("run_teacher", "build_cache", "load_teacher"):
        monkeypatch.setattr(acc, name, _forbidden)
    monkeypatch.setattr(plan_mod, "run_student", _forbidden)
    assert acc.run_accuracy_bench(cfg, out, seeds=1, extra_seeds=1, progress=False) == results
    from stages.cli import app

    r = CliRunner().invoke(app, ["bench-accuracy", "--config", str(cfg_file), "--set", "student.train.device=\"cpu\"",
                                 "--seeds", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "teacher − student ≥ 5 mIoU" in r.output and "accuracy.md" in r.output
    assert (f"Reproduce: `attnfd bench-accuracy --config {cfg_file} --set 'student.train.device=\"cpu\"' --seeds 1 "
            f"--extra-seeds 1 --out {out}`") in (out / "accuracy.md").read_text()
    assert json.loads((out / "accuracy.json").read_text()) == results


def _forbidden(*a, **k):
    raise AssertionError("a finished bench must not train or build anything")


def test_a_finished_run_from_another_config_is_refused(tmp_path):
    cfg = load_config("configs/demo.toml", [f'runs_root="{tmp_path / "runs"}"'])
    plan = acc.plan_runs(cfg, 1, 1)
    run_cfg = acc.run_config(cfg, plan[0], 0)
    d = student_dir(run_cfg)
    write_resolved(load_config("configs/demo.toml", [f'runs_root="{tmp_path / "runs"}"', "student.alpha=0",
                                                     "student.train.epochs=9"]), d)
    (d / "result.json").write_text(json.dumps({"run": d.name, "seed": 0, "final_miou": 0.5, "final_pixel_acc": 0.8,
                                               "alpha": 0.0, "method": "none", "mode": "cached",
                                               "seed_order": "cycle"}))
    with pytest.raises(ValueError, match=rf"student/.*baseline.*student\.train\.epochs: 9 → {cfg.student.train.epochs}"):
        finished_result(run_cfg)
    write_resolved(run_cfg, d)
    assert finished_result(run_cfg)["final_miou"] == 0.5


def _rows(method, mious, accs=None, seconds=10.0):
    accs = accs or [0.9] * len(mious)
    return [{"method": method, "seed": i, "miou": m, "pixel_acc": a, "run": f"{method}_s{i}",
             "train_seconds": seconds} for i, (m, a) in enumerate(zip(mious, accs))]


def test_format_markdown_statistics_and_goals():
    results = (_rows("teacher", [0.80], [0.95], 100.0) + _rows("student", [0.50, 0.52, 0.54], [0.80, 0.82, 0.84])
               + _rows("kd", [0.53]) + _rows("attnfd", [0.56, 0.57, 0.58]) + _rows("attnfd_online", [0.555]))
    md = acc.format_markdown(results, {"command": "make bench-accuracy", "planned": {"lad": 1, "student": 3},
                                       "cache": {"path": "cache/x", "seconds": 30.0, "K": 4, "extra": ["logits"]},
                                       "wall_seconds": 5.0, "dataset": "demo", "crop": [64, 64]})
    lines = md.split("## Goals")[0].splitlines()
    cells = ([x.strip() for x in line.strip("|").split("|")] for line in lines if line.startswith("| "))
    table = {c[0]: c for c in cells}
    assert table["Teacher"][1:] == ["1", "0", "80.00", "", "", "95.00"]
    assert table["Student (α = 0)"][1:] == ["3", "0, 1, 2", f"52.00 ± {statistics.stdev([50, 52, 54]):.2f}", "", "",
                                            "82.00 ± 2.00"]
    # paired over seeds 0–2: differences 6, 5, 4 → mean 5, SE 1/√3, half-width t(0.975, 2) · SE = 2.484
    assert table["S + AttnFD (cached)"][3:6] == ["57.00 ± 1.00", "+5.00", "+5.00 [+2.52, +7.48] (n = 3)"]
    assert table["S + KD"][3:6] == ["53.00", "+1.00", "+3.00 (n = 1)"]  # seed 0 only: no interval
    assert table["S + AttnFD (online, fresh augmentation)"][3:6] == ["55.50", "+3.50", "+5.50 (n = 1)"]
    assert table["S + LAD"][1:4] == ["0 of 1", "", "–"]  # planned, not run yet
    assert "S + AICSD" not in table  # neither planned nor run
    assert "Dataset `demo`; evaluation protocol `center_crop`: short side resized to the crop size (64×64)" in md
    assert ("Differences resolved (95 % interval of the paired Δ vs the student excludes 0): S + AttnFD (cached); "
            "one shared seed, no interval: S + KD, S + AttnFD (online, fresh augmentation).") in md
    assert "- teacher − student ≥ 5 mIoU (the teacher's run minus the student's mean): **28.00** — met" in md
    assert ("- AttnFD (cached) − student ≥ 2 mIoU, decided by the paired mean over shared seeds, with its 95 % "
            "interval above 0: **5.00** — met (paired Δ +5.00 [+2.52, +7.48] (n = 3), SE 0.58; the interval's lower "
            "end 2.52 is also ≥ 2, so a gain ≥ 2 is also established at 95 %)") in md
    assert "|AttnFD cached − AttnFD online| ≤ 1 mIoU, as equivalence" in md and "an interval needs ≥ 2 shared seeds" in md
    assert "Reproduce: `make bench-accuracy`" in md
    assert "Total 210 s" in md and "| cache build (float16, K = 4, extra: logits) |  | `cache/x` | 30 |" in md

    g = {x.text.split(" ≥")[0].split(" ≤")[0]: x for x in acc.goals(results)}
    assert g["AttnFD (cached) − student"].value == pytest.approx(5.0)
    assert [x.met for x in acc.goals(results)] == [True, True, None]  # one online seed: no interval yet


def test_compact_rows_get_caches_of_their_own_paired_with_float16():
    cfg = load_config("configs/demo.toml")
    plan = acc.plan_runs(cfg, seeds=2, extra_seeds=1, compact=("int8", "int8+poolD2"))
    runs = plan_mod.schedule(acc.bench_config(cfg, plan), plan)
    by = {(p.label, c.student.train.seed): c for p, c in runs}
    f16, i8, pooled = by[("attnfd", 0)], by[("attnfd_int8", 1)], by[("attnfd_int8_poolD2", 0)]
    assert (i8.cache.encoding, i8.cache.pool) == ("int8", ())
    assert (pooled.cache.encoding, pooled.cache.pool) == ("int8", (("D", 2),))
    assert f16.cache.extra == ("logits", "raw")  # the rivals' targets go to the float16 cache only
    assert i8.cache.extra == pooled.cache.extra == ()  # AttnFD reads refined maps: nothing extra to store
    assert len({plan_mod.cache_key(c) for _, c in runs if plan_mod.reads_cache(c)}) == 3
    assert run_name(i8).endswith("_int8_s1") and run_name(pooled).endswith("_int8_poolD2_s0")
    assert acc.storage_label(pooled) == "int8+poolD2" and acc.storage_label(f16) is None
    with pytest.raises(ValueError, match="--compact 'int4'"):
        acc.plan_runs(cfg, compact=("int4",))


def test_compact_section_pairs_with_the_float16_cache():
    results = (_rows("student", [0.50, 0.52, 0.54]) + _rows("attnfd", [0.56, 0.57, 0.58])
               + _rows("attnfd_int8", [0.561, 0.569, 0.581]) + _rows("attnfd_int8_poolD2", [0.54, 0.57, 0.60]))
    md = acc.format_markdown(results, {"cache": {"path": "cache/f", "seconds": 30.0, "K": 4, "extra": [],
                                                 "variants": {"int8": {"path": "cache/i", "seconds": 12.0, "K": 4}}}})
    section = md.split("## Compact cache storages vs the float16 cache")[1].split("## Goals")[0]
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in section.splitlines()
                              if line.startswith("| S"))}
    # int8 − float16: +0.1, −0.1, +0.1 → mean +0.033, SE 0.0667, t(0.975, 2) = 4.303 → ±0.287: inside ±1
    assert rows["S + AttnFD (cached, int8)"][3:] == ["+0.03 [-0.25, +0.32] (n = 3)", "0.07", "0.10", "shown"]
    # pooled − float16: −2, 0, +2 → mean 0, SE 1.155 → ±4.97: equivalence not shown
    assert rows["S + AttnFD (cached, int8 + D pooled ×2)"][3:] == ["+0.00 [-4.97, +4.97] (n = 3)", "1.15", "1.33",
                                                                 "not shown"]
    assert "| cache build (int8, K = 4, extra: none) |  | `cache/i` | 12 |" in md
    assert "## Compact" not in acc.format_markdown(results[:6])


def test_ensure_cache_keeps_one_record_per_storage(tmp_path, monkeypatch):
    cfg = load_config("configs/demo.toml")
    compact = load_config("configs/demo.toml", ['cache.encoding="int8"'])
    built = {"float16": (tmp_path / "f", 10.0), "int8": (tmp_path / "i", 4.0)}
    monkeypatch.setattr(acc, "complete_cache", lambda c, b, progress: built[acc.storage_label(c) or "float16"])
    acc.ensure_cache(cfg, tmp_path / "bundle.pt", tmp_path, progress=False)
    acc.ensure_cache(compact, tmp_path / "bundle.pt", tmp_path, progress=False)
    built["float16"] = (tmp_path / "f", 5.0)  # resumed: the seconds add up
    record = acc.ensure_cache(cfg, tmp_path / "bundle.pt", tmp_path, progress=False)
    assert record["path"] == str(tmp_path / "f") and record["seconds"] == 15.0
    assert record["variants"]["int8"] == {"path": str(tmp_path / "i"), "seconds": 4.0, "K": 4, "extra": []}
    assert json.loads((tmp_path / acc.CACHE_JSON).read_text()) == record


def test_goals_are_decided_by_the_paired_statistics():
    student = _rows("student", [0.50, 0.52, 0.54])
    # mean gain 3 ≥ 2, but the differences 1, 3, 5 leave an interval [-1.97, +7.97]: the gain is not resolved
    noisy = student + _rows("attnfd", [0.51, 0.55, 0.59])
    gain = acc.goals(noisy)[1]
    assert gain.value == pytest.approx(3.0) and gain.met is False and "[-1.97, +7.97]" in gain.detail
    # resolved (every seed +1.5) but below the goal
    assert acc.goals(student + _rows("attnfd", [0.515, 0.535, 0.555]))[1].met is False
    # one seed per row: no interval, not decided
    single = _rows("student", [0.50]) + _rows("attnfd", [0.60])
    assert acc.goals(single)[1].met is None and acc.goals(single)[1].value == pytest.approx(10.0)
    # equivalence: differences 0.2, -0.1, 0.3 → interval [-0.38, +0.65] inside [-1, 1]
    cached = _rows("attnfd", [0.56, 0.57, 0.58])
    close = acc.goals(cached + _rows("attnfd_online", [0.558, 0.571, 0.577]))[2]
    assert close.met is True and close.value == pytest.approx(0.4 / 3) and "[-0.38, +0.65]" in close.detail
    # a mean difference of 0.33 whose interval [-2.54, +3.20] reaches outside ±1: equivalence not shown
    wide = acc.goals(cached + _rows("attnfd_online", [0.55, 0.58, 0.57]))[2]
    assert wide.met is False and wide.status == "equivalence not shown" and "reaches outside" in wide.detail
    assert "not measured yet" in acc.format_markdown(single)


def test_reproduce_command_round_trips_through_the_cli(monkeypatch, tmp_path):
    """The ``Reproduce:`` command accuracy.md prints parses back into the same bench (seeds, --set, compact
    storages, out folder): a reader who pastes it reruns what the report shows."""
    import shlex

    from stages.cli import app

    calls = []

    def fake_bench(cfg, out, *, seeds, extra_seeds, compact, command):
        calls.append({"out": str(out), "seeds": seeds, "extra": extra_seeds, "compact": list(compact),
                      "lr": cfg.student.train.lr, "command": command})
        return []

    monkeypatch.setattr(acc, "run_accuracy_bench", fake_bench)
    args = ["bench-accuracy", "--config", "configs/demo.toml", "--set", "student.train.lr=0.02", "--seeds", "5",
            "--compact", "int8", "--compact", "int8+poolD2", "--compact", "int8", "--out", str(tmp_path / "a b")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    first = calls[-1]
    assert first["compact"] == ["int8", "int8+poolD2"] and first["seeds"] == 5 and first["lr"] == 0.02
    words = shlex.split(first["command"])
    assert words[:2] == ["attnfd", "bench-accuracy"]
    r = CliRunner().invoke(app, words[1:])
    assert r.exit_code == 0, r.output
    assert calls[-1] == first
