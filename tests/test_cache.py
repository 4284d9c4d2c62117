"""Stage 1b cache: round trip, fingerprint, resume, multi-writer, lossy steps, corruption detection.

Tiny everything: 5 images of 40–60 px, 32-px crops, K=2, shards of 2 images, a 4-conv fake teacher
whose B/E are at stride 16 and D/logits at stride 4.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attnfd_pipeline import augment
from attnfd_pipeline.cache import (CacheError, CacheInfo, CacheReader, build_cache, cache_fingerprint, check_compatible,
                                   describe_cache, find_cache, load_info, plan_cache, verify_cache)
from attnfd_pipeline.cache.build import run_teacher, shard_samples
from attnfd_pipeline.cache.lock import BuildLock
from attnfd_pipeline.cache.encoding import round_mantissa, to_float16
from attnfd_pipeline.cache.schema import ShardRange
from attnfd_pipeline.cache.writer import shard_file
from attnfd_pipeline.config import AugmentConfig, CacheConfig, Config
from attnfd_pipeline.data.source import SampleSource
from attnfd_pipeline.data.stage2 import replay_cached
from attnfd_pipeline.utils import sha256_state_dict

TESTS = Path(__file__).parent


# ---------------------------------------------------------------------------------------------
# fakes (also imported by test_cache_cli.py and by the killed subprocess below)


class FakeTeacher(nn.Module):
    """Deterministic frozen teacher: D (8 ch, stride 4, post-ReLU), B (16 ch, stride 16, pre-ReLU),
    E (8 ch, stride 16), logits (5 ch, stride 4); refined = parameter-free spatial gate."""

    def __init__(self, seed: int = 0, fail_at_call: int | None = None, poison: str | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.b = nn.Conv2d(8, 16, 3, stride=4, padding=1)
        self.e = nn.Conv2d(16, 8, 1)
        self.cls = nn.Conv2d(8, 5, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.requires_grad_(False)
        self.eval()
        self.fail_at_call, self.poison, self.calls = fail_at_call, poison, 0
        self.sha256 = sha256_state_dict(self.state_dict())

    def info(self) -> dict:
        return {"model": "fake", "cbam_mode": "parameter_free", "num_classes": 5, "sha256": self.sha256}

    @staticmethod
    def _gate(x):
        return x * torch.sigmoid(x.mean(1, keepdim=True) + x.amax(1, keepdim=True))

    @torch.no_grad()
    def targets(self, x, names):
        self.calls += 1
        if self.fail_at_call is not None and self.calls >= self.fail_at_call:
            raise RuntimeError("injected teacher failure")
        d = torch.relu(self.d(x))
        b = self.b(d)
        e = torch.relu(self.e(torch.relu(b)))
        raw = {"D": d, "B": b, "E": e}
        out = {}
        for n in names:
            if n == "logits":
                out[n] = self.cls(d)
            elif n.startswith("raw_"):
                out[n] = raw[n[4:]].clone()
            else:
                out[n] = self._gate(raw[n])
        if self.poison in out:
            out[self.poison][0, 0, 0, 0] = float("inf")
        return out

    def target_specs(self, crop_hw, names):
        calls = self.calls
        t = self.targets(torch.zeros(1, 3, *crop_hw), names)
        self.calls = calls
        return {k: tuple(v.shape[1:]) for k, v in t.items()}


class FakeSource(SampleSource):
    """Random uint8 images of varied sizes with 5-class labels."""

    def __init__(self, n: int = 5, seed: int = 0, slow_from: int | None = None):
        rng = np.random.default_rng(seed)
        self.ids = np.array([f"img_{i:03d}" for i in range(n)])
        self._images, self._labels = [], []
        for _ in range(n):
            h, w = (int(v) for v in rng.integers(40, 61, size=2))
            # smooth-ish images so blur/resize matter but stay cheap
            base = rng.integers(0, 256, size=(3, h // 4 + 1, w // 4 + 1), dtype=np.uint8)
            img = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)[:, :h, :w]
            self._images.append(torch.from_numpy(np.ascontiguousarray(img)))
            self._labels.append(torch.from_numpy(rng.integers(0, 5, size=(h, w), dtype=np.uint8)))
        self.slow_from = slow_from

    def __len__(self):
        return len(self.ids)

    def load(self, index):
        if self.slow_from is not None and index >= self.slow_from:
            time.sleep(3600)  # the subprocess is killed while it waits here
        return self._images[index].clone(), self._labels[index].clone()

    def identity(self):
        h = hashlib.sha256()
        for i, img in zip(self.ids, self._images):
            h.update(f"{i}:{tuple(img.shape)}:{hashlib.sha256(img.numpy().tobytes()).hexdigest()}".encode())
        return {"dataset": "fake", "split": "train", "count": len(self), "listing_sha256": h.hexdigest()}


def make_cfg(root, **cache) -> Config:
    c = dict(root=str(root), K=2, points=("B", "E", "D"), shard_size=2, batch_size=3)
    c.update(cache)
    return Config(augment=AugmentConfig(crop_size=(32, 32), base_size=48, scale_min=0.75, scale_max=1.5),
                  cache=CacheConfig(**c))


def tree_bytes(d: Path, sub: str = "features.zarr") -> dict[str, bytes]:
    base = Path(d) / sub
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One complete reference build (shared by read-only tests)."""
    root = tmp_path_factory.mktemp("ref")
    cfg, teacher, source = make_cfg(root), FakeTeacher(), FakeSource()
    r = build_cache(cfg, teacher, source, progress=False)
    return cfg, teacher, source, r


