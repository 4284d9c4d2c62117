"""Shared fixtures: a tiny generated demo dataset and a config sized for 2-core CI; a reference cache of the
fake teacher and the `attnfd cache` CLI wired to the fakes (the fakes themselves: fakes.py)."""

from __future__ import annotations

import pytest
import torch

from attnfd_pipeline.config import load_config
from fakes import FakeSource, FakeTeacher, fake_cfg

torch.set_num_threads(2)

TINY = [
    'data.root="{root}"', 'runs_root="{runs}"', 'cache.root="{cache}"', "data.num_workers=0",
    "augment.crop_size=[48, 48]", "augment.base_size=48",
    'teacher.model.name="deeplabv3plus_resnet18"', "teacher.train.epochs=1", "teacher.train.batch_size=4",
    "teacher.train.val_batch_size=4", "teacher.fit_epochs=1",
    "cache.K=2", "cache.shard_size=4", "cache.batch_size=4",
    "student.train.epochs=1", "student.train.batch_size=4", "student.train.val_batch_size=4",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from attnfd_pipeline.data.demo import generate_demo

    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, seed=0, n_train=10, n_val=4, min_size=40, max_size=64, workers=1)
    return root


def make_cfg(root, tmp_path, *extra):
    overrides = [o.format(root=root, runs=tmp_path / "runs", cache=tmp_path / "cache") for o in TINY]
    return load_config("configs/demo.toml", overrides + list(extra))


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path):
    return make_cfg(tiny_data, tmp_path)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_data, tmp_path_factory):
    """A trained tiny teacher bundle and a complete cache, shared by the student tests."""
    from attnfd_pipeline.cache import build_cache
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.runs import run_teacher
    from attnfd_pipeline.teacher import load_teacher

    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = make_cfg(tiny_data, tmp)
    bundle = run_teacher(cfg, progress=False)
    build_cache(cfg, load_teacher(bundle), ImageSource.from_config(cfg), progress=False)
    return cfg, bundle


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One complete reference build of the fake teacher (shared by the read-only tests of a module)."""
    from attnfd_pipeline.cache import build_cache

    root = tmp_path_factory.mktemp("ref")
    cfg, teacher, source = fake_cfg(root), FakeTeacher(), FakeSource()
    r = build_cache(cfg, teacher, source, progress=False)
    return cfg, teacher, source, r


@pytest.fixture
def cache_cli_env(tmp_path, monkeypatch):
    """A tiny config file for `attnfd cache` (fakes.cache_cli) whose teacher and dataset loaders return the
    fakes; yields (config path, tmp_path, {"teacher": the bundle path the CLI asked for})."""
    import stages.cache

    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(
        f'name = "tiny"\nruns_root = "{tmp_path / "runs"}"\n'
        "[augment]\ncrop_size = [32, 32]\nbase_size = 48\nscale_min = 0.75\nscale_max = 1.5\n"
        f'[cache]\nroot = "{tmp_path / "cache"}"\nK = 2\nshard_size = 2\nbatch_size = 3\n'
        '[teacher.train]\ndevice = "cpu"\n')
    teacher = FakeTeacher()
    seen = {}

    def load_teacher(path, device):
        seen["teacher"] = path
        return teacher

    monkeypatch.setattr(stages.cache, "load_teacher", load_teacher)
    monkeypatch.setattr(stages.cache, "load_teacher_info", lambda path: teacher.info())
    monkeypatch.setattr(stages.cache, "make_source", lambda cfg: FakeSource())
    return cfg_path, tmp_path, seen
