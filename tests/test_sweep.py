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


def test_sweep_on_a_local_cluster_skips_finished_runs(tiny_pipeline, tmp_path):
    import dataclasses

    cfg, _ = tiny_pipeline
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(
        cfg.student, train=dataclasses.replace(cfg.student.train, epochs=1)))
    done = run_sweep(cfg, [0.0, 2.0], [3], workers=2)
    assert sorted(r["alpha"] for r in done) == [0.0, 2.0]
    assert all(0 <= r["best_miou"] <= 1 for r in done)
    assert run_sweep(cfg, [0.0, 2.0], [3], workers=2) == []  # rerun: nothing left to do