# ---------------------------------------------------------------------------------------------
# round trip and layout


def test_round_trip_bitwise_and_online(built):
    cfg, teacher, source, r = built
    reader = CacheReader(r.path)
    assert reader.complete and len(reader) == 5 * 2
    names = list(reader.targets)
    assert names == ["B", "E", "D"]
    # bitwise: the same shard batches through the teacher, then float16
    for s in range(3):
        start, stop = s * 2, min(s * 2 + 2, 5)
        rows, crops, _ = shard_samples(cfg, source, ShardRange(s, start, stop), source.ids)
        outs, _ = run_teacher(teacher, crops, names, cfg.cache.batch_size, torch.device("cpu"))
        for j, row in enumerate(rows):
            got = reader.read(row["image_index"], row["aug_seed"])
            for n in names:
                assert got[n].dtype == np.float16
                assert np.array_equal(got[n].view(np.uint16), outs[n][j].astype(np.float16).view(np.uint16))
    # online: one crop at a time, replayed from the manifest, within float16 tolerance
    for i in range(5):
        for k in range(2):
            img, lab = replay_cached(reader, source, i, k)
            online = teacher.targets(augment.normalize(img)[None], names)
            got = reader.read(i, k)
            for n in names:
                ref = online[n][0].numpy()
                assert np.allclose(got[n].astype(np.float32), ref, rtol=2e-3, atol=1e-3), n
    assert reader.read(1, 1, ["D"])["D"].shape == (8, 8, 8)
    assert reader.read(1, 1, ["B"])["B"].shape == (16, 2, 2)


