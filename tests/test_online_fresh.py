"""`student.online_fresh`: online distillation with a fresh augmentation every epoch (not the K replays)."""

from __future__ import annotations

import json
import shutil

import pytest

from attnfd_pipeline import augment
from attnfd_pipeline.config import ConfigError, dump_toml, load_config
from attnfd_pipeline.data.loaders import CachedSeeds, FreshSeeds
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.student import StudentDataset, run_name, run_student, student_dir, train_seeds


def _with(cfg, tmp_path, *overrides):
    p = tmp_path / "cfg.toml"
    p.write_text(dump_toml(cfg))
    return load_config(p, list(overrides))


def test_online_fresh_needs_online_mode():
    with pytest.raises(ConfigError, match=r"student\.online_fresh: .*student\.mode = \"online\""):
        load_config("configs/demo.toml", ["student.online_fresh=true"])
    cfg = load_config("configs/demo.toml", ['student.mode="online"', "student.online_fresh=true"])
    assert cfg.student.online_fresh and not load_config("configs/demo.toml").student.online_fresh


def test_fresh_seeds_and_crops_differ_from_the_replayed_ones(tiny_cfg, tmp_path):
    replay_cfg = _with(tiny_cfg, tmp_path, 'student.mode="online"')
    fresh_cfg = _with(tiny_cfg, tmp_path, 'student.mode="online"', "student.online_fresh=true")
    assert isinstance(train_seeds(tiny_cfg), CachedSeeds) and isinstance(train_seeds(replay_cfg), CachedSeeds)
    fresh = train_seeds(fresh_cfg)
    assert isinstance(fresh, FreshSeeds)
    K = tiny_cfg.cache.K
    src = ImageSource.from_config(tiny_cfg)
    ds = StudentDataset(src, fresh_cfg.augment, fresh)
    for epoch in range(3):
        for index in range(len(src)):
            k = fresh(epoch, index)
            assert k == augment.ONLINE_AUG_OFFSET + epoch  # a new draw each epoch, outside the cached [0, K)
            hw = tuple(src.load(index)[0].shape[-2:])
            params = augment.draw(fresh_cfg.augment, index, k, hw).as_dict()
            cached = [augment.draw(tiny_cfg.augment, index, c, hw).as_dict() for c in range(K)]
            assert params not in cached
        assert ds[(epoch, 0)]["aug_seed"] == augment.ONLINE_AUG_OFFSET + epoch
    names = {run_name(c) for c in (tiny_cfg, replay_cfg, fresh_cfg)}
    assert len(names) == 3 and "_online-fresh_" in run_name(fresh_cfg)
    base = [_with(c, tmp_path, "student.alpha=0") for c in (tiny_cfg, fresh_cfg)]
    assert run_name(base[0]) != run_name(base[1]) and "baseline_fresh" in run_name(base[1])
    # another run seed draws other fresh crops (never one of seed 0's, nor a cached one)
    other = train_seeds(_with(fresh_cfg, tmp_path, "student.train.seed=3"))
    seen0 = {fresh(e, 0) for e in range(50)}
    assert all(other(e, 0) not in seen0 and other(e, 0) >= K for e in range(50))


def test_online_fresh_run_trains_on_fresh_crops(tiny_pipeline, tmp_path, monkeypatch):
    cfg, _ = tiny_pipeline
    new = _with(cfg, tmp_path, f'runs_root="{tmp_path / "runs"}"', 'student.mode="online"',
                "student.online_fresh=true")
    shutil.copytree(cfg.teacher_dir, new.teacher_dir)
    seen: list[int] = []
    getitem = StudentDataset.__getitem__

    def spy(self, key):
        item = getitem(self, key)
        seen.append(int(item["aug_seed"]))
        return item

    monkeypatch.setattr(StudentDataset, "__getitem__", spy)  # data.num_workers = 0: items load in-process
    r = run_student(new, progress=False)
    assert r["mode"] == "online" and r["augment"] == "fresh" and r["cache"] is None and r["epochs"] == 1
    assert seen and set(seen) == {augment.ONLINE_AUG_OFFSET}  # epoch 0, every image: the fresh draw
    saved = json.loads((student_dir(new) / "result.json").read_text())
    assert saved["augment"] == "fresh" and "online-fresh" in saved["run"]
