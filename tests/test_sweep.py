import pytest

from attnfd_pipeline.experiments.sweep import parse_list, run_sweep, sweep_configs


def test_parse_and_grid(tiny_cfg):
    assert parse_list("0.1, 1,2") == [0.1, 1.0, 2.0]
    assert parse_list("0,1", int) == [0, 1]
    with pytest.raises(ValueError, match="'x' in '1,x' is not a float"):
        parse_list("1,x")
    cfgs = sweep_configs(tiny_cfg, [0.0, 2.0], [0, 1])
    assert [(c.student.alpha, c.student.train.seed) for c in cfgs] == [(0.0, 0), (0.0, 1), (2.0, 0), (2.0, 1)]
    assert all(c.cache == tiny_cfg.cache and c.teacher == tiny_cfg.teacher for c in cfgs)


@pytest.mark.slow
def test_sweep_on_a_local_cluster_skips_finished_runs(tiny_pipeline):
    cfg, _ = tiny_pipeline
    done = run_sweep(cfg, [0.0, 2.0], [3], workers=2)  # worker processes, as users run it
    assert sorted(r["alpha"] for r in done) == [0.0, 2.0]
    import json

    from attnfd_pipeline.engine.train import read_log
    from attnfd_pipeline.runs import student_dir

    by_alpha = {r["alpha"]: r for r in done}
    for c in sweep_configs(cfg, [0.0, 2.0], [3]):  # the worker processes wrote into each run's own log
        log = (student_dir(c) / "log.txt").read_text()
        assert f"student {student_dir(c).name} " in log and "epoch 1/1 loss" in log
        # the sweep returns what the run wrote: its result.json, whose best mIoU is its logged evaluation's
        row, on_disk = by_alpha[c.student.alpha], json.loads((student_dir(c) / "result.json").read_text())
        assert row["run"] == student_dir(c).name and row["seed"] == 3
        metrics = read_log(student_dir(c) / "metrics.parquet")
        assert row["best_miou"] == on_disk["best_miou"] == max(m["miou"] for m in metrics if m["miou"] is not None)
        # the logged epoch loss is the one the log line prints
        assert f"epoch 1/1 loss {metrics[-1]['train_loss']:.4f}" in log
    # α = 0 trains on CE alone, α = 2 adds the distillation term: same seed, different losses
    losses = {a: read_log(student_dir(c) / "metrics.parquet")[-1]["train_loss"]
              for a, c in zip((0.0, 2.0), sweep_configs(cfg, [0.0, 2.0], [3]))}
    assert losses[2.0] != losses[0.0]
    assert run_sweep(cfg, [0.0, 2.0], [3], workers=2) == []  # rerun: nothing left to do


@pytest.mark.slow
def test_sweep_reuses_one_cache_without_the_teacher(tiny_pipeline, monkeypatch):
    """2 α × 2 seeds on one cache: no cache build, no teacher load or forward (threads, so the
    monkeypatched guards are seen by the runs); the seeds give different runs, a rerun the same one."""
    import shutil

    import attnfd_pipeline.cache as cache_mod
    import attnfd_pipeline.teacher as teacher_mod
    from attnfd_pipeline.engine.train import read_log
    from attnfd_pipeline.runs import student_dir

    def forbidden(*a, **k):
        raise AssertionError("a cached sweep must not build a cache or touch the teacher")

    for mod, name in [(teacher_mod, "load_teacher"), (teacher_mod, "build_teacher_model"),
                      (teacher_mod.FrozenTeacher, "targets"), (cache_mod, "build_cache")]:
        monkeypatch.setattr(mod, name, forbidden)
    monkeypatch.setattr("attnfd_pipeline.runs.student.load_teacher", forbidden)
    cfg, _ = tiny_pipeline
    done = run_sweep(cfg, [1.0, 2.0], [5, 6], workers=1, processes=False)
    assert sorted((r["alpha"], r["seed"]) for r in done) == [(1.0, 5), (1.0, 6), (2.0, 5), (2.0, 6)]
    assert len({r["cache"] for r in done}) == 1
    assert run_sweep(cfg, [1.0, 2.0], [5, 6], workers=1, processes=False) == []
    # the seed is the run's: other seeds train otherwise, and a deleted run reruns to the same numbers (one
    # thread both times, no data workers: bitwise, so exact equality)
    logs = {(c.student.alpha, c.student.train.seed): read_log(student_dir(c) / "metrics.parquet")
            for c in sweep_configs(cfg, [1.0, 2.0], [5, 6])}
    losses = {k: [row["train_loss"] for row in log] for k, log in logs.items()}
    assert losses[(1.0, 5)] != losses[(1.0, 6)] and losses[(2.0, 5)] != losses[(2.0, 6)]
    (again,) = sweep_configs(cfg, [2.0], [5])
    shutil.rmtree(student_dir(again))
    (redone,) = run_sweep(cfg, [1.0, 2.0], [5, 6], workers=1, processes=False)
    assert (redone["alpha"], redone["seed"]) == (2.0, 5)
    keys = ("train_loss", "train_ce", "train_distill", "miou", "pixel_acc")
    assert [[row[k] for k in keys] for row in read_log(student_dir(again) / "metrics.parquet")] == [
        [row[k] for k in keys] for row in logs[(2.0, 5)]]
    assert redone["best_miou"] == next(r for r in done if (r["alpha"], r["seed"]) == (2.0, 5))["best_miou"]


@pytest.mark.slow
def test_sweep_refuses_a_finished_run_trained_otherwise(tiny_pipeline, tmp_path, monkeypatch):
    """A finished run whose folder name matches but whose recipe or teacher differs must not be skipped as
    done: the sweep stops before running anything, naming the folder and the difference."""
    import dataclasses
    import json
    import shutil

    import attnfd_pipeline.experiments.sweep as sweep_mod
    from attnfd_pipeline.config import write_resolved
    from attnfd_pipeline.runs import student_dir

    cfg, _ = tiny_pipeline
    cfg = dataclasses.replace(cfg, runs_root=str(tmp_path / "runs"))
    shutil.copytree(tiny_pipeline[0].teacher_dir, cfg.teacher_dir)  # the same teacher bundle
    (run,) = sweep_configs(cfg, [2.0], [5])
    d = student_dir(run)
    other_lr = dataclasses.replace(run, student=dataclasses.replace(
        run.student, train=dataclasses.replace(run.student.train, lr=run.student.train.lr * 3)))
    write_resolved(other_lr, d)
    done = {"run": d.name, "seed": 5, "alpha": 2.0, "final_miou": 0.5, "seed_order": "cycle"}
    (d / "result.json").write_text(json.dumps(done))
    monkeypatch.setattr(sweep_mod, "_run_one", lambda c: (_ for _ in ()).throw(AssertionError("ran")))
    with pytest.raises(ValueError, match=rf"{d.name}: a finished run with another config \(student\.train\.lr"):
        run_sweep(cfg, [2.0], [5], processes=False)
    write_resolved(run, d)  # same recipe, but distilled from another teacher
    (d / "result.json").write_text(json.dumps({**done, "teacher": {"sha256": "f" * 64}}))
    with pytest.raises(ValueError, match=r"distilled from teacher ffffffffffff, the bundle is now"):
        run_sweep(cfg, [2.0], [5], processes=False)
    (d / "result.json").write_text(json.dumps(done))
    assert run_sweep(cfg, [2.0], [5], processes=False) == []  # the matching finished run is skipped
