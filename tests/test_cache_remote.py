"""Caches on fsspec stores: ``cache.root = "memory://…"`` builds, resumes, locks, verifies and
reads exactly like a local cache — every stored byte equal to a plain local build's.

fsspec's in-process ``memory://`` store stands in for S3/GCS: the same code path (FsspecStore for the
arrays, whole-object puts for metadata and manifest parts, an exclusive-create lock). Same tiny fakes
as ``test_cache.py``.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from fakes import FakeSource, FakeTeacher, fake_cfg

from attnfd_pipeline.cache import (CacheError, CacheReader, build_cache, describe_cache, find_cache, list_caches,
                                   verify_cache)
from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache.schema import paths

ROOT = "memory://attnfd/cache"


@pytest.fixture(autouse=True)
def clean_memory_fs():
    """fsspec's memory store is one process-wide dict: empty before and after every test."""
    from fsspec.implementations.memory import MemoryFileSystem

    def clear():
        MemoryFileSystem.store.clear()
        MemoryFileSystem.pseudo_dirs[:] = [""]

    clear()
    yield
    clear()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The reference: the same cache built in a local directory."""
    return build_cache(fake_cfg(tmp_path_factory.mktemp("plain")), FakeTeacher(), FakeSource(), progress=False)


def stored_bytes(cache_dir) -> dict[str, bytes]:
    """Every file of a cache (local or remote), lock files and the build's log.txt aside (a local build logs,
    an object store cannot append; timestamps differ anyway): relative path → bytes."""
    return {rel: storage.read_bytes(storage.join(cache_dir, *rel.split("/")))
            for rel in storage.files(cache_dir) if not rel.startswith(".lock") and rel != "log.txt"}


def assert_same_cache(got, ref) -> None:
    assert stored_bytes(got) == stored_bytes(ref)  # arrays, manifest parts and cache.json, bitwise
    a, b = CacheReader(got), CacheReader(ref)
    assert a.complete and a.manifest().equals(b.manifest())
    for i in range(b.num_images):
        for k in range(b.K):
            x, y = a.read(i, k), b.read(i, k)
            assert all(x[n].tobytes() == y[n].tobytes() for n in b.targets)


# ---------------------------------------------------------------------------------------------
def test_memory_cache_round_trips_bitwise(plain):
    cfg = fake_cfg(ROOT)
    r = build_cache(cfg, FakeTeacher(), FakeSource(), progress=False)
    assert r.path == f"{ROOT}/{plain.path.name}" and r.shards_written == 3
    assert r.bytes_written == plain.bytes_written
    assert find_cache(cfg, FakeTeacher(), FakeSource(), require_complete=True) == r.path
    assert list_caches(ROOT) == [r.path]
    assert_same_cache(r.path, plain.path)
    report = verify_cache(r.path, source=FakeSource())
    assert report.ok and report.complete and report.samples_checked == 10 and report.replayed == 8
    info = describe_cache(r.path)
    # a local build logs (when the process's logging writes run logs: not after every earlier test); an
    # object store cannot append
    log = plain.path / "log.txt"
    local_log = log.stat().st_size if log.is_file() else 0
    assert info["complete"] and info["size_bytes"] == describe_cache(plain.path)["size_bytes"] - local_log
    # a deleted chunk object is found, as on disk
    storage.remove(f"{r.path}/features.zarr/D/c/1/0/0/0/0")
    bad = verify_cache(r.path, replay=0)
    assert not bad.ok and {(b.image_index, b.target) for b in bad.bad} == {(2, "D"), (3, "D")}


@pytest.mark.parametrize("failure", ["teacher", "commit"])
def test_interrupted_memory_build_keeps_whole_shards_and_resumes(plain, monkeypatch, failure):
    """Shard 1 fails in the teacher (nothing written) or after its arrays landed but before its manifest
    part (data without commit record): shard 0 stays committed, shard 1 is not, and a rerun completes
    bitwise equal to the plain cache."""
    cfg = fake_cfg(ROOT)
    teacher = FakeTeacher(fail_at_call=3) if failure == "teacher" else FakeTeacher()
    if failure == "commit":
        import attnfd_pipeline.cache.writer as writer

        real = writer.write_part

        def no_commit_for_shard_1(manifest_dir, shard, *a, **k):
            if shard == 1:
                raise OSError("injected: connection lost before the commit record")
            return real(manifest_dir, shard, *a, **k)

        monkeypatch.setattr(writer, "write_part", no_commit_for_shard_1)
    with pytest.raises((RuntimeError, OSError), match="injected"):
        build_cache(cfg, teacher, FakeSource(), progress=False)
    d = f"{ROOT}/{plain.path.name}"
    assert storage.listdir(paths(d)["manifest"]) == ["part-00000.parquet"]
    assert not storage.exists(f"{d}/.lock")  # released on failure
    with pytest.raises(CacheError, match=r"incomplete cache \(1/3 shards committed\)"):
        find_cache(cfg, FakeTeacher(), FakeSource(), require_complete=True)
    reader = CacheReader(d)
    assert reader.has(1, 1) and not reader.has(2, 0) and reader.num_committed == 4
    report = verify_cache(d, replay=0)
    assert report.ok and not report.complete
    assert any("shard 1 holds data but is not committed" in n for n in report.notes) == (failure == "commit")
    monkeypatch.undo()
    r = build_cache(cfg, FakeTeacher(), FakeSource(), progress=False)
    assert r.shards_written == 2 and r.shards_skipped == 1
    assert find_cache(cfg, FakeTeacher(), FakeSource(), require_complete=True) == d
    assert_same_cache(d, plain.path)


class SecondBuildInside(FakeSource):
    """Starts a second build of the same cache while the first one (holding its lock) loads images."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.refusal, self.tried = cfg, None, False

    def load(self, index):
        if not self.tried:
            self.tried = True
            try:
                build_cache(self.cfg, FakeTeacher(), FakeSource(), progress=False)
            except CacheError as e:
                self.refusal = e
        return super().load(index)