def test_cache_info_is_cache_json_typed(built, tmp_path):
    """``CacheInfo`` reads what the build wrote and writes back the same bytes; a missing or ill-typed key is
    refused naming the file and the key."""
    cfg, teacher, source, r = built
    text = (r.path / "cache.json").read_text()
    info = CacheReader(r.path).info
    assert isinstance(info, CacheInfo) and info == load_info(r.path)
    assert json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n" == text
    assert info.points == ("B", "E", "D") and info.extra == () and info.pools == {}
    assert info.shapes["B"] == (16, 2, 2) and info.targets["D"].stride == 4 and info.teacher_sha256 == teacher.sha256
    assert info.samples == info.num_images * info.K == len(source) * 2
    d = tmp_path / "c"
    d.mkdir()
    for change, words in (({"K": None}, "key 'K' is missing"), ({"K": "2"}, "key 'K' is str '2', expected int"),
                          ({"num_shards": True}, "key 'num_shards' is bool"),
                          ({"crop_size": [32]}, "key 'crop_size' is \\[32\\], expected a list of 2 integers"),
                          ({"targets": {}}, "key 'targets' has no entry for \\['B', 'E', 'D'\\]")):
        bad = {k: v for k, v in {**json.loads(text), **change}.items() if v is not None}
        (d / "cache.json").write_text(json.dumps(bad))
        with pytest.raises(CacheError, match=f"{d / 'cache.json'}: {words}"):
            load_info(d)
    bad = json.loads(text)
    del bad["targets"]["E"]["chw"]
    (d / "cache.json").write_text(json.dumps(bad))
    with pytest.raises(CacheError, match=r"cache.json: targets.E: key 'chw' is missing"):
        CacheReader(d)


def test_layout_codecs_attributes_and_dask(built):
    import dask.array as da
    import zarr

    cfg, teacher, source, r = built
    info = json.loads((r.path / "cache.json").read_text())
    assert r.path.name == info["fingerprint"][:16] and r.path.parent == Path(cfg.cache.root)
    assert info["inputs"]["teacher_sha256"] == teacher.sha256 and info["inputs"]["K"] == 2
    assert info["targets"]["B"]["chw"] == [16, 2, 2] and info["targets"]["D"]["stride"] == 4
    meta = json.loads((r.path / "features.zarr" / "D" / "zarr.json").read_text())
    assert meta["fill_value"] == "NaN" and meta["data_type"] == "float16"
    shard = meta["codecs"][0]
    assert shard["name"] == "sharding_indexed" and shard["configuration"]["chunk_shape"] == [1, 1, 8, 8, 8]
    assert [c["name"] for c in shard["configuration"]["codecs"]] == ["bytes", "zstd", "crc32c"]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [2, 2, 8, 8, 8]
    assert meta["attributes"]["stride"] == 4 and meta["attributes"]["mantissa_bits"] == 10
    assert "float16" in meta["attributes"]["lossy"][0]
    # any Zarr v3 reader path: dask.array.from_zarr reads the same values
    reader = CacheReader(r.path)
    arr = zarr.open_array(r.path / "features.zarr" / "E", mode="r")
    x = da.from_zarr(arr).compute(scheduler="threads")
    for i in range(5):
        for k in range(2):
            assert np.array_equal(x[i, k], reader.read(i, k, ["E"])["E"])


