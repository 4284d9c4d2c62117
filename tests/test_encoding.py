"""Compact cache encodings: int8 (uint8 codes + float32 scale/offset per (sample, channel)) and pooled targets.

Reuses test_cache's fake teacher and source (5 images, 32-px crops, K=2): D is 8×8×8 post-ReLU, B 16×2×2
pre-ReLU, E 8×2×2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stages.cache as cache_cli
from fakes import FakeSource, FakeTeacher, fake_cfg
from attnfd_pipeline.cache import (CacheError, CacheInfo, CacheReader, build_cache, cache_fingerprint, cache_inputs,
                                   describe_cache, verify_cache)
from attnfd_pipeline.cache.build import run_teacher, shard_samples
from attnfd_pipeline.cache.encoding import (dequantize_int8, pool_maps, pool_student, quantize_int8,
                                            target_pools)
from attnfd_pipeline.cache.schema import ShardRange
from attnfd_pipeline.config import load_config
from attnfd_pipeline.losses import MethodContext
from attnfd_pipeline.losses.attnfd import AttnFD, attnfd_loss

F32_EPS = float(np.finfo(np.float32).eps)


F32_TINY = float(np.finfo(np.float32).smallest_subnormal)


def _bound(x, scale, offset):
    """|x − x̂| allowed: half a quantisation step (the whole range where the step underflowed to 0), plus a
    few float32 roundings (subtract, divide, multiply-add) of values of magnitude at most max |x| in the
    channel, each at least the smallest subnormal's spacing."""
    flat = x.astype(np.float64).reshape(*x.shape[:2], -1)
    mag, rng = np.abs(flat).max(-1), flat.max(-1) - flat.min(-1)
    step = np.where(scale > 0, scale.astype(np.float64) / 2, rng)
    return (step + 4 * F32_EPS * np.maximum(mag, np.abs(offset)) + 4 * F32_TINY)[..., None, None]


def test_int8_round_trip_bound_zero_and_tiny_range():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 6, 9, 7)).astype(np.float32) * np.array([1, 10, 1e-3, 1, 1, 1], np.float32)[:, None, None]
    x[:, 3] = np.maximum(x[:, 3], 0)  # post-ReLU channel with zeros
    x[:, 4] = 0.0  # all-zero channel
    x[:, 5] = 7.25  # constant, non-zero
    x[1, 2] = 0.0
    x[1, 2, 0, 0] = np.float32(1e-45)  # the smallest subnormal: range / 255 underflows float32 to 0
    x[2, 2] = 1e-38 * (1 + rng.random((9, 7)))  # a subnormal step: still finite, still within the bound
    codes, scale, offset = quantize_int8(x)
    assert codes.dtype == np.uint8 and scale.dtype == np.float32 and offset.dtype == np.float32
    assert codes.shape == x.shape and scale.shape == offset.shape == (3, 6)
    y = dequantize_int8(codes, scale, offset)
    assert y.dtype == np.float32 and np.isfinite(y).all()
    err = np.abs(y.astype(np.float64) - x)
    assert (err <= _bound(x, scale, offset)).all()
    assert np.array_equal(y[:, 4], x[:, 4]) and np.array_equal(y[:, 5], x[:, 5])  # zero range: exact
    assert (scale[:, 4:6] == 0).all()
    assert np.array_equal(y[:, 3] == 0, x[:, 3] == 0)  # post-ReLU zeros stay exactly zero
    assert scale[1, 2] == 0 and err[1, 2].max() <= F32_TINY  # step underflows: decodes to its min, within its range
    # the full code range is used: each channel's min → 0, max → 255
    used = codes[:, [0, 1, 3]].reshape(3, 3, -1)
    assert (used.min(-1) == 0).all() and (used.max(-1) == 255).all()


def test_pool_maps_and_student_pooling_agree():
    x = torch.randn(2, 3, 9, 9)
    pooled = pool_maps(x.numpy(), 2)
    assert pooled.shape == (2, 3, 5, 5)
    assert np.allclose(pooled[..., 0, 0], x[..., :2, :2].mean((-1, -2)).numpy(), atol=1e-6)
    assert np.allclose(pooled[..., 4, 4], x[..., 8, 8].numpy(), atol=1e-6)  # the last partial window: its own pixels
    assert np.array_equal(pool_student(x, (9, 9), 2).numpy(), pooled)  # same pooling on both sides
    assert pool_student(torch.randn(2, 3, 4, 4), (9, 9), 2).shape == (2, 3, 5, 5)  # resized to full first


