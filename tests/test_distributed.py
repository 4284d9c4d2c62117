"""Scale-out: DDP training under torchrun, cache builds on many writers (torchrun ranks, dask
workers) bitwise equal to a single-process build.

Every multi-process run here is real and goes through the CLI users run: ``torchrun --standalone
--nproc_per_node=2`` with gloo on CPU, a dask LocalCluster of 2 worker processes. Sizes are tiny (the
conftest pipeline: 48-px crops, 10 train / 4 val images, 1 epoch, a ResNet-18 teacher). Every process
uses one torch thread (OMP_NUM_THREADS=1): on CPU the teacher's float32 outputs depend on the thread
count, and bitwise equality is promised against a reference build with the same numerics.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run(args: list[str], *, torchrun: bool = False, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m …`` (or the same under a 2-process torchrun) from the repo root, one torch thread each."""
    env = {**os.environ, **ONE_THREAD}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    cmd = [sys.executable, *launcher, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


def own_runs_root(base, tmp: Path, *extra: str, cache_root=None):
    """The tiny pipeline's config with its own runs root (the teacher bundle copied in) and optionally
    its own cache root: (config, the ``--set`` overrides that give it)."""
    from conftest import TINY

    from attnfd_pipeline.config import load_config
    from attnfd_pipeline.teacher import bundle_path

    overrides = [o.format(root=base.data.root, runs=tmp / "runs", cache=cache_root or base.cache.root) for o in TINY]
    overrides += list(extra)
    cfg = load_config(REPO / "configs/demo.toml", overrides)
    bundle_path(cfg).parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".pt", ".json"):
        shutil.copy(bundle_path(base).with_suffix(suffix), bundle_path(cfg).with_suffix(suffix))
    return cfg, overrides


def set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# ---------------------------------------------------------------------------------------------
# samplers (no process group needed)


