import pytest

from attnfd_pipeline.sweep import parse_list, run_sweep, sweep_configs


def test_parse_and_grid(tiny_cfg):
    assert parse_list("0.1, 1,2") == [0.1, 1.0, 2.0]
    assert parse_list("0,1", int) == [0, 1]
    with pytest.raises(ValueError, match="'x' in '1,x' is not a float"):
        parse_list("1,x")
    cfgs = sweep_configs(tiny_cfg, [0.0, 2.0], [0, 1])
    assert [(c.student.alpha, c.student.train.seed) for c in cfgs] == [(0.0, 0), (0.0, 1), (2.0, 0), (2.0, 1)]
    assert all(c.cache == tiny_cfg.cache and c.teacher == tiny_cfg.teacher for c in cfgs)


def test_sweep_on_a_local_cluster_skips_finished_runs(tiny_pipeline):
    cfg, _ = tiny_pipeline
    done = run_sweep(cfg, [0.0, 2.0], [3], workers=2)  # worker processes, as users run it
    assert sorted(r["alpha"] for r in done) == [0.0, 2.0]
    assert all(0 <= r["best_miou"] <= 1 for r in done)
    assert run_sweep(cfg, [0.0, 2.0], [3], workers=2) == []  # rerun: nothing left to do


def test_sweep_reuses_one_cache_without_the_teacher(tiny_pipeline, monkeypatch):
    """2 α × 2 seeds on one cache: no cache build, no teacher load or forward (threads, so the
    monkeypatched guards are seen by the runs)."""
    import attnfd_pipeline.cache as cache_mod
    import attnfd_pipeline.teacher as teacher_mod

    def forbidden(*a, **k):
        raise AssertionError("a cached sweep must not build a cache or touch the teacher")

    for mod, name in [(teacher_mod, "load_teacher"), (teacher_mod, "build_teacher_model"),
                      (teacher_mod.FrozenTeacher, "targets"), (cache_mod, "build_cache")]:
        monkeypatch.setattr(mod, name, forbidden)
    monkeypatch.setattr("attnfd_pipeline.student.load_teacher", forbidden)
    cfg, _ = tiny_pipeline
    done = run_sweep(cfg, [1.0, 2.0], [5, 6], workers=1, processes=False)
    assert sorted((r["alpha"], r["seed"]) for r in done) == [(1.0, 5), (1.0, 6), (2.0, 5), (2.0, 6)]
    assert len({r["cache"] for r in done}) == 1
    assert run_sweep(cfg, [1.0, 2.0], [5, 6], workers=1, processes=False) == []