def test_attnfd_pools_student_map_for_pooled_target():
    ctx = MethodContext(points=("D",), student_channels={"D": 4}, target_shapes={"D": (6, 5, 5)},
                        target_pool={"D": (2, 9, 9)})
    m = AttnFD(ctx)
    feats = {"D": torch.randn(2, 4, 3, 3, requires_grad=True)}
    target = torch.randn(2, 6, 5, 5)
    loss, _ = m(feats, {"D": target})
    want = attnfd_loss(pool_student(m.refine(feats)["D"], (9, 9), 2), target, "batch")
    assert torch.allclose(loss, want)
    loss.backward()
    assert feats["D"].grad is not None and feats["D"].grad.abs().sum() > 0


def test_config_pool_table_and_fingerprint(tmp_path):
    cfg = load_config("configs/demo.toml", ["cache.pool={D=2}", 'cache.encoding="int8"'])
    assert cfg.cache.pool == (("D", 2),) and cfg.cache.encoding == "int8"
    t, s = FakeTeacher(), FakeSource()
    base = fake_cfg(tmp_path)
    fp = cache_fingerprint(base, t, s)
    # defaults add nothing to the fingerprint's inputs: caches built before these settings existed are reused
    assert "encoding" not in cache_inputs(base, t, s) and "pool" not in cache_inputs(base, t, s)
    assert fp == cache_fingerprint(fake_cfg(tmp_path, encoding="float16", pool=(("D", 1),)), t, s)
    fps = {cache_fingerprint(fake_cfg(tmp_path, **kw), t, s) for kw in
           ({"encoding": "int8"}, {"pool": (("D", 2),)}, {"pool": (("D", 4),)}, {"encoding": "int8", "pool": (("D", 2),)},
            {"pool": (("B", 2),)})}
    assert len(fps | {fp}) == 6


@pytest.fixture(scope="module")
def int8_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    cfg, teacher, source = fake_cfg(root, encoding="int8", pool=(("D", 2),)), FakeTeacher(), FakeSource()
    return cfg, teacher, source, build_cache(cfg, teacher, source, progress=False)


def test_int8_pooled_cache_round_trip(int8_built):
    cfg, teacher, source, r = int8_built
    reader = CacheReader(r.path)
    assert reader.encoding == "int8" and reader.complete
    assert reader.info.targets["D"].chw == (8, 4, 4) and reader.info.targets["D"].full_chw == (8, 8, 8)
    assert target_pools(reader.info) == reader.info.pools == {"D": (2, 8, 8)}
    raw = json.loads((r.path / "cache.json").read_text())
    assert raw["targets"]["D"]["pool"] == 2 and raw["targets"]["D"]["full_chw"] == [8, 8, 8]
    assert CacheInfo.from_json(raw).to_json() == raw  # the typed view writes back the same keys and values
    checked = 0
    for s in range(3):
        rows, crops, _ = shard_samples(cfg, source, ShardRange(s, 2 * s, min(2 * s + 2, 5)), source.ids)
        outs, _ = run_teacher(teacher, crops, ["B", "E", "D"], 3, torch.device("cpu"))
        for n in ("B", "E", "D"):
            x = pool_maps(outs[n], 2) if n == "D" else outs[n]
            codes, scale, offset = quantize_int8(x)
            for j, row in enumerate(rows):
                stored = reader.read_stored(row["image_index"], row["aug_seed"], [n])[n]
                assert np.array_equal(stored[0], codes[j])  # exact codes
                assert np.array_equal(stored[1], scale[j]) and np.array_equal(stored[2], offset[j])
                y = reader.read(row["image_index"], row["aug_seed"], [n])[n]
                assert y.dtype == np.float32
                assert (np.abs(y - x[j]) <= _bound(x[j:j + 1], scale[j:j + 1], offset[j:j + 1])[0]).all()
                checked += 1
    assert checked == 5 * 2 * 3
    report = verify_cache(r.path, source=source, replay=2)
    assert report.ok and report.complete, report.lines()
    d = describe_cache(r.path)
    assert d["encoding"] == "int8" and d["pool"] == {"D": 2} and d["dtype"] == "uint8"
    meta = json.loads((r.path / "features.zarr" / "D.scale" / "zarr.json").read_text())
    assert meta["data_type"] == "float32" and meta["attributes"]["role"] == "scale"
    assert [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]][-1] == "crc32c"  # spec codecs only


