"""`attnfd studies`: the plan of study runs, the caches they need, the shared plain teacher training, and
a tiny resumable run whose report has every study it planned."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import attnfd_pipeline.experiments.studies as st
from attnfd_pipeline.config import TargetSource, dump_toml, load_config
from attnfd_pipeline.runs import run_name
from attnfd_pipeline.teacher import bundle_path, load_teacher, load_teacher_info


def test_plan_covers_every_study_without_repeating_the_reference():
    cfg = load_config("configs/demo.toml", ["student.train.seed=3"])
    plan = st.plan_studies(cfg, seeds=3, extra_seeds=1)
    by = {p.label: p for p in plan}
    assert {p.study for p in plan} == set(st.STUDIES)
    # every row compared with a reference row has the reference's 3 seeds (its differences are paired over
    # them): the methods, the K study's AttnFD rows and the α, points, norm and teacher-CBAM-mode ablations;
    # only the student at the other K has 1. The config's own K / α / points / norm / mode are the reference
    assert by["student"].seeds == by["attnfd"].seeds == by["attnfd K=8"].seeds == by["kd"].seeds == (3, 4, 5)
    assert by["attnfd online (fresh augmentation)"].overrides | {} == {"method": "attnfd",
                                                                       "targets": TargetSource.ONLINE_FRESH}
    for label in ("attnfd α=100", "attnfd at B", "attnfd norm channel", "attnfd, fitted teacher CBAM"):
        assert by[label].seeds == (3, 4, 5), label
    assert by["student K=1"].seeds == (3,)
    assert [p.K for p in plan if p.study == "K" and p.K] == [1, 1, 2, 2, 8, 8]  # K = 4 is the reference row
    assert [p.label for p in plan if p.study == "methods"] == ["kd", "lad", "aicsd", "afdcd", "cirkd", "dist", "attnfd+kd"]
    assert [p.overrides["alpha"] for p in plan if p.study == "alpha"] == [3.0, 10.0, 100.0, 300.0]  # 30: reference
    assert [p.overrides["points"] for p in plan if p.study == "points"] == [("B",), ("E",), ("B", "E", "D")]
    assert [p.overrides["norm"] for p in plan if p.study == "norm"] == ["sample", "channel"]
    assert [p.teacher_mode for p in plan if p.study == "teacher_mode"] == ["fitted", "parameter_free", "untrained"]

    runs = st.schedule(cfg, plan)
    # 54 runs before the ablations had seeds: 4 α + 3 points + 2 norms + 3 teacher modes, 2 more seeds each; DIST
    assert len(runs) == sum(len(p.seeds) for p in plan) == 54 + 2 * 12 + 3 == 81
    assert len({(c.name, run_name(c)) for _, c in runs}) == len(runs)  # every run has its own folder
    assert [c.student.train.seed for _, c in runs[:29]] == [3] * 29  # every row's first seed comes first
    # one cache per (teacher root, K), holding what its cached runs read: the rivals need logits and raw maps
    extras = {(c.name, c.cache.K): c.cache.extra for _, c in runs}
    assert extras == {("demo", 4): ("logits", "raw"), ("demo", 1): (), ("demo", 2): (), ("demo", 8): (),
                      ("demo_fitted", 4): (), ("demo_parameter_free", 4): (), ("demo_untrained", 4): ()}
    fitted = next(c for p, c in runs if p.teacher_mode == "fitted")
    assert fitted.teacher.cbam_mode == "fitted" and str(fitted.run_root).endswith("runs/demo_fitted")
    assert [str(r) for r in st.extra_roots(cfg, plan)] == ["runs/demo_fitted", "runs/demo_parameter_free",
                                                           "runs/demo_untrained"]
    only_k = st.plan_studies(cfg, studies=["K"], seeds=1, ks=[4, 2, 2])
    assert [p.label for p in only_k] == ["attnfd online (fresh augmentation)", "student (fresh augmentation)",
                                         "attnfd K=2", "student K=2"]
    fresh = {p.label: p for p in only_k}["student (fresh augmentation)"]
    assert fresh.overrides["alpha"] == 0 and fresh.overrides["targets"].fresh and fresh.seeds == (3,)


@pytest.mark.parametrize("kwargs, match", [
    ({"studies": ["kk"]}, "--study 'kk': not a study"), ({"seeds": 0}, "--seeds 0"),
    ({"extra_seeds": 0}, "--extra-seeds 0"), ({"ks": [0]}, "--k 0"),
])
def test_bad_plans_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        st.plan_studies(load_config("configs/demo.toml"), **kwargs)


def test_plain_training_is_shared_only_between_same_recipes(tmp_path):
    base = load_config("configs/demo.toml", [f'runs_root="{tmp_path}"'])
    fitted, free, inpath = (st.teacher_config(base, m) for m in ("fitted", "parameter_free", "inpath"))
    assert inpath is base
    (fitted.teacher_dir / "train").mkdir(parents=True)
    (fitted.teacher_dir / "train" / "last.pt").write_bytes(b"weights")
    assert st.share_plain_training(free, [fitted]) is None  # the sibling has no bundle yet: unfinished
    bundle_path(fitted).write_bytes(b"bundle")
    longer = st.teacher_config(load_config("configs/demo.toml", [f'runs_root="{tmp_path}"', "teacher.train.epochs=11"]),
                               "parameter_free")
    assert st.share_plain_training(longer, [fitted]) is None  # another recipe trains another network
    assert st.share_plain_training(base, [fitted]) is None  # inpath trains with CBAM in the path
    assert st.share_plain_training(free, [fitted]) == fitted.teacher_dir / "train"
    assert (free.teacher_dir / "train" / "last.pt").read_bytes() == b"weights"
    assert not (free.teacher_dir / "train.copying").exists()
    (fitted.teacher_dir / "train" / "last.pt").write_bytes(b"other")
    assert st.share_plain_training(free, [fitted]) is None  # a root with a training of its own keeps it


def _forbidden(*a, **k):
    raise AssertionError("finished studies must not train or build anything")


@pytest.mark.slow
def test_tiny_studies_train_once_and_report_every_study(tiny_pipeline, tmp_path, monkeypatch):
    base, _ = tiny_pipeline
    p = tmp_path / "cfg.toml"
    p.write_text(dump_toml(base))
    cfg = load_config(p, [f'runs_root="{tmp_path / "runs"}"', f'cache.root="{tmp_path / "cache"}"',
                          "augment.crop_size=[32, 32]", "augment.base_size=32"])
    p.write_text(dump_toml(cfg))
    shutil.copytree(base.teacher_dir, cfg.teacher_dir)  # the inpath teacher is reused
    out = tmp_path / "report"
    trained = []
    real_teacher = st.ensure_teacher

    def ensure_teacher(c, **kw):
        if not bundle_path(c).is_file():
            trained.append((c.name, (c.teacher_dir / "train" / "last.pt").is_file()))
        return real_teacher(c, **kw)

    monkeypatch.setattr(st, "ensure_teacher", ensure_teacher)
    files = st.run_studies(cfg, out, studies=["reference", "K", "teacher_mode"], seeds=1, ks=[1, 2], progress=False)

    # fitted trains; parameter_free and untrained start from its finished plain training (same network)
    assert trained == [(f"{cfg.name}_fitted", False), (f"{cfg.name}_parameter_free", True),
                       (f"{cfg.name}_untrained", True)]
    teachers = [load_teacher(bundle_path(st.teacher_config(cfg, m))) for m in ("fitted", "parameter_free", "untrained")]
    for t in teachers[1:]:
        for a, b in zip(teachers[0].model.state_dict().values(), t.model.state_dict().values()):
            assert torch.equal(a, b)
    assert [load_teacher_info(bundle_path(st.teacher_config(cfg, m)))["cbam_mode"]
            for m in ("fitted", "parameter_free", "untrained")] == ["fitted", "parameter_free", "untrained"]

    md = (out / "report.md").read_text()
    k_table = md.split("## Cached augmentation seeds K")[1].split("##")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in k_table.splitlines() if line.startswith("| ")]
    assert [r[0] for r in rows[2:]] == ["1", "2", "online (fresh augmentation)"]
    assert all(r[1] == "1" and r[2] not in ("", "–") for r in rows[2:])
    assert rows[2][3] not in ("", "–")  # the student at K = 1 ran too
    assert rows[4][3] not in ("", "–") and rows[4][4] != ""  # online-fresh against the fresh-crop student
    mode_table = md.split("## Teacher CBAM mode")[1].split("##")[0]
    for mode in ("inpath", "fitted", "parameter_free", "untrained"):
        assert f"| {mode} |" in mode_table
    assert files["k_study"].is_file() and (out / "report.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert [r["K"] for r in report["K"]] == [1, 2, "online-fresh"]

    # second call: everything is finished, nothing trains or builds (also through the CLI)
    monkeypatch.setattr(st, "complete_cache", _forbidden)
    monkeypatch.setattr("attnfd_pipeline.experiments.plan.run_student", _forbidden)
    monkeypatch.setattr("attnfd_pipeline.experiments.accuracy.run_teacher", _forbidden)
    from stages.cli import app

    r = CliRunner().invoke(app, ["studies", "--config", str(p), "--study", "reference", "--study", "K",
                                 "--study", "teacher_mode", "--seeds", "1", "--k", "1,2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "report:" in r.output and (out / "report.md").read_text() == md
    r = CliRunner().invoke(app, ["studies", "--config", str(p), "--k", "one"])
    assert r.exit_code == 2 and "--k" in r.output


@pytest.mark.parametrize("config", sorted(str(p) for p in __import__("pathlib").Path("configs").glob("*.toml")))
def test_every_shipped_config_plans_paired_studies_and_bench(config):
    """`attnfd studies` and `attnfd bench-accuracy` plan on any config: every compared row shares its
    reference's seeds, and each (root, K) cache carries what its cached methods read."""
    from attnfd_pipeline.experiments import accuracy as acc

    cfg = load_config(config)
    plan = st.plan_studies(cfg)
    ref = next(p for p in plan if p.label == "attnfd").seeds
    assert all(p.seeds == ref for p in plan if not p.label.startswith("student K="))
    runs = st.schedule(cfg, plan)
    assert len(runs) == sum(len(p.seeds) for p in plan) and len({(c.name, run_name(c)) for _, c in runs}) == len(runs)
    assert {c.cache.extra for _, c in runs if c.name == cfg.name and c.cache.K == cfg.cache.K} == {("logits", "raw")}
    bench = acc.bench_config(cfg, acc.plan_runs(cfg))
    assert bench.cache.extra == ("logits", "raw")
    assert len(st.schedule(bench, acc.plan_runs(cfg))) == 3 * 3 + len(acc.RIVALS)
