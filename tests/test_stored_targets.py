"""Targets in their stored form: encoding on the teacher's device (bitwise the CPU codes), the crc32c
per-sample checksum (a changed byte, a swapped sample), caches of the older format (blake2b) read, verify and
resume, and Stage 2 batches that carry the stored arrays to the student's device.

Reuses test_cache's fake teacher and source (5 images, 32-px crops, K=2).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fakes import FakeSource, FakeTeacher, fake_cfg
from attnfd_pipeline.cache import CacheError, CacheReader, build_cache, find_cache, verify_cache
from attnfd_pipeline.cache import encoding as enc
from attnfd_pipeline.cache.manifest import list_parts, read_part, write_part

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------------------
# the CPU implementation the cache has always written, re-stated in NumPy


def numpy_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (sample, channel): offset = min, scale = (max − min) / 255 computed in float64 then rounded to
    float32 (0 for a zero range, or a step that underflows), code = rint((x − offset) / scale) in float32
    arithmetic (ties to even), clipped to 0..255; 0 wherever the scale is 0."""
    n, C = x.shape[:2]
    flat = x.reshape(n, C, -1).astype(np.float32)
    lo, hi = flat.min(-1), flat.max(-1)
    scale = ((hi.astype(np.float64) - lo.astype(np.float64)) / 255).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint((flat - lo[..., None]) / safe[..., None]), 0, 255)
    codes[scale == 0] = 0
    return codes.astype(np.uint8).reshape(x.shape), scale, lo


