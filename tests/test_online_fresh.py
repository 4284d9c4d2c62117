"""`student.targets = "online-fresh"` (older spelling `student.online_fresh`): online distillation with a fresh
augmentation every epoch (not the K replays)."""

from __future__ import annotations

import json
import shutil

import pytest

from attnfd_pipeline import augment
from attnfd_pipeline.config import ConfigError, TargetSource, dump_toml, load_config
from attnfd_pipeline.data.loaders import CachedSeeds, FreshSeeds
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.data.stage2 import StudentDataset
from attnfd_pipeline.runs import run_name, run_student, student_dir, train_seeds


def _with(cfg, tmp_path, *overrides):
    p = tmp_path / "cfg.toml"
    p.write_text(dump_toml(cfg))
    return load_config(p, list(overrides))


def test_online_fresh_needs_online_mode():
    with pytest.raises(ConfigError, match=r"student\.online_fresh: .*student\.mode = \"online\""):
        load_config("configs/demo.toml", ["student.online_fresh=true"])
    cfg = load_config("configs/demo.toml", ['student.mode="online"', "student.online_fresh=true"])
    assert cfg.student.targets is TargetSource.ONLINE_FRESH
    assert load_config("configs/demo.toml").student.targets is TargetSource.CACHED


def test_both_spellings_of_the_target_source_mean_the_same_run(tmp_path):
    """``student.targets`` and the older ``student.mode`` / ``student.online_fresh`` name the same runs (names
    and result fields unchanged); a contradiction names both keys; an override wins over the file in
    either spelling."""
    legacy = {TargetSource.CACHED: [], TargetSource.ONLINE_REPLAY: ['student.mode="online"'],
              TargetSource.ONLINE_FRESH: ['student.mode="online"', "student.online_fresh=true"]}
    tags = {TargetSource.CACHED: ("cached", "cached", "replay"), TargetSource.ONLINE_REPLAY: ("online", "online", "replay"),
            TargetSource.ONLINE_FRESH: ("online-fresh", "online", "fresh")}
    for source, sets in legacy.items():
        old, new = load_config("configs/demo.toml", sets), load_config("configs/demo.toml", [f'student.targets="{source}"'])
        assert old == new and old.student.targets is source
        assert (source.tag, source.mode, source.augment) == tags[source] and f"_{source.tag}_K" in run_name(new)
        assert TargetSource.of(source.mode, source.augment) is source
    agree = load_config("configs/demo.toml", ['student.targets="online-fresh"', 'student.mode="online"'])
    assert agree.student.targets is TargetSource.ONLINE_FRESH
    with pytest.raises(ConfigError, match=r"student\.targets: 'cached' contradicts student\.mode = \"online\""):
        load_config("configs/demo.toml", ['student.targets="cached"', 'student.mode="online"'])
    with pytest.raises(ConfigError, match=r"student\.targets: 'online' is not one of"):
        load_config("configs/demo.toml", ['student.targets="online"'])
    new_file, old_file = tmp_path / "new.toml", tmp_path / "old.toml"
    new_file.write_text('[student]\ntargets = "online-fresh"\n')
    old_file.write_text('[student]\nmode = "online"\nonline_fresh = true\n')
    assert load_config(new_file, ['student.mode="cached"']).student.targets is TargetSource.CACHED
    assert load_config(old_file, ['student.targets="cached"']).student.targets is TargetSource.CACHED
    assert load_config(old_file, ["student.online_fresh=false"]).student.targets is TargetSource.ONLINE_REPLAY
    assert 'targets = "online-fresh"' in dump_toml(load_config(old_file))


def test_a_finished_run_resolved_in_the_older_spelling_is_still_the_same_run(tmp_path):
    """A run whose config.resolved.toml says ``mode = "online"`` / ``online_fresh = true`` (written before
    ``student.targets``) is found under the same name and stands for the same config."""
    from attnfd_pipeline.runs import finished_run_differences

    cfg = load_config("configs/demo.toml", [f'runs_root="{tmp_path}"', 'student.targets="online-fresh"'])
    d = student_dir(cfg)
    d.mkdir(parents=True)
    text = dump_toml(cfg)
    assert 'targets = "online-fresh"' in text
    (d / "config.resolved.toml").write_text(text.replace('targets = "online-fresh"',
                                                         'mode = "online"\nonline_fresh = true'))
    (d / "result.json").write_text(json.dumps({"run": d.name, "final_miou": 0.5, "mode": "online",
                                               "augment": "fresh"}))
    assert finished_run_differences(cfg) is None
    other = load_config("configs/demo.toml", [f'runs_root="{tmp_path}"', 'student.targets="online-fresh"',
                                              "student.train.lr=0.5"])
    assert "student.train.lr" in finished_run_differences(other)


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


@pytest.mark.slow
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