def test_manifest_columns_and_replay(built):
    cfg, teacher, source, r = built
    reader = CacheReader(r.path)
    table = reader.manifest()
    assert table.num_rows == 10
    cols = set(table.column_names)
    assert {"image_id", "image_index", "aug_seed", "image_hash", "label_hash", "rank", "checksum_B",
            "checksum_E", "checksum_D"} <= cols
    assert {f.name for f in dataclasses.fields(augment.AugmentParams)} <= cols
    assert table.column("image_index").to_pylist() == [i for i in range(5) for _ in range(2)]
    parts = sorted(p.name for p in (r.path / "manifest").iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    import pyarrow.parquet as pq

    assert pq.read_schema(r.path / "manifest" / parts[0]).metadata[b"fingerprint"].decode() == r.fingerprint
    for i in range(5):
        image, label = source.load(i)
        for k in range(2):
            p = reader.params(i, k)
            assert p == augment.draw(cfg.augment, i, k, tuple(image.shape[-2:]))
            img, lab = augment.apply(p, image, label)
            assert (augment.content_hash(img), augment.content_hash(lab)) == reader.hashes(i, k)
            assert reader.image_id(i, k) == f"img_{i:03d}"


def test_fill_nan_and_uncommitted(tmp_path):
    import zarr

    cfg, teacher, source = make_cfg(tmp_path), FakeTeacher(), FakeSource()
    r = build_cache(cfg, teacher, source, rank=0, world=2, progress=False)  # shards 0, 2 only
    assert r.shards_written == 2 and r.shards_skipped == 1
    arr = zarr.open_array(r.path / "features.zarr" / "B", mode="r")
    assert np.isnan(arr[2, 0]).all() and np.isnan(arr[3, 1]).all()  # shard 1 never written: NaN, not 0
    reader = CacheReader(r.path)
    assert not reader.complete and reader.has(0, 0) and not reader.has(2, 0)
    with pytest.raises(CacheError, match="not committed"):
        reader.read(2, 0)
    assert describe_cache(r.path)["shards_committed"] == 2
    rep = verify_cache(r.path, source=source)
    assert rep.ok and not rep.complete
    with pytest.raises(CacheError, match="incomplete"):
        find_cache(cfg, teacher.info(), source, require_complete=True)


def test_reader_pickles_and_reopens(built):
    import pickle

    _, _, _, r = built
    reader = CacheReader(r.path)
    a = reader.read(3, 1)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._group is None
    b = clone.read(3, 1)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    reader._pid = -1  # as if forked: must reopen, not reuse
    old = reader._group
    reader.read(0, 0)
    assert reader._group is not old
    assert all(v.dtype.kind != "O" for v in reader._cols.values())  # numpy only, no object arrays


# ---------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_stable_and_sensitive(tmp_path):
    teacher, source = FakeTeacher(), FakeSource()
    base = make_cfg(tmp_path)
    fp = cache_fingerprint(base, teacher, source)
    assert fp == cache_fingerprint(make_cfg(tmp_path), FakeTeacher(), FakeSource())
    assert fp == cache_fingerprint(base, teacher.info(), source.identity())  # no teacher needed
    assert fp == cache_fingerprint(base, teacher.sha256, source)
    assert fp == cache_fingerprint(make_cfg(tmp_path / "elsewhere", batch_size=7), teacher, source)  # not inputs
    changed = {
        "teacher": cache_fingerprint(base, FakeTeacher(seed=1), source),
        "K": cache_fingerprint(make_cfg(tmp_path, K=3), teacher, source),
        "points": cache_fingerprint(make_cfg(tmp_path, points=("B", "D")), teacher, source),
        "extra": cache_fingerprint(make_cfg(tmp_path, extra=("logits",)), teacher, source),
        "codec": cache_fingerprint(make_cfg(tmp_path, codec="blosc"), teacher, source),
        "level": cache_fingerprint(make_cfg(tmp_path, level=3), teacher, source),
        "mantissa": cache_fingerprint(make_cfg(tmp_path, mantissa_bits=8), teacher, source),
        "shard": cache_fingerprint(make_cfg(tmp_path, shard_size=3), teacher, source),
        "dataset": cache_fingerprint(base, teacher, FakeSource(seed=1)),
        "crop": cache_fingerprint(dataclasses.replace(base, augment=dataclasses.replace(base.augment, crop_size=(24, 24))),
                                  teacher, source),
        "aug_seed": cache_fingerprint(dataclasses.replace(base, augment=dataclasses.replace(base.augment, seed=1)),
                                      teacher, source),
    }
    assert len(set(changed.values()) | {fp}) == len(changed) + 1, changed


def test_check_compatible_names_fields(built):
    cfg, teacher, source, r = built
    check_compatible(cfg, r.path, teacher=teacher, source=source)
    other = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, K=4),
                                augment=dataclasses.replace(cfg.augment, crop_size=(24, 24)))
    with pytest.raises(CacheError) as e:
        check_compatible(other, r.path, source=FakeSource(seed=3))
    msg = str(e.value)
    assert "K:" in msg and "augment.crop_size" in msg and "dataset.listing_sha256" in msg
    assert find_cache(cfg, teacher.info(), source, require_complete=True) == r.path
    with pytest.raises(CacheError, match="no cache"):
        find_cache(other, teacher.info(), source)