def awkward_maps(seed: int = 0) -> np.ndarray:
    """(4, 6, 9, 11) float32: Gaussian, post-ReLU sparse (~70 % zeros), constant zero and non-zero channels,
    exact rounding ties (x = (k + ½) · scale) and one wide-range channel."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 6, 9, 11)).astype(np.float32)
    x[:, 1] = np.maximum(x[:, 1] - 0.5, 0) * 3  # post-ReLU, mostly zeros
    x[:, 2] = 0.0
    x[:, 3] = -2.5
    ties = (rng.integers(0, 255, (4, 9, 11)) + 0.5).astype(np.float32)
    ties[:, 0, 0], ties[:, 0, 1] = 0.0, 255.0  # range exactly 0..255: scale 1, every value a tie
    x[:, 4] = ties
    x[:, 5] *= 1e4  # wide, still inside float16
    return x


@pytest.mark.parametrize("device", DEVICES)
def test_device_int8_codes_are_the_cpu_numpy_ones_bitwise(device):
    x = awkward_maps()
    want = numpy_int8(x)
    ties = want[0][:, 4].reshape(4, -1)[:, 2:]  # past the two endpoints 0 and 255
    assert (ties % 2 == 0).all()  # every tie went to the even code: the test can see ties
    got = enc.encode(torch.from_numpy(x).to(device), "int8")
    assert [p.device.type for p in got] == [device] * 3
    for g, w in zip(got, want):
        assert g.cpu().numpy().dtype == w.dtype and np.array_equal(g.cpu().numpy(), w)
    # the NumPy entry point is the same code
    for g, w in zip(enc.encode(x, "int8"), want):
        assert np.array_equal(g, w)
    sparse = np.maximum(np.random.default_rng(1).standard_normal((3, 5, 17, 17)).astype(np.float32) - 1, 0)
    assert (sparse == 0).mean() > 0.7
    for g, w in zip(enc.encode(torch.from_numpy(sparse).to(device), "int8"), numpy_int8(sparse)):
        assert np.array_equal(g.cpu().numpy(), w)


@pytest.mark.parametrize("device", DEVICES)
def test_device_float16_and_mantissa_rounding_are_numpy_bitwise(device):
    x = awkward_maps(2)
    (y,) = enc.encode(torch.from_numpy(x).to(device), "float16")
    assert y.dtype == torch.float16 and y.device.type == device
    assert np.array_equal(y.cpu().numpy().view(np.uint16), x.astype(np.float16).view(np.uint16))
    (y8,) = enc.encode(torch.from_numpy(x).to(device), "float16", mantissa_bits=8)
    assert np.array_equal(y8.cpu().numpy().view(np.uint16), enc.round_mantissa(x.astype(np.float16), 8).view(np.uint16))
    # pooling then encoding on the device is the host path's pooling then encoding (CPU: bitwise)
    if device == "cpu":
        for e in enc.ENCODINGS:
            a = enc.encode(torch.from_numpy(x), e, pool=2)
            b = enc.encode_target(x, e, 0, 2, target="D", ids=["a"] * 4, seeds=[0] * 4)
            assert all(np.array_equal(p.numpy(), q) for p, q in zip(a, b))
            assert a[0].shape[-2:] == (5, 6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("encoding", enc.ENCODINGS)
def test_device_encode_refuses_nan_inf_and_overflow_naming_the_sample(device, encoding):
    x = np.ones((3, 2, 4, 4), np.float32)
    ids, seeds = ["a", "b", "c"], [0, 5, 7]
    for bad, what in ((np.nan, "non-finite"), (np.inf, "non-finite"), (-np.inf, "non-finite")):
        y = x.copy()
        y[1, 1, 2, 3] = bad
        with pytest.raises(CacheError, match=rf"target 'D': 1 {what} .*'b'/seed 5"):
            enc.encode(torch.from_numpy(y).to(device), encoding, target="D", ids=ids, seeds=seeds)
    y = x.copy()
    y[2, 0, 0, 0] = 7e4
    if encoding == "float16":
        with pytest.raises(CacheError, match=r"overflow float16.*'c'/seed 7"):
            enc.encode(torch.from_numpy(y).to(device), encoding, target="D", ids=ids, seeds=seeds)
    else:  # int8 stores any finite range
        codes, scale, _ = enc.encode(torch.from_numpy(y).to(device), encoding)
        assert int(codes[2, 0, 0, 0]) == 255 and float(scale[2, 0]) == pytest.approx((7e4 - 1) / 255)


def test_host_copies_of_cpu_tensors_are_the_tensors():
    t = torch.arange(6, dtype=torch.uint8)
    copies = enc.HostCopies("cpu")
    (h,) = enc.to_host([t], copies)
    copies.wait()
    assert h is t


# ---------------------------------------------------------------------------------------------
# checksum: crc32c for new caches, blake2b for caches that record none


def test_checksum_algorithms_cover_every_stored_byte_in_order():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    s = np.array([1.5, 2.0], np.float32)
    import google_crc32c
    import hashlib

    assert enc.checksum([a, s]) == f"{google_crc32c.value(a.tobytes() + s.tobytes()):08x}"
    assert enc.checksum([a, s], "blake2b") == hashlib.blake2b(a.tobytes() + s.tobytes(), digest_size=16).hexdigest()
    assert enc.checksum([torch.from_numpy(a), torch.from_numpy(s)]) == enc.checksum([a, s])
    assert enc.checksum([s, a]) != enc.checksum([a, s])
    b = a.copy()
    b[2, 3] ^= 1
    assert enc.checksum([b, s]) != enc.checksum([a, s])
    with pytest.raises(CacheError, match="unknown checksum algorithm 'md5'"):
        enc.checksum([a], "md5")


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("stored-int8")
    cfg, teacher, source = fake_cfg(root, encoding="int8"), FakeTeacher(), FakeSource()
    return cfg, teacher, source, build_cache(cfg, teacher, source, progress=False)


def test_new_cache_records_crc32c_and_encoding_device(int8_cache):
    _, _, _, r = int8_cache
    raw = json.loads((r.path / "cache.json").read_text())
    assert raw["format"] == "attnfd-cache/2" and raw["checksum"] == "crc32c"
    part = read_part(list_parts(r.path / "manifest")[0])
    meta = part.schema.metadata
    assert meta[b"encoded_on"] == b"cpu" and meta[b"checksum"] == b"crc32c"
    sums = part.column("checksum_D").to_pylist()
    assert all(len(v) == 8 for v in sums)
    reader = CacheReader(r.path)
    stored = reader.read_stored(0, 1, ["D"])["D"]
    assert sums[1] == enc.checksum(stored)  # row 1 of shard 0: image 0, seed 1


def _copy(r, tmp_path, name):
    d = tmp_path / name
    shutil.copytree(r.path, d)
    return d


def test_changed_byte_and_swapped_sample_are_detected(tmp_path, int8_cache):
    import zarr

    _, _, source, r = int8_cache
    d = _copy(r, tmp_path, "swap")
    arr = zarr.open_array(str(d / "features.zarr" / "D"), mode="r+")
    block = arr[2:4]  # shard 1: images 2, 3
    block[[0, 1], 1] = block[[1, 0], 1]  # images 2 and 3 swap their seed-1 codes (valid chunks, valid crc)
    block[1, 0, 3, 2, 1] ^= 1  # one changed byte in image 3, seed 0
    arr[2:4] = block
    reader = CacheReader(d)
    for i, k in ((2, 1), (3, 1), (3, 0)):
        with pytest.raises(CacheError, match=rf"checksum mismatch for image 'img_00{i}' \(index {i}\), aug seed {k}"):
            reader.read(i, k, ["D"])
    reader.read(2, 0, ["D"])  # untouched
    bad = {(b.image_index, b.aug_seed, b.target, b.reason) for b in verify_cache(d, source=source, replay=0).bad}
    assert bad == {(2, 1, "D", "checksum mismatch"), (3, 1, "D", "checksum mismatch"),
                   (3, 0, "D", "checksum mismatch")}


def make_format1(d, info_names) -> None:
    """Turn a cache into what the first format wrote: cache.json ``attnfd-cache/1`` without ``checksum``, and
    blake2b manifest checksums (16-byte digest of the stored arrays' bytes in order)."""
    p = d / "cache.json"
    raw = json.loads(p.read_text())
    raw["format"] = "attnfd-cache/1"
    del raw["checksum"]
    p.write_text(json.dumps(raw, indent=2, sort_keys=True))
    reader = CacheReader(d, verify=False)  # only to read the stored arrays
    for s, part in list_parts(d / "manifest").items():
        rows = read_part(part).to_pylist()
        for row in rows:
            stored = reader.read_stored(row["image_index"], row["aug_seed"])
            for n in info_names:
                row["checksum_" + n] = enc.checksum(stored[n], "blake2b")
        write_part(d / "manifest", s, rows, info_names, raw["fingerprint"])


def test_format1_cache_reads_verifies_and_resumes_with_blake2b(tmp_path, int8_cache):
    import zarr

    cfg, teacher, source, r = int8_cache
    d = _copy(r, tmp_path, "old")
    names = list(CacheReader(r.path).targets)
    make_format1(d, names)
    reader = CacheReader(d)
    assert reader.info.written_as == "attnfd-cache/1" and reader.info.checksum == "blake2b"
    want = CacheReader(r.path).read(1, 1)
    assert all(np.array_equal(reader.read(1, 1)[n], want[n]) for n in names)
    assert verify_cache(d, source=source, replay=2).ok
    assert reader.info.format == "attnfd-cache/2" and reader.info.to_json()["checksum"] == "blake2b"
    # a resumed build of the old cache keeps its algorithm: the new shard verifies with blake2b
    root = tmp_path / "root"
    old = root / r.path.name
    shutil.copytree(d, old)
    (old / "manifest" / "part-00001.parquet").unlink()
    cfg2 = fake_cfg(root, encoding="int8")
    assert find_cache(cfg2, teacher, source) == old  # the fingerprint (and folder name) did not change
    res = build_cache(cfg2, teacher, source, progress=False)
    assert res.path == old and res.shards_written == 1
    part = read_part(res.path / "manifest" / "part-00001.parquet")
    assert len(part.column("checksum_D")[0].as_py()) == 32 and part.schema.metadata[b"checksum"] == b"blake2b"
    assert verify_cache(res.path, source=source, replay=0).ok
    assert json.loads((old / "cache.json").read_text())["format"] == "attnfd-cache/1"  # its file, not rewritten
    # and a change is still caught
    arr = zarr.open_array(str(res.path / "features.zarr" / "E.offset"), mode="r+")
    block = arr[2:4]
    block[0, 0, 1] += 1
    arr[2:4] = block
    with pytest.raises(CacheError, match="checksum mismatch"):
        CacheReader(res.path).read(2, 0, ["E"])


# ---------------------------------------------------------------------------------------------
# Stage 2: the stored arrays travel to the student's device, decoded there


def _stage2(cfg, source, reader):
    from attnfd_pipeline.data.loaders import CachedSeeds
    from attnfd_pipeline.data.stage2 import StudentDataset

    return StudentDataset(source, cfg.augment, CachedSeeds(0, cfg.cache.K), reader, reader.targets)


def test_stage2_batches_carry_stored_bytes_and_decode_on_device(int8_cache):
    from torch.utils.data import DataLoader

    from attnfd_pipeline.distill import StudentTask
    from attnfd_pipeline.engine.train import to_device

    cfg, _, source, r = int8_cache
    reader = CacheReader(r.path)
    stored = sum(t.bytes_per_sample for t in reader.info.targets.values())
    ds = _stage2(cfg, source, reader)
    sample = ds[(0, 3)]
    assert sample["targets"]["D"]["codes"].dtype == torch.uint8
    assert sum(enc.item_nbytes(v) for v in sample["targets"].values()) == stored
    keys = [(0, 0), (0, 3), (1, 4)]
    loader = DataLoader(ds, batch_size=3, sampler=keys, num_workers=1)  # through worker shared memory
    (batch,) = list(loader)
    assert sum(enc.item_nbytes(v) for v in batch["targets"].values()) == 3 * stored
    # the crop and its labels cross as uint8 (1 byte a pixel each), widened and normalised on the device
    h, w = cfg.augment.crop_size
    assert batch["image"].dtype == batch["label"].dtype == torch.uint8
    assert batch["image"].nbytes == 3 * 3 * h * w and batch["label"].nbytes == 3 * h * w
    for device in DEVICES:
        on = to_device(batch, torch.device(device))
        assert on["label"].dtype == torch.long and torch.equal(on["label"].cpu(), batch["label"].long())
        assert on["image"].dtype == torch.float32
        assert sum(enc.item_nbytes(v) for v in on["targets"].values()) == 3 * stored  # host-to-device bytes
        task = StudentTask.__new__(StudentTask)
        task.teacher = None
        got = task._targets(on)  # the distillation head decodes once per batch, on the student's device
        for n in reader.targets:
            assert got[n].dtype == torch.float32 and got[n].device.type == device
            want = np.stack([reader.read(i, batch["aug_seed"][j].item(), [n])[n] for j, (_, i) in enumerate(keys)])
            if device == "cpu":  # the CPU decode, bitwise
                assert np.array_equal(got[n].numpy(), want)
            else:  # a fused multiply-add may round once instead of twice: within float32 rounding
                np.testing.assert_allclose(got[n].cpu().numpy(), want, rtol=2 * np.finfo(np.float32).eps,
                                           atol=np.finfo(np.float32).tiny)


def test_stage2_float16_targets_are_the_stored_values(tmp_path):
    cfg, teacher, source = fake_cfg(tmp_path), FakeTeacher(), FakeSource(n=2)
    r = build_cache(cfg, teacher, source, progress=False)
    reader = CacheReader(r.path)
    sample = _stage2(cfg, source, reader)[(1, 1)]
    for n, v in sample["targets"].items():
        assert v.dtype == torch.float16 and enc.item_nbytes(v) == reader.info.targets[n].bytes_per_sample
        k = sample["aug_seed"]
        assert np.array_equal(v.numpy().view(np.uint16), reader.read(1, k, [n])[n].view(np.uint16))


# ---------------------------------------------------------------------------------------------
# the direct shard read (cache.shards) is zarr's read, and the zarr paths stay as the fallback


@pytest.mark.parametrize("codec", ["zstd", "blosc", "none"])
def test_direct_chunk_reads_equal_zarr_on_every_codec(tmp_path, codec):
    import zarr

    from attnfd_pipeline.cache.shards import ChunkFile

    cfg = fake_cfg(tmp_path, encoding="int8", codec=codec, level=0 if codec == "none" else 1, shard_size=3)
    r = build_cache(cfg, FakeTeacher(), FakeSource(), progress=False)  # 5 images: the last shard is partial
    feat = r.path / "features.zarr"
    group = zarr.open_group(str(feat), mode="r")
    for name in group.array_keys():
        f = ChunkFile.open(feat / name)
        assert f is not None and f.compressor == (None if codec == "none" else codec)
        for i in range(5):
            for k in range(2):
                got = f.read(i, k)
                assert got.flags.writeable and np.array_equal(got, group[name][i, k])
    assert ChunkFile.open(tmp_path / "nowhere") is None


def test_direct_read_detects_a_flipped_byte_and_fills_a_missing_shard(tmp_path):
    from attnfd_pipeline.cache.shards import ChunkFile
    from attnfd_pipeline.cache.writer import shard_file

    cfg = fake_cfg(tmp_path, codec="none", level=0)
    r = build_cache(cfg, FakeTeacher(), FakeSource(), progress=False)
    f = shard_file(r.path, "D", 1)
    data = bytearray(f.read_bytes())
    data[100] ^= 0x01  # inside the first chunk (image 2, seed 0), behind the zarr codecs' back
    f.write_bytes(bytes(data))
    cf = ChunkFile.open(r.path / "features.zarr" / "D")
    with pytest.raises(ValueError, match="crc32c do not match"):
        cf.read(2, 0)
    assert np.isfinite(cf.read(2, 1)).all()
    with pytest.raises(CacheError, match=r"unreadable data for image 'img_002' \(index 2\), aug seed 0, target 'D'"):
        CacheReader(r.path).read(2, 0)
    shard_file(r.path, "E", 2).unlink()
    assert np.isnan(ChunkFile.open(r.path / "features.zarr" / "E").read(4, 1)).all()  # zarr's fill value


def test_reader_falls_back_to_zarr_for_other_layouts(int8_cache, monkeypatch):
    import attnfd_pipeline.cache.reader as reader_mod

    _, _, _, r = int8_cache
    want = CacheReader(r.path).read_stored(3, 1)
    monkeypatch.setattr(reader_mod.ChunkFile, "open", classmethod(lambda cls, d: None))
    got = CacheReader(r.path).read_stored(3, 1)
    assert all(np.array_equal(a, b) for n in want for a, b in zip(want[n], got[n]))