def test_int8_checksum_covers_scale(tmp_path, int8_built):
    import shutil

    import zarr

    _, _, _, r = int8_built
    d = tmp_path / "copy"
    shutil.copytree(r.path, d)
    arr = zarr.open_array(str(d / "features.zarr" / "E.scale"), mode="r+")
    block = arr[0:2]
    block[1, 0, 3] *= 1.5  # the codes are intact: only the scale changed
    arr[0:2] = block
    with pytest.raises(CacheError, match=r"checksum mismatch.*index 1\), aug seed 0, target 'E'"):
        CacheReader(d).read(1, 0, ["E"])
    bad = verify_cache(d, replay=0).bad
    assert [(b.image_index, b.aug_seed, b.target) for b in bad] == [(1, 0, "E")]


def test_a_current_cache_json_without_its_encoding_is_refused_naming_the_key(tmp_path):
    """Only attnfd-cache/1 files predate ``encoding`` (their migration reads them as float16:
    tests/test_formats.py); a current-format file without it is damaged, and says which key is missing."""
    cfg, teacher, source = fake_cfg(tmp_path), FakeTeacher(), FakeSource(n=2)
    r = build_cache(cfg, teacher, source, progress=False)
    info = json.loads((r.path / "cache.json").read_text())
    assert info["format"] == "attnfd-cache/2" and info["encoding"] == "float16"
    info.pop("encoding")
    (r.path / "cache.json").write_text(json.dumps(info))
    with pytest.raises(CacheError, match=r"cache.json: key 'encoding' is missing; .* is not a usable cache"):
        CacheReader(r.path)


def test_tensorstore_reads_int8_arrays(int8_built):
    pytest.importorskip("tensorstore")
    _, _, _, r = int8_built
    reader = CacheReader(r.path)
    want = reader.read_stored(3, 1, ["D"])["D"]
    # tensorstore must not run in a forked process that imported zarr's event loop: a fresh interpreter
    script = textwrap.dedent(f"""
        import json, sys, numpy as np, tensorstore as ts
        out = []
        for name in ("D", "D.scale", "D.offset"):
            a = ts.open({{"driver": "zarr3", "kvstore": {{"driver": "file", "path": {str(r.path / "features.zarr")!r} + "/" + name}}}}).result()
            out.append(np.asarray(a[3, 1].read().result()).tolist())
        json.dump(out, sys.stdout)
    """)
    got = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    for g, w in zip(got, want):
        assert np.array_equal(np.asarray(g, dtype=w.dtype), w)


def test_cache_plan_without_bundle_or_dataset():
    res = CliRunner().invoke(cache_cli.app, ["plan", "--config", "configs/voc_aug.toml", "--images", "10582", "--json",
                                             "--teacher-images-per-s", "20"])
    assert res.exit_code == 0, res.output
    t = json.loads(res.output)
    enc = t["encodings"]
    assert {"float16", "int8"} <= set(enc) and t["recommended"] in enc
    f16 = enc["float16"]["targets"]
    # B 2048×33×33, E 256×33×33, D 256×129×129 at 513 px, output stride 16 (the paper's numbers)
    assert f16["B"]["chw"] == [2048, 33, 33] and f16["E"]["chw"] == [256, 33, 33] and f16["D"]["chw"] == [256, 129, 129]
    assert enc["float16"]["raw_bytes_per_sample"] == 2 * (2048 * 33 * 33 + 256 * 33 * 33 + 256 * 129 * 129)
    assert enc["int8+poolD2"]["targets"]["D"]["chw"] == [256, 65, 65]
    assert enc["int8"]["total_bytes"] == pytest.approx(enc["int8"]["bytes_per_sample"] * 10582 * 4)
    assert t["build_seconds"] == pytest.approx(10582 * 4 / 20)
    res = CliRunner().invoke(cache_cli.app, ["plan", "--config", "configs/voc_aug.toml", "--json"])
    assert res.exit_code != 0 and "--images" in res.output  # the dataset is absent: says how to plan anyway


