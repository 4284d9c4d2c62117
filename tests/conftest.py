"""Shared fixtures: a tiny generated demo dataset and a config sized for 2-core CI."""

from __future__ import annotations

import pytest
import torch

from attnfd_pipeline.config import load_config

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