def test_memory_cache_lock_refuses_a_second_build_and_names_the_fix():
    cfg = fake_cfg(ROOT)
    source = SecondBuildInside(cfg)
    r = build_cache(cfg, FakeTeacher(), source, progress=False)
    lock = f"{r.path}/.lock"
    assert source.tried and source.refusal is not None
    assert f"being built by pid {os.getpid()}" in str(source.refusal) and f"(lock {lock})" in str(source.refusal)
    assert r.shards_written == 3 and not storage.exists(lock)
    # a lock left by a dead process is never taken over on an object store: refused, naming the fix
    storage.write_bytes(lock, b'{"pid": 999999999, "host": "elsewhere"}')
    with pytest.raises(CacheError, match="remove the lock object") as refused:
        build_cache(cfg, FakeTeacher(), FakeSource(), progress=False)
    exec(re.search(r'python -c "(.*)"', str(refused.value)).group(1))  # the fix, as printed
    assert not storage.exists(lock)
    assert build_cache(cfg, FakeTeacher(), FakeSource(), progress=False).shards_written == 0


def test_unusable_roots_are_refused_naming_cache_root_and_the_fix():
    import importlib.util

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    def refused(root, match):
        with pytest.raises(CacheError, match=match):
            build_cache(fake_cfg(root), FakeTeacher(), FakeSource(), progress=False)

    if importlib.util.find_spec("s3fs") is None:
        refused("s3://bucket/cache", r"cache\.root = 's3://bucket/cache'.*s3fs.*pip install 'attnfd-pipeline\[s3\]'")
    refused("nosuchproto://x/cache", r"cache\.root = 'nosuchproto://x/cache'.*knows no protocol 'nosuchproto'")

    class NoExclusiveCreate(MemoryFileSystem):
        protocol = ("nolockmem",)

    fsspec.register_implementation("nolockmem", NoExclusiveCreate, clobber=True)
    refused("nolockmem://x/cache", r"needs an exclusive create.*nolockmem://")


def test_student_dataset_reads_a_memory_cache(plain):
    from attnfd_pipeline.data.loaders import CachedSeeds
    from attnfd_pipeline.data.stage2 import StudentDataset
    from attnfd_pipeline.runs import open_cache

    cfg = fake_cfg(ROOT)
    build_cache(cfg, FakeTeacher(), FakeSource(), progress=False)
    names = ("B", "E", "D")
    reader = open_cache(cfg, FakeTeacher().info(), FakeSource(), names)
    assert reader.path == f"{ROOT}/{plain.path.name}"
    keys = [(1, i) for i in range(5)]

    def batch(r):
        ds = StudentDataset(FakeSource(), cfg.augment, CachedSeeds(0, 2), r, names)
        return next(iter(torch.utils.data.DataLoader(ds, sampler=keys, batch_size=5, num_workers=0)))

    got, ref = batch(reader), batch(CacheReader(plain.path))
    assert torch.equal(got["image"], ref["image"]) and got["aug_seed"].tolist() == ref["aug_seed"].tolist()
    assert all(torch.equal(got["targets"][n], ref["targets"][n]) for n in names)