def test_storage_figures_on_fake_teacher(tmp_path):
    from attnfd_pipeline.experiments.fidelity import grad_fidelity, storage_figures, storage_markdown

    x = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)
    same = grad_fidelity(x, x.copy(), 1, "batch")
    assert same["grad_cosine"] == pytest.approx(1.0, abs=1e-12) and same["grad_rel_error"] == 0.0
    cfg = fake_cfg(tmp_path)
    fig = storage_figures(cfg, FakeTeacher(), FakeSource(n=2), crops=(32,), images=2)
    v = fig["variants"]
    assert set(v) == {"float16", "int8", "float16+poolD2", "int8+poolD2"}
    assert v["float16"]["compression_vs_float16"] == pytest.approx(1.0)
    assert v["float16"]["rel_error"] < 1e-3 and v["int8"]["rel_error"] < 2e-2  # float16 ≈ 2^-11, int8 ≈ 1/255
    assert v["float16"]["grad_cosine"] > 0.9999 and v["int8"]["grad_cosine"] > 0.99
    r = v["int8"]["crops"]["32"]
    assert r["encode_mb_s"] > 0 and r["decode_mb_s"] > 0
    assert fig["recommended"]["encoding"] in v and "| `int8` | 32 |" in storage_markdown(fig)


@pytest.mark.slow
def test_student_trains_on_int8_pooled_cache(tiny_pipeline, tmp_path, monkeypatch):
    import shutil

    import attnfd_pipeline.losses.attnfd as attnfd_mod
    from attnfd_pipeline.config import dump_toml
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.runs import run_student, student_dir
    from attnfd_pipeline.teacher import load_teacher

    cfg, bundle = tiny_pipeline
    p = tmp_path / "cfg.toml"
    p.write_text(dump_toml(cfg))
    # its own cache root: the shared pipeline's root must keep exactly one cache for the tests that look it up
    new = load_config(p, [f'runs_root="{tmp_path / "runs"}"', f'cache.root="{tmp_path / "cache"}"',
                          'cache.encoding="int8"', "cache.pool={D=2}"])
    shutil.copytree(cfg.teacher_dir, new.teacher_dir)
    build_cache(new, load_teacher(bundle), ImageSource.from_config(new), progress=False)
    calls = []

    def spy(x, full_hw, factor):
        calls.append((tuple(full_hw), factor))
        return pool_student(x, full_hw, factor)

    monkeypatch.setattr(attnfd_mod, "pool_student", spy)
    result = run_student(new, progress=False)
    assert 0 <= result["best_miou"] <= 1
    assert student_dir(new).name.endswith("_int8_poolD2_s0")  # never mistaken for the float16 run
    assert calls and set(calls) == {((12, 12), 2)}  # D at stride 4 of the 48-px crop, pooled to 6×6 in the loss


def test_feed_projection_arithmetic():
    """cores = rate × MB per sample / (MB/s per core), at the largest crop measured; the assumptions are named."""
    from attnfd_pipeline.experiments.fidelity import RTX_CLASS, FeedAssumption, feed_projection, projection_markdown

    fig = {"crops": [64, 257], "variants": {
        "float16": {"crops": {"64": {"encode_mb_s": 1.0, "decode_mb_s": 1.0},
                              "257": {"encode_mb_s": 500.0, "decode_mb_s": 250.0}}},
        "int8": {"crops": {"64": {"encode_mb_s": 1.0, "decode_mb_s": 1.0},
                           "257": {"encode_mb_s": 200.0, "decode_mb_s": 1000.0}}}}}
    proj = feed_projection(fig, 25e6, FeedAssumption("card", 100.0, 40.0, 513, "test"))
    assert proj["float16"]["build_cores"] == pytest.approx(100 * 25 / 500)  # 5 cores
    assert proj["float16"]["loader_cores"] == pytest.approx(40 * 25 / 250)  # 4 cores
    assert proj["int8"]["build_cores"] == pytest.approx(12.5) and proj["int8"]["loader_cores"] == pytest.approx(1.0)
    assert proj["int8"]["measured_crop"] == 257
    md = projection_markdown(proj, 25e6, RTX_CLASS)
    assert "Assumed, not measured" in md and "R = 250 images/s" in md and "| `int8` | 200 | 1000 | 12.5 | 1.0 |" in md


def test_paper_sample_bytes_is_the_r101_at_513():
    from attnfd_pipeline.experiments.fidelity import paper_sample_bytes

    cfg = load_config("configs/demo.toml")  # a ResNet-34 teacher at 64 px: the projection uses the paper's
    # B 2048×33×33 + E 256×33×33 + D 256×129×129 float32
    assert paper_sample_bytes(cfg) == 4 * (2048 * 33 * 33 + 256 * 33 * 33 + 256 * 129 * 129)