# ---------------------------------------------------------------------------------------------
# resume, multi-writer, lock


def test_resume_after_injected_failure_is_bitwise_identical(tmp_path, built):
    _, _, _, ref = built
    cfg = make_cfg(tmp_path)
    source = FakeSource()
    # shard 0 needs 2 teacher calls (4 samples, batch 3); the 3rd call (shard 1) fails
    with pytest.raises(RuntimeError, match="injected"):
        build_cache(cfg, FakeTeacher(fail_at_call=3), source, progress=False)
    assert sorted(p.name for p in (tmp_path / ref.path.name / "manifest").iterdir()) == ["part-00000.parquet"]
    assert not (tmp_path / ref.path.name / ".lock").exists()  # released on failure
    r = build_cache(cfg, FakeTeacher(), source, progress=False)
    assert r.path.name == ref.path.name and r.shards_written == 2 and r.shards_skipped == 1
    assert tree_bytes(r.path) == tree_bytes(ref.path)
    assert tree_bytes(r.path, "manifest") == tree_bytes(ref.path, "manifest")
    # a lost commit record: the shard is recomputed, same bytes again
    (r.path / "manifest" / "part-00001.parquet").unlink()
    for n in ("B", "E", "D"):
        shard_file(r.path, n, 1).unlink()
    again = build_cache(cfg, FakeTeacher(), source, progress=False)
    assert again.shards_written == 1
    assert tree_bytes(r.path) == tree_bytes(ref.path)
    assert build_cache(cfg, FakeTeacher(), source, progress=False).shards_written == 0  # nothing left


class NoDryForward(FakeTeacher):
    def target_specs(self, crop_hw, names):
        raise AssertionError("the build ran a dry forward for the target shapes")


def test_build_takes_shapes_from_the_first_shard_not_a_dry_forward(tmp_path, built):
    """One teacher call per batch, none for shapes (a fresh build reads them from the first shard's
    outputs, a build with nothing left from cache.json); the store is the reference's, byte for byte."""
    _, _, _, ref = built
    teacher = NoDryForward()
    r = build_cache(make_cfg(tmp_path), teacher, FakeSource(), progress=False)
    assert teacher.calls == 5  # shards of 4, 4, 2 samples in batches of 3: 2 + 2 + 1
    assert tree_bytes(r.path) == tree_bytes(ref.path) and (r.path / "cache.json").read_bytes() == (
        ref.path / "cache.json").read_bytes()
    again = NoDryForward()
    assert build_cache(make_cfg(tmp_path), again, FakeSource(), progress=False).shards_written == 0
    assert again.calls == 0