def test_rank_partition_is_disjoint_and_complete():
    from attnfd_pipeline.data.loaders import EpochSampler
    from attnfd_pipeline.engine.distributed import DistContext, RankPartitionSampler, eval_sampler

    for n in (0, 1, 4, 7):
        parts = [list(RankPartitionSampler(n, rank=r, world=3)) for r in range(3)]
        assert sorted(i for p in parts for i in p) == list(range(n))  # every index once, no padding
        assert [len(RankPartitionSampler(n, rank=r, world=3)) for r in range(3)] == [len(p) for p in parts]
    assert eval_sampler(5, DistContext()) is None  # single process: the loader's own order, unchanged
    # training: each rank's share of the same (seed, epoch) permutation; the epoch is in every pair, so
    # the cached seed k = f(run_seed, e, i) does not depend on the number of ranks
    one = list(EpochSampler(10, seed=3))
    ranks = [EpochSampler(10, seed=3, rank=r, world=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(0)
    assert sorted(p for s in ranks for p in s) == sorted(one)


# ---------------------------------------------------------------------------------------------
# DDP student under torchrun


@pytest.mark.slow
def test_torchrun_student_trains_evaluates_on_all_ranks_and_writes_once(tiny_pipeline, tmp_path):
    from attnfd_pipeline.data.loaders import ValDataset
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.engine.checkpoint import load_checkpoint
    from attnfd_pipeline.engine.train import read_log
    from attnfd_pipeline.runs import student_dir

    cfg, overrides = own_runs_root(tiny_pipeline[0], tmp_path, "student.alpha=2.0", 'student.train.device="cpu"',
                                   "student.train.seed=11")  # reads the pipeline's cache
    proc = run(["-m", "stages.student", "--config", "configs/demo.toml", *set_args(overrides)], torchrun=True)

    out_dir = student_dir(cfg)
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["best.pt", "best.pt.sha256", "config.resolved.toml", "last.pt", "last.pt.sha256", "log.txt",
                     "metrics.parquet", "result.json", "summary.json"], names  # (fewer steps than log_every: no steps.parquet)
    # one checkpoint set (with its hash sidecars), one log: no per-rank copies or temp files
    assert proc.stdout.count("epoch 1/1") == 1 and proc.stdout.count("best mIoU") == 1  # rank 0 speaks
    log = read_log(out_dir / "metrics.parquet")
    # 10 images over 2 ranks = 5 per rank, batch 4, drop_last: 1 step per epoch (one process takes 2)
    assert len(log) == 1 and log[0]["step"] == 1
    assert log[0]["train_attnfd"] > 0 and torch.isfinite(torch.tensor(log[0]["train_loss"]))
    assert json.loads((out_dir / "summary.json").read_text())["world_size"] == 2
    # the confusion matrix of the checkpoint is the sum over ranks: every valid val pixel, exactly once
    val = ValDataset(ImageSource.from_config(cfg, cfg.data.val_split), cfg.augment.crop_size)
    valid = sum(int((val[i]["label"] != 255).sum()) for i in range(len(val)))
    cm = torch.tensor(load_checkpoint(out_dir / "best.pt")["extra"]["metrics"]["confusion"])
    assert int(cm.sum()) == valid
    result = json.loads((out_dir / "result.json").read_text())
    assert result["best_miou"] == log[0]["miou"] and 0.0 <= result["best_miou"] <= 1.0


# ---------------------------------------------------------------------------------------------
# cache builds on many writers


@pytest.fixture(scope="module")
def reference_cache(tiny_pipeline, tmp_path_factory):
    """A single-process `attnfd cache build` of the tiny pipeline's teacher (one torch thread)."""
    tmp = tmp_path_factory.mktemp("single")
    cfg, overrides = own_runs_root(tiny_pipeline[0], tmp, cache_root=tmp / "cache")
    run(["-m", "stages.cache", "build", "--config", "configs/demo.toml", "--no-progress", *set_args(overrides)])
    (path,) = [p for p in Path(cfg.cache.root).iterdir()]
    return path


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def assert_same_cache(got: Path, ref: Path, ranks: list[int]) -> None:
    """Every file of the Zarr store (chunks and metadata) and cache.json bitwise equal; manifests equal
    row for row except the ``rank`` provenance column; each part carries the cache's fingerprint; no
    lock or temp file left."""
    import pyarrow.parquet as pq

    from attnfd_pipeline.cache import CacheReader

    assert got.name == ref.name  # same fingerprint
    files = tree_bytes(got / "features.zarr")
    assert any("/c/" in f for f in files) and files == tree_bytes(ref / "features.zarr")
    assert (got / "cache.json").read_bytes() == (ref / "cache.json").read_bytes()
    a, b = CacheReader(got).manifest(), CacheReader(ref).manifest()
    assert a.column("rank").to_pylist() == ranks
    assert a.drop_columns(["rank"]).equals(b.drop_columns(["rank"]))
    fp = json.loads((ref / "cache.json").read_text())["fingerprint"].encode()
    parts = sorted((got / "manifest").iterdir())
    assert [p.name for p in parts] == sorted(p.name for p in (ref / "manifest").iterdir())
    assert all(pq.read_schema(p).metadata[b"fingerprint"] == fp for p in parts)
    assert sorted(p.name for p in got.iterdir() if p.name != "log.txt") == ["cache.json", "features.zarr", "manifest"]
    assert not [p for p in got.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".")]


# 10 train images, shards of 4 → shards 0, 1, 2 of 4, 4, 2 images; 2 writers own {0, 2} and {1}; K = 2
RANKS_OF_TWO_WRITERS = [0] * 8 + [1] * 8 + [0] * 4


@pytest.mark.slow
def test_torchrun_cache_build_equals_single_process(tiny_pipeline, reference_cache, tmp_path):
    cfg, overrides = own_runs_root(tiny_pipeline[0], tmp_path, cache_root=tmp_path / "cache")
    proc = run(["-m", "stages.cache", "build", "--config", "configs/demo.toml", *set_args(overrides)], torchrun=True)
    assert proc.stdout.count("shards written 3, skipped 0 of 3") == 1  # rank 0 reports for both
    assert "with 2 torchrun writers" in proc.stdout
    assert json.loads((cfg.run_root / "cache_build.json").read_text())["writers"] == 2
    assert_same_cache(Path(cfg.cache.root) / reference_cache.name, reference_cache, RANKS_OF_TWO_WRITERS)


@pytest.mark.slow
def test_dask_cache_build_equals_single_process(tiny_pipeline, reference_cache, tmp_path):
    cfg, overrides = own_runs_root(tiny_pipeline[0], tmp_path, cache_root=tmp_path / "cache")
    # 2 worker processes; the teacher and the dataset are loaded in the workers
    proc = run(["-m", "stages.cache", "build", "--config", "configs/demo.toml", "--workers", "2",
                *set_args(overrides)])
    assert "shards written 3, skipped 0 of 3" in proc.stdout and "with 2 dask writers" in proc.stdout
    assert_same_cache(Path(cfg.cache.root) / reference_cache.name, reference_cache, RANKS_OF_TWO_WRITERS)


# ---------------------------------------------------------------------------------------------
# cache roots given as fsspec URLs


def test_file_url_cache_root_round_trips(tmp_path):
    """file:// is a local root (LocalStore, the POSIX commit protocol); other fsspec stores: test_cache_remote."""
    import dataclasses

    from fakes import FakeSource, FakeTeacher, fake_cfg

    from attnfd_pipeline.cache import CacheReader, build_cache, find_cache

    plain = build_cache(fake_cfg(tmp_path / "plain"), FakeTeacher(), FakeSource(), progress=False)
    cfg = fake_cfg(tmp_path / "x")
    cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, root=(tmp_path / "url").as_uri()))
    assert cfg.cache.root.startswith("file:///")
    r = build_cache(cfg, FakeTeacher(), FakeSource(), progress=False)
    assert r.path == tmp_path / "url" / plain.path.name
    assert find_cache(cfg, FakeTeacher(), FakeSource(), require_complete=True) == r.path
    got, ref = CacheReader(r.path), CacheReader(plain.path)
    assert got.complete and got.manifest().equals(ref.manifest())
    for k in range(2):
        a, b = got.read(3, k), ref.read(3, k)
        assert all(a[n].tobytes() == b[n].tobytes() for n in ref.targets)