def test_killed_build_resumes_bitwise_identical(tmp_path, built):
    """SIGKILL a build process after its first commit; its stale lock is taken over on resume."""
    _, _, _, ref = built
    script = (
        "import sys; sys.path.insert(0, {tests!r})\n"
        "from test_cache import FakeTeacher, FakeSource, make_cfg\n"
        "from attnfd_pipeline.cache import build_cache\n"
        "build_cache(make_cfg({root!r}), FakeTeacher(), FakeSource(slow_from=2), progress=False)\n"
    ).format(tests=str(TESTS), root=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = tmp_path / ref.path.name / "manifest" / "part-00000.parquet"
    try:
        deadline = time.monotonic() + 60
        while not part.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert part.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timeout"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = tmp_path / ref.path.name / ".lock"
    assert lock.exists() and json.loads(lock.read_text())["pid"] == proc.pid
    r = build_cache(make_cfg(tmp_path), FakeTeacher(), FakeSource(), progress=False)
    assert r.shards_written == 2
    assert tree_bytes(r.path) == tree_bytes(ref.path)
    assert tree_bytes(r.path, "manifest") == tree_bytes(ref.path, "manifest")


def test_two_writers_equal_one(tmp_path, built):
    import pyarrow.parquet as pq

    _, _, _, ref = built
    cfg, source = make_cfg(tmp_path), FakeSource()
    r1 = build_cache(cfg, FakeTeacher(), source, rank=1, world=2, progress=False)
    assert r1.shards_written == 1  # shard 1 only; metadata created by whichever rank comes first
    r0 = build_cache(cfg, FakeTeacher(), source, rank=0, world=2, progress=False)
    assert r0.shards_written == 2
    assert tree_bytes(r0.path) == tree_bytes(ref.path)
    a, b = CacheReader(r0.path).manifest(), CacheReader(ref.path).manifest()
    assert a.column("rank").to_pylist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert a.drop_columns(["rank"]).equals(b.drop_columns(["rank"]))
    assert pq.read_schema(r0.path / "manifest" / "part-00001.parquet").metadata[b"fingerprint"] == \
        ref.fingerprint.encode()


def test_lock_refuses_live_and_takes_over_stale(tmp_path):
    cfg, teacher, source = make_cfg(tmp_path), FakeTeacher(), FakeSource()
    d = tmp_path / cache_fingerprint(cfg, teacher, source)[:16]
    d.mkdir(parents=True)
    import socket

    (d / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(CacheError, match="being built by pid"):
        build_cache(cfg, teacher, source, progress=False)
    with pytest.raises(CacheError, match="being built"):
        with BuildLock(d / ".lock", wait=0.3, poll=0.1):
            pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    r = build_cache(cfg, teacher, source, progress=False)
    assert r.shards_written == 3 and not (d / ".lock").exists()


# ---------------------------------------------------------------------------------------------
# lossy step and refusals


def test_mantissa_rounding_bound_and_size(tmp_path, built):
    x = np.random.default_rng(0).standard_normal((4, 16, 8, 8)).astype(np.float32) * 3
    y10 = x.astype(np.float16)
    y8 = round_mantissa(y10, 8)
    assert np.array_equal(round_mantissa(y10, 10), y10)
    low = (y8.view(np.uint16) & 0x3)  # two dropped bits are zero
    assert not low.any()
    # round to nearest: error at most half a unit of the 8-bit mantissa
    rel = np.abs(y8.astype(np.float64) - y10) / np.maximum(np.abs(y10.astype(np.float64)), 1e-3)
    assert rel.max() <= 2.0 ** -9 + 1e-6
    ties = np.array([1 + 1 / 512, 1 + 3 / 512], dtype=np.float16)  # exactly halfway at 8 bits
    assert round_mantissa(ties, 8).tolist() == [1.0, 1 + 4 / 512]  # ties to even

    _, teacher, source, ref = built
    r = build_cache(make_cfg(tmp_path, mantissa_bits=8), teacher, source, progress=False)
    assert r.fingerprint != ref.fingerprint
    full, lossy = CacheReader(ref.path), CacheReader(r.path)

    def chan_norm(a):
        a = a.astype(np.float64)
        return a / np.maximum(np.linalg.norm(a.reshape(a.shape[0], -1), axis=1), 1e-12)[:, None, None]

    cfg = make_cfg(tmp_path)
    for n in ("B", "E", "D"):
        num = den = 0.0
        for s in range(3):
            rows, crops, _ = shard_samples(cfg, source, ShardRange(s, 2 * s, min(2 * s + 2, 5)), source.ids)
            outs, _ = run_teacher(teacher, crops, [n], 3, torch.device("cpu"))
            for j, row in enumerate(rows):
                ref32 = chan_norm(outs[n][j])
                num += np.sum((chan_norm(lossy.read(row["image_index"], row["aug_seed"], [n])[n]) - ref32) ** 2)
                den += np.sum(ref32 ** 2)
        assert np.sqrt(num / den) <= 1e-3, n
    assert sum(len(v) for v in tree_bytes(r.path).values()) < sum(len(v) for v in tree_bytes(ref.path).values())
    meta = json.loads((r.path / "features.zarr" / "B" / "zarr.json").read_text())
    assert meta["attributes"]["mantissa_bits"] == 8 and "8 bits" in meta["attributes"]["lossy"][1]


def test_refuses_non_finite_and_overflow(tmp_path):
    cfg, source = make_cfg(tmp_path), FakeSource()
    with pytest.raises(CacheError, match=r"target 'E'.*non-finite.*image 'img_000', aug seed 0"):
        build_cache(cfg, FakeTeacher(poison="E"), source, progress=False)
    d = tmp_path / cache_fingerprint(cfg, FakeTeacher(), source)[:16]
    assert not list((d / "manifest").glob("part-*"))  # nothing committed
    big = np.full((2, 1, 2, 2), 1.0, np.float32)
    big[1, 0, 1, 1] = 7e4
    with pytest.raises(CacheError, match=r"overflow float16.*'b', aug seed 3"):
        to_float16(big, 0, target="D", ids=["a", "b"], seeds=[2, 3])
    with pytest.raises(CacheError, match="round to inf"):
        to_float16(np.full((1, 1, 1, 1), 65500.0, np.float32), 6, target="D", ids=["a"], seeds=[0])


# ---------------------------------------------------------------------------------------------
# corruption detection


def test_flipped_byte_and_checksum_mismatch_detected(tmp_path):
    import zarr

    cfg, teacher, source = make_cfg(tmp_path), FakeTeacher(), FakeSource()
    r = build_cache(cfg, teacher, source, progress=False)
    assert verify_cache(r.path, source=source).ok
    f = shard_file(r.path, "D", 1)  # images 2, 3; the first chunk is (2, 0)
    data = bytearray(f.read_bytes())
    data[5] ^= 0xFF
    f.write_bytes(bytes(data))
    reader = CacheReader(r.path)
    with pytest.raises(CacheError, match=r"image 'img_002' \(index 2\), aug seed 0, target 'D'"):
        reader.read(2, 0)
    reader.read(2, 1)  # other chunks of the shard still read
    # data changed behind the manifest's back (valid crc): checksum mismatch
    arr = zarr.open_array(r.path / "features.zarr" / "B", mode="r+")
    arr[4:5] = arr[4:5] * np.float16(2)
    with pytest.raises(CacheError, match=r"checksum mismatch.*img_004.*aug seed 0.*'B'"):
        CacheReader(r.path).read(4, 0)
    rep = verify_cache(r.path, source=source)
    bad = {(b.image_id, b.aug_seed, b.target) for b in rep.bad}
    assert ("img_002", 0, "D") in bad and ("img_004", 0, "B") in bad and ("img_004", 1, "B") in bad
    assert ("img_002", 1, "D") not in bad and not rep.ok


def test_verify_catches_deleted_chunk_and_manifest_without_data(tmp_path):
    cfg, teacher, source = make_cfg(tmp_path), FakeTeacher(), FakeSource()
    r = build_cache(cfg, teacher, source, progress=False)
    shard_file(r.path, "E", 2).unlink()  # image 4's data gone, its manifest rows remain
    rep = verify_cache(r.path, source=source, replay=4)
    assert rep.replayed == 4
    assert {(b.image_id, b.aug_seed, b.target) for b in rep.bad} == {("img_004", 0, "E"), ("img_004", 1, "E")}
    assert all("missing" in b.reason for b in rep.bad)
    # uncommitted data is a note, not an error
    (r.path / "manifest" / "part-00000.parquet").unlink()
    rep = verify_cache(r.path, source=source)
    assert any("shard 0 holds data" in n for n in rep.notes) and not rep.complete


def test_verify_replay_detects_changed_dataset_content(built):
    _, _, source, r = built
    # same identity, different pixels: only the replay hash check can see it
    changed = FakeSource()
    changed._images[1] = 255 - changed._images[1]
    changed.identity = source.identity
    rep = verify_cache(r.path, source=changed, replay=10)
    assert any("img_001" in p and "image hash" in p for p in rep.problems)
    with pytest.raises(CacheError, match="replayed image of image 'img_001'"):
        replay_cached(CacheReader(r.path), changed, 1, 0)


# ---------------------------------------------------------------------------------------------
# plan


def test_plan_measures_and_refuses(tmp_path, built, monkeypatch):
    cfg, teacher, source, ref = built
    plan = plan_cache(cfg, source, teacher=teacher)
    assert plan.samples == 10 and plan.samples_committed == 10 and plan.remaining_bytes == 0
    assert plan.targets["D"]["bytes"] == 8 * 8 * 8 * 2 and plan.bytes_per_sample == (16 * 4 + 8 * 4 + 512) * 2
    assert plan.measured and plan.targets["D"]["ratio"] > 1.0  # post-ReLU map: zeros compress
    assert plan.estimated_seconds == 0.0 and plan.seconds_per_sample > 0
    text = "\n".join(plan.lines())
    assert "kB/sample" in text and "free" in text
    fresh = make_cfg(tmp_path)
    nocomp = plan_cache(fresh, source, teacher_info=teacher.sha256, target_specs={"B": (16, 2, 2), "E": (8, 2, 2),
                                                                                   "D": (8, 8, 8)})
    assert not nocomp.measured and nocomp.targets["D"]["ratio"] == 1.0 and nocomp.remaining_bytes > 10 * 1200
    monkeypatch.setattr("attnfd_pipeline.cache.plan._free_bytes", lambda p: 1000)
    with pytest.raises(CacheError, match="free"):
        plan_cache(fresh, source, teacher=teacher)


def test_plan_precision_stats():
    from attnfd_pipeline.cache.plan import precision_stats

    x = np.random.default_rng(1).standard_normal((3, 4, 8, 8)).astype(np.float32)
    x[0, 1] = 0.0  # an all-zero map is left out, not a division by zero
    x[1, 2] *= 1e-6  # tiny channel: float16 subnormals
    st = precision_stats(x, to_float16(x, 0, target="D", ids=["a"] * 3, seeds=[0] * 3))
    assert st["tiny_channels"] == pytest.approx(1 / 12)
    assert 1e-5 < st["rel_error"] < 1e-2
    clean = np.delete(x.reshape(12, 8, 8), [5, 6], axis=0).reshape(2, 5, 8, 8)
    st = precision_stats(clean, to_float16(clean, 0, target="D", ids=["a"] * 2, seeds=[0] * 2))
    assert st["tiny_channels"] == 0 and st["rel_error"] < 3e-4


def test_float16_cast_matches_numpy_bitwise():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * s for s in (1e-8, 1e-5, 1e-2, 1, 3e4)]).clip(-65504, 65504)
    x = np.concatenate([x, np.array([65504, 65503.9, -65504, 6.1e-5, 5.96e-8, 2.98e-8, 8.94e-8, 0, -0.0],
                                    np.float32)]).reshape(1, 1, 1, -1)
    y = to_float16(x, 0, target="D", ids=["a"], seeds=[0])
    with np.errstate(over="ignore"):
        assert np.array_equal(y.view(np.uint16), x.astype(np.float16).view(np.uint16))


class _CachedItems(torch.utils.data.Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return 10

    def __getitem__(self, j):
        return {n: torch.from_numpy(v) for n, v in self.reader.read(j // 2, j % 2).items()}


def test_reader_in_forked_dataloader_workers(built):
    _, _, _, r = built
    reader = CacheReader(r.path)
    reader.read(0, 0)  # parent opened the store before the fork
    loader = torch.utils.data.DataLoader(_CachedItems(reader), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", persistent_workers=True)
    for _ in range(2):  # second epoch on the same persistent workers
        for j, item in enumerate(loader):
            want = reader.read(j // 2, j % 2)
            assert all(np.array_equal(item[n].numpy(), want[n]) for n in want)
