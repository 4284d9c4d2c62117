"""`attnfd bench-feed`: the host CPU cost of feeding a GPU at the paper's shapes, per sample, measured
through the library's own cache code. What each figure times, how (process CPU time of one torch thread, the
fastest of ``PASSES`` passes) and why the target path is four functions over the public cache API: docs/bench.md
"bench-feed"."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import tempfile
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnfd_pipeline.experiments.bench.common import fmt, log, num, sync, table
from attnfd_pipeline.experiments.fidelity import RTX_CLASS

PASSES = 3
ENCODINGS = ("int8", "float16")
# the feed goals at the paper's shapes (int8, B + E + D, 513 px), per sample of host CPU
GOALS_MS = {"target_read_ms": 5.0, "image_side_ms": 10.0, "targets_plus_image_ms": 15.0, "build_host_ms": 4.0}
# the throughputs the core counts assume: an RTX 4090 at ~30 % of its fp16 peak
R_TEACHER, S_STUDENT = RTX_CLASS.teacher_images_per_s, RTX_CLASS.student_samples_per_s
BLOSC_LEVEL = 5  # blosc's own default clevel, for blosc-lz4 in the codec table and the store
IMAGE_PARTS = ("decode_ms", "draw_apply_ms", "hash_ms", "normalise_ms")  # the image side, in order


@dataclass(frozen=True)
class FeedWorkload:
    """Sizes of one bench-feed run. Defaults: the paper's R101 teacher at 513 px, B + E + D."""

    teacher: str = "deeplabv3plus_resnet101"
    crop: int = 513
    points: tuple[str, ...] = ("B", "E", "D")
    samples: int = 2  # teacher crops: one shard of the bench's cache
    image_hw: tuple[int, int] = (375, 500)  # a VOC-sized image (height, width)
    image_seeds: int = 12  # augmentation draws averaged in the image-side figure
    demo_images: int = 2  # demo-teacher maps for the codec table
    calib_batches: int = 1


DEFAULT = FeedWorkload()
QUICK = FeedWorkload(teacher="deeplabv3plus_resnet18", crop=48, samples=2, image_hw=(36, 48), image_seeds=2,
                     demo_images=1)


def cpu_ms(fn: Callable[[], Any]) -> float:
    """Process CPU milliseconds of ``fn()``, the fastest of ``PASSES`` runs (garbage collection left on)."""
    return min(timeit.Timer(fn, gc.enable, time.process_time).repeat(PASSES, 1)) * 1e3


# ---------------------------------------------------------------------------------------------
# the target path, over the public cache API (re-pointed in one place when the cache code changes)


def encode_stored(maps: dict[str, torch.Tensor], info) -> dict[str, list[np.ndarray]]:
    """float32 teacher maps ``(n, C, H, W)`` (on any device) → the stored arrays of each target, encoded on
    the maps' device as the build does (``encoding.encode``), then copied to the host."""
    from attnfd_pipeline.cache.encoding import encode

    out = {}
    for name, x in maps.items():
        n = x.shape[0]
        parts = encode(x.detach(), info.encoding, mantissa_bits=info.mantissa_bits, pool=info.targets[name].pool,
                       target=name, ids=[str(i) for i in range(n)], seeds=[0] * n)
        out[name] = [p.cpu().numpy() for p in parts]
    return out


def decode_stored(stored: dict[str, list[np.ndarray]], encoding: str, device: torch.device) -> dict:
    """Stored arrays → float32 tensors on ``device`` (what the distillation head compares against), decoded
    there (``encoding.decode``)."""
    from attnfd_pipeline.cache.encoding import decode

    return {name: decode(encoding, [torch.from_numpy(np.ascontiguousarray(p)).to(device) for p in parts])
            for name, parts in stored.items()}


def commit_encoded(writer, stored: dict[str, list[np.ndarray]], rows: list[dict]) -> None:
    """The build's host work for shard 0 once its stored arrays exist: the build's own ``ShardWriter.commit``
    (per-sample checksums into copies of ``rows``, one slice write per array, the shard files made durable,
    then the manifest part)."""
    from attnfd_pipeline.cache.encoding import stored_arrays
    from attnfd_pipeline.cache.writer import ShardBuffer

    K = writer.info.K
    arrays = {a: p.reshape(len(rows) // K, K, *p.shape[1:]) for name, parts in stored.items()
              for (a, _), p in zip(stored_arrays(name, writer.info.encoding), parts)}
    writer.commit(ShardBuffer(0, 0, len(rows) // K, arrays, [dict(r) for r in rows]))


def read_batch(ds, keys: Sequence[tuple[int, int]], *, pin: bool) -> dict[str, Any]:
    """Stage 2's target read of a batch: each sample's targets as the training dataset reads them
    (``StudentDataset.stored_targets``), collated as the loader hands them on; pinned when bound for a GPU."""
    from torch.utils.data import default_collate

    batch = default_collate([ds.stored_targets(i, k) for i, k in keys])
    return _pin(batch) if pin else batch


def _pin(x):
    if isinstance(x, dict):
        return {k: _pin(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_pin(v) for v in x]
    return x.pin_memory() if isinstance(x, torch.Tensor) else x


def tensor_bytes(x) -> int:
    """Bytes of the tensors and arrays in ``x`` (nested dicts, lists, tuples)."""
    if isinstance(x, (dict, list, tuple)):
        return sum(map(tensor_bytes, x.values() if isinstance(x, dict) else x))
    return int(x.nbytes) if isinstance(x, (torch.Tensor, np.ndarray)) else 0


# ---------------------------------------------------------------------------------------------
# the teacher side: the R101 workload teacher's maps and one shard of a real cache per encoding


@dataclass
class TeacherSide:
    cfg: Any
    source: Any
    teacher: Any
    rows: list[dict]  # manifest rows of the shard (no checksums)
    maps: dict[str, torch.Tensor]  # float32 (n, C, H, W) on the device


def teacher_side(w: FeedWorkload, work: Path, recipe, device: torch.device) -> TeacherSide:
    """The bench's workload teacher (random weights, calibrated BatchNorm) on ``w.samples`` replayed crops of
    a generated dataset, at the recipe's augmentation with the crop set to ``w.crop``."""
    from attnfd_pipeline.cache.build import shard_samples
    from attnfd_pipeline.cache.schema import ShardRange, cache_target_names
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.experiments.bench.workload import Workload, make_dataset, make_teacher_bundle, workload_config
    from attnfd_pipeline.teacher import load_teacher

    bw = Workload(teacher=w.teacher, crop=w.crop, batch_size=w.samples, points=w.points, workers=0,
                  n_train=w.samples, K=1, shard_size=w.samples, calib_batches=w.calib_batches)
    cfg = workload_config(bw, work, make_dataset(bw, work / "data"), recipe)
    source = ImageSource.from_config(cfg, cfg.data.train_split)
    bundle = make_teacher_bundle(cfg, bw, source)
    teacher = load_teacher(bundle, device)
    rows, crops, _ = shard_samples(cfg, source, ShardRange(0, 0, len(source)), source.ids)
    with torch.no_grad():
        maps = teacher.targets(torch.stack(crops).to(device), cache_target_names(cfg.cache))
    return TeacherSide(cfg, source, teacher, rows, maps)


@contextlib.contextmanager
def open_shard_store(side: TeacherSide, encoding: str, root: Path, codec: tuple[str, int] | None = None):
    """(config, cache dir, CacheInfo, the build's ``ShardWriter``, closed on exit) of a one-shard cache of
    ``encoding`` laid out as the build lays it out (chunk = one sample, shard = S × K samples, the recipe's
    codec — or ``codec`` = (name, level) — then crc32c)."""
    from attnfd_pipeline.cache.build import cache_info
    from attnfd_pipeline.cache.fingerprint import cache_dir_for
    from attnfd_pipeline.cache.writer import ShardWriter, create_store

    name, level = codec or (side.cfg.cache.codec, side.cfg.cache.level)
    cfg = dataclasses.replace(side.cfg, cache=dataclasses.replace(side.cfg.cache, encoding=encoding, codec=name,
                                                                  level=level, root=str(root / f"{encoding}-{name}")))
    specs = {n: tuple(x.shape[1:]) for n, x in side.maps.items()}
    info = cache_info(cfg, side.teacher, side.source, specs)
    cache_dir = cache_dir_for(cfg, info.fingerprint)
    create_store(cache_dir, info)
    writer = ShardWriter(cache_dir, info)
    try:
        yield cfg, cache_dir, info, writer
    finally:
        writer.close()


def shard_files(cache_dir: Path, info) -> list[Path]:
    from attnfd_pipeline.cache.encoding import stored_arrays
    from attnfd_pipeline.cache.writer import shard_file

    return [Path(shard_file(cache_dir, a, 0, 5 if a == n else 3))
            for n in info.target_names for a, _ in stored_arrays(n, info.encoding)]


def zarr_read_ms(cache_dir: Path, info, n: int) -> float:
    """The Zarr read of one sample's stored arrays (decompression + crc32c + Zarr's own work, no manifest
    checksum), per sample over the shard's ``n``."""
    from attnfd_pipeline.cache import CacheReader

    raw, names = CacheReader(cache_dir, verify=False), list(info.target_names)
    return cpu_ms(lambda: [raw.read_stored(i, 0, names) for i in range(n)]) / n


def disk_bytes(cache_dir: Path, info, n: int) -> float:
    return sum(f.stat().st_size for f in shard_files(cache_dir, info)) / n


def build_figures(side: TeacherSide, info, writer, device) -> tuple[dict, dict]:
    """(figures, stored arrays): device encode, host build work and its checksum part, device decode."""
    from attnfd_pipeline.cache.encoding import checksum

    n = len(side.rows)
    stored = encode_stored(side.maps, info)
    fig = {"device_encode_ms": cpu_ms(lambda: (encode_stored(side.maps, info), sync(device))) / n,
           "device_decode_ms": cpu_ms(lambda: (decode_stored(stored, info.encoding, device), sync(device))) / n,
           "build_host_ms": cpu_ms(lambda: commit_encoded(writer, stored, side.rows)) / n,
           "build_checksum_ms": cpu_ms(lambda: [checksum([p[j] for p in parts], info.checksum)
                                                for parts in stored.values() for j in range(n)]) / n}
    fig["build_compress_write_ms"] = max(0.0, fig["build_host_ms"] - fig["build_checksum_ms"])
    return fig, stored


def read_figures(side: TeacherSide, cfg, cache_dir, info, pin: bool) -> dict:
    """Stage 2's target read through ``CacheReader`` and its parts: Zarr read (chunk decompression and
    crc32c), the manifest checksum, the host decode; and the bytes a loader sample carries."""
    from attnfd_pipeline.cache import CacheReader
    from attnfd_pipeline.cache.encoding import checksum
    from attnfd_pipeline.runs import student_dataset

    names = list(info.target_names)
    keys = [(i, 0) for i in range(len(side.rows))]
    n = len(keys)
    raw = CacheReader(cache_dir, verify=False)
    ds = student_dataset(cfg, side.source, CacheReader(cache_dir), names)
    parts = [raw.read_stored(i, k, names) for i, k in keys]
    fig = {"target_read_ms": cpu_ms(lambda: read_batch(ds, keys, pin=pin)) / n,
           "read_zarr_ms": zarr_read_ms(cache_dir, info, n),
           "read_checksum_ms": cpu_ms(lambda: [checksum(ps, info.checksum) for p in parts for ps in p.values()]) / n}
    fig["read_collate_pin_ms"] = max(0.0, fig["target_read_ms"] - fig["read_zarr_ms"] - fig["read_checksum_ms"])
    item = ds[keys[0]]
    fig["shm_bytes_per_sample"] = tensor_bytes(item["targets"])  # what a worker hands over for the targets
    fig["h2d_bytes_per_sample"] = fig["shm_bytes_per_sample"]  # the pinned batch is copied as collated
    fig["image_shm_bytes_per_sample"] = tensor_bytes(item["image"])
    return fig


def floor_figures(stored_bytes: int, files: Sequence[Path], n: int) -> dict:
    """The physical floor: a memcpy of one sample's stored bytes, a page-cache read of the shard files."""
    src = np.ones(max(1, stored_bytes), np.uint8)
    dst = np.empty_like(src)
    for f in files:  # warm the page cache
        f.read_bytes()
    return {"floor_memcpy_ms": cpu_ms(lambda: np.copyto(dst, src)),
            "floor_page_cache_ms": cpu_ms(lambda: [f.read_bytes() for f in files]) / n}


# the store's codecs (``cache.codec``, ``cache.level``) the read path is measured with, by their report label
STORE_CODECS = {"zstd-1": ("zstd", 1), f"blosc-{BLOSC_LEVEL}": ("blosc", BLOSC_LEVEL), "none": ("none", 0)}


def encoding_figures(side: TeacherSide, encoding: str, root: Path, device: torch.device) -> tuple[dict, dict]:
    """Every target-path figure of one encoding (and its stored arrays, for the codec table); ``store_codecs``:
    the Zarr read and the bytes on disk of the same arrays with each store codec."""
    with open_shard_store(side, encoding, root) as (cfg, cache_dir, info, writer):
        fig, stored = build_figures(side, info, writer, device)
    n = len(side.rows)
    fig.update(read_figures(side, cfg, cache_dir, info, pin=device.type == "cuda" and torch.cuda.is_available()))
    stored_bytes, expected = tensor_bytes(stored) // n, sum(t.bytes_per_sample for t in info.targets.values())
    if stored_bytes != expected:
        raise AssertionError(f"{encoding}: stored arrays hold {stored_bytes} B per sample, cache.json says {expected}")
    fig.update(stored_bytes_per_sample=stored_bytes, disk_bytes_per_sample=disk_bytes(cache_dir, info, n),
               float32_bytes_per_sample=sum(x[0].numel() * 4 for x in side.maps.values()),
               **floor_figures(stored_bytes, shard_files(cache_dir, info), n))
    fig["store_codecs"] = {}
    for label, codec in STORE_CODECS.items():
        with open_shard_store(side, encoding, root, codec) as (_, d, i, wr):
            commit_encoded(wr, stored, side.rows)
        fig["store_codecs"][label] = {"read_zarr_ms": zarr_read_ms(d, i, n),
                                      "disk_bytes_per_sample": disk_bytes(d, i, n)}
    return fig, stored


# ---------------------------------------------------------------------------------------------
# the image side: one VOC-sized JPEG + PNG label through decode, replay, hash check (and normalisation)

def write_voc_pair(folder: Path, hw: tuple[int, int]) -> tuple[Path, Path]:
    """A ``hw`` JPEG (quality 90) of a natural photograph (matplotlib's sample, when installed; smooth
    noise otherwise) and a palette PNG label with a few regions, as VOC stores them."""
    from torchvision.transforms.v2 import functional as TF

    from attnfd_pipeline.data.datasets import voc_colormap
    from attnfd_pipeline.data.io import read_image, write_jpeg, write_palette_png

    try:
        from matplotlib import cbook

        img = read_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    except Exception:  # noqa: BLE001 - no matplotlib: a synthetic image of similar entropy
        g = torch.Generator().manual_seed(0)
        img = (TF.gaussian_blur(torch.rand(3, *hw, generator=g), [7, 7], [2.0, 2.0]) * 255).to(torch.uint8)
    img = TF.resize(img, list(hw), antialias=True)
    label = torch.zeros(hw, dtype=torch.uint8)
    h, w = hw
    label[h // 4:3 * h // 4, w // 5:w // 2] = 15
    label[h // 2:, w // 2:] = 8
    label[h // 4 - 1:h // 4 + 1] = 255
    folder.mkdir(parents=True, exist_ok=True)
    jpg, png = folder / "image.jpg", folder / "label.png"
    write_jpeg(jpg, img, quality=90)
    write_palette_png(png, label, voc_colormap())
    return jpg, png


def image_sample(jpg: Path, png: Path, aug_cfg, seed: int, impl: int, host_normalise: bool) -> list[float]:
    """One Stage 2 image-side sample: decode, draw + apply (implementation ``impl``), both replay hashes,
    and the float32 normalisation when the loader does it on the host; the CPU ms of each of ``IMAGE_PARTS``."""
    from attnfd_pipeline import augment
    from attnfd_pipeline.data.io import read_image, read_label

    t = [time.process_time()]
    image, label = read_image(jpg), read_label(png, "voc")
    t.append(time.process_time())
    params = augment.draw(aug_cfg, 0, seed, tuple(image.shape[-2:]))
    img, lab = augment.apply(params, image, label, impl=impl)
    t.append(time.process_time())
    augment.content_hash(img), augment.content_hash(lab)
    t.append(time.process_time())
    if host_normalise:
        augment.normalize(img)
    t.append(time.process_time())
    return [(b - a) * 1e3 for a, b in zip(t, t[1:])]


def image_figures(w: FeedWorkload, aug_cfg, folder: Path) -> dict:
    """Per augmentation implementation: the image side per sample (mean over ``w.image_seeds`` draws, the
    fastest of ``PASSES``) and its parts. The current implementation ships uint8 crops (normalised on the
    device); the earlier one normalised to float32 in the loader."""
    from attnfd_pipeline import augment

    jpg, png = write_voc_pair(folder, w.image_hw)
    seeds, (ch, cw) = range(w.image_seeds), aug_cfg.crop_size
    out = {}
    for impl in augment.AUGMENT_IMPLS:
        host_norm = impl < augment.AUGMENT_IMPL  # the loader before the current implementation normalised
        total = cpu_ms(lambda: [image_sample(jpg, png, aug_cfg, s, impl, host_norm) for s in seeds]) / len(seeds)
        parts = np.mean([image_sample(jpg, png, aug_cfg, s, impl, host_norm) for s in seeds], axis=0)
        out[f"impl{impl}"] = {"image_side_ms": total, **dict(zip(IMAGE_PARTS, map(float, parts))),
                              "host_normalise": host_norm,
                              "image_shm_bytes_per_sample": 3 * ch * cw * (4 if host_norm else 1)}
    return out


# ---------------------------------------------------------------------------------------------
# codecs: ratio and per-core speed of the lossless step, per stored chunk (one sample of one array)

CODECS = {  # name → its numcodecs codec (None: a plain copy)
    "zstd-1": lambda nc: nc.Zstd(level=1),
    "blosc-lz4-shuffle": lambda nc: nc.Blosc(cname="lz4", clevel=BLOSC_LEVEL, shuffle=nc.Blosc.SHUFFLE),
    "blosc-lz4-noshuffle": lambda nc: nc.Blosc(cname="lz4", clevel=BLOSC_LEVEL, shuffle=nc.Blosc.NOSHUFFLE),
    "none": lambda nc: None,
}


def codec_figures(stored: dict[str, list[np.ndarray]]) -> dict:
    """``{codec: {"ratio", "encode_MBps", "decode_MBps"}}`` over every stored chunk (one sample of one
    array, as the cache chunks them); MB of stored bytes per CPU-second of one thread. ``none`` is a copy."""
    import numcodecs

    numcodecs.blosc.use_threads = False  # per-core figures
    chunks = [np.ascontiguousarray(p[j]) for parts in stored.values() for p in parts for j in range(len(p))]
    raw = sum(c.nbytes for c in chunks)
    out = {}
    for name, make in CODECS.items():
        codec = make(numcodecs)
        enc = (lambda c: c.tobytes()) if codec is None else codec.encode
        dec = (lambda f: bytearray(f)) if codec is None else codec.decode
        frames = [enc(c) for c in chunks]
        enc_ms = cpu_ms(lambda: [enc(c) for c in chunks])
        dec_ms = cpu_ms(lambda: [dec(f) for f in frames])
        out[name] = {"ratio": raw / max(1, sum(len(f) for f in frames)),
                     "encode_MBps": raw / 1e6 / max(enc_ms / 1e3, 1e-9),
                     "decode_MBps": raw / 1e6 / max(dec_ms / 1e3, 1e-9)}
    return out


def crc32c_MBps(stored: dict[str, list[np.ndarray]]) -> float:
    """crc32c (the store's integrity codec, in every variant) over the stored bytes, MB per CPU-second."""
    import google_crc32c

    data = [np.ascontiguousarray(p).tobytes() for parts in stored.values() for p in parts]
    ms = cpu_ms(lambda: [google_crc32c.value(d) for d in data])
    return sum(len(d) for d in data) / 1e6 / max(ms / 1e3, 1e-9)


def stored_of(maps: dict[str, np.ndarray], encoding: str) -> dict[str, list[np.ndarray]]:
    from attnfd_pipeline.cache.encoding import encode_target

    return {n: encode_target(x, encoding, 0, 1, target=n, ids=[str(i) for i in range(len(x))], seeds=[0] * len(x))
            for n, x in maps.items()}


def demo_teacher_maps(w: FeedWorkload, demo_config: Path) -> tuple[dict | None, str]:
    """The trained demo teacher's maps on its first training images resized to ``w.crop`` (None, and why,
    when its bundle or dataset is not there)."""
    from attnfd_pipeline.config import load_config
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.experiments.fidelity import teacher_maps
    from attnfd_pipeline.teacher import bundle_path, load_teacher

    if not demo_config.is_file():
        return None, f"no demo config at {demo_config}"
    cfg = load_config(demo_config, [f"cache.points={json.dumps(list(w.points))}", "cache.extra=[]"])
    bundle = bundle_path(cfg)
    if not bundle.is_file():
        return None, f"no demo teacher bundle at {bundle} (run `make teacher`)"
    try:
        source = ImageSource.from_config(cfg, cfg.data.train_split)
    except Exception as e:  # noqa: BLE001 - the dataset is optional here: say why the rows are missing
        return None, f"demo dataset not readable ({e})"
    return teacher_maps(cfg, load_teacher(bundle), source, w.crop, w.demo_images), str(bundle)


def codec_table(side_stored: dict[str, dict], w: FeedWorkload, demo_config: Path) -> dict:
    """Codec figures per teacher and encoding, plus crc32c."""
    out: dict[str, Any] = {"workload_teacher": {e: codec_figures(s) for e, s in side_stored.items()},
                           "crc32c_MBps": num(crc32c_MBps(side_stored["int8"])), "blosc_level": BLOSC_LEVEL}
    maps, where = demo_teacher_maps(w, demo_config)
    out["demo_teacher_source"] = where
    if maps is not None:
        out["demo_teacher"] = {e: codec_figures(stored_of(maps, e)) for e in side_stored}
    return out


# ---------------------------------------------------------------------------------------------
# judging, the run, the report


def add_totals(fig: dict, image: dict) -> dict:
    """The image side (current implementation) beside the targets, the totals and the cores they need."""
    fig.update({"image_" + k: image[k] for k in IMAGE_PARTS}, image_side_ms=image["image_side_ms"],
               image_shm_bytes_per_sample=image["image_shm_bytes_per_sample"])
    fig["targets_plus_image_ms"] = fig["target_read_ms"] + fig["image_side_ms"]
    fig["cores_build_at_R"] = R_TEACHER * fig["build_host_ms"] / 1e3
    fig["cores_build_at_R_with_host_encode"] = R_TEACHER * (fig["build_host_ms"] + fig["device_encode_ms"]) / 1e3
    fig["cores_feed_at_S"] = S_STUDENT * fig["targets_plus_image_ms"] / 1e3
    fig["cores_targets_at_S"] = S_STUDENT * fig["target_read_ms"] / 1e3
    return fig


STORE_CODEC = {"zstd": "zstd-1", "blosc": "blosc-lz4-shuffle", "none": "none"}  # cache.codec → its CODECS row


def zarr_own_ms(fig: dict, codecs: dict, crc_MBps: float | None, codec: str) -> float | None:
    """What the read costs beyond decompressing the stored bytes at the store codec's own speed (``codec``:
    ``cache.codec``) and their crc32c: the per-array work (shard index, chunk lookup, buffers)."""
    row = codecs.get(STORE_CODEC.get(codec, ""))
    if row is None or not crc_MBps:
        return None
    decode = fig["stored_bytes_per_sample"] / 1e6 / row["decode_MBps"] * 1e3
    crc = fig["disk_bytes_per_sample"] / 1e6 / crc_MBps * 1e3
    return fig["read_zarr_ms"] - decode - crc


def goals(fig: dict) -> list[dict]:
    """The feed goals on one encoding's figures, each met / missed with where its time goes."""
    where = {
        "target_read_ms": f"Zarr read {fig['read_zarr_ms']:.1f} (of which its own work beyond decompression and "
                          f"crc32c {_f(fig.get('read_zarr_own_ms'), 1)}), manifest checksum "
                          f"{fig['read_checksum_ms']:.1f}, collate/pin {fig['read_collate_pin_ms']:.1f} ms",
        "image_side_ms": f"JPEG + PNG decode {fig['image_decode_ms']:.1f}, draw + apply "
                         f"{fig['image_draw_apply_ms']:.1f}, replay hashes {fig['image_hash_ms']:.1f}, host normalise "
                         f"{fig['image_normalise_ms']:.1f} ms",
        "targets_plus_image_ms": f"targets {fig['target_read_ms']:.1f} + image {fig['image_side_ms']:.1f} ms",
        "build_host_ms": f"checksum {fig['build_checksum_ms']:.1f}, compress + write + manifest "
                         f"{fig['build_compress_write_ms']:.1f} ms",
    }
    out = [{"figure": key, "value": num(fig[key]), "goal": f"<= {thr:g} ms", "met": bool(fig[key] <= thr),
            "where": where[key]} for key, thr in GOALS_MS.items()]
    same = fig["h2d_bytes_per_sample"] == fig["stored_bytes_per_sample"]
    times = fig["h2d_bytes_per_sample"] / fig["stored_bytes_per_sample"]
    out.append({"figure": "h2d_bytes_per_sample", "value": fig["h2d_bytes_per_sample"],
                "goal": f"= stored bytes ({fig['stored_bytes_per_sample']})", "met": bool(same),
                "where": "" if same else f"the loader hands over {times:.2f}× the stored bytes (targets decoded on "
                                         "the host)"})
    return out


def device_info(device: torch.device, load: Sequence[float]) -> dict:
    """The bench's machine record (CPU model, cores, the card's name on CUDA) with the thread count."""
    from attnfd_pipeline.experiments.bench.run import device_info as machine

    d = machine(device, [round(x, 2) for x in load])
    d.update(device=str(device), threads=torch.get_num_threads(), cores=os.cpu_count(), torch=torch.__version__)
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    return d


def run_feed_bench(out: str | Path, *, quick: bool = False, recipe: str | Path | None = None,
                   work_dir: str | Path | None = None, device: str = "cpu",
                   demo_config: str | Path = "configs/demo.toml") -> dict:
    """Measure every feed figure, write ``feed.json`` and ``feed.md`` under ``out``; returns the record."""
    from attnfd_pipeline import augment
    from attnfd_pipeline.utils import atomic_write_json

    w = QUICK if quick else DEFAULT
    dev = torch.device(device)
    torch.set_num_threads(1)
    load = os.getloadavg()
    log(f"bench-feed: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; one torch thread, {PASSES} passes")
    res: dict[str, Any] = {}
    stored = {}
    with tempfile.TemporaryDirectory(prefix="attnfd-feed-", dir=work_dir) as tmp:
        work = Path(tmp)
        log(f"teacher {w.teacher} at {w.crop} px on {w.samples} crops")
        side = teacher_side(w, work, recipe, dev)
        aug = side.cfg.augment
        log("image side")
        image = image_figures(w, aug, work / "image")
        for enc in ENCODINGS:
            log(f"target path, {enc}")
            fig, stored[enc] = encoding_figures(side, enc, work / "cache", dev)
            res[enc] = add_totals(fig, image[f"impl{augment.AUGMENT_IMPL}"])
        log("codecs")
        res["codecs"] = codec_table(stored, w, Path(demo_config))
        for enc in ENCODINGS:  # the goals' "where" needs the codec speeds
            res[enc]["read_zarr_own_ms"] = num(zarr_own_ms(res[enc], res["codecs"]["workload_teacher"][enc],
                                                           res["codecs"]["crc32c_MBps"], side.cfg.cache.codec))
            res[enc]["goals"] = goals(res[enc])
    res["image_side"] = image
    res["workload"] = {**dataclasses.asdict(w), "augment": dataclasses.asdict(aug),
                       "recipe": str(recipe) if recipe else None}
    res["assumptions"] = {"teacher_images_per_s": R_TEACHER, "student_samples_per_s": S_STUDENT,
                          "basis": "fidelity.RTX_CLASS: an RTX 4090 at ~30 % of its fp16 peak (docs/storage.md)"}
    res["device"] = device_info(dev, load)
    res["quick"] = quick
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "feed.json", res)
    (out / "feed.md").write_text(feed_markdown(res))
    return res


def _f(x, nd: int = 2) -> str:
    return fmt(x, f",.{nd}f", "–")


def _mb(b) -> str:
    return f"{b / 1e6:.2f} MB"


def _cores(x) -> str:
    return _f(x, 1)


TARGET_ROWS = (  # (label, figure, format) of the per-sample table
    ("target read (store → batch in stored form), `CacheReader.read_stored`", "target_read_ms", _f),
    ("… of which Zarr read (decompress + crc32c)", "read_zarr_ms", _f),
    ("… … of which its own work (beyond decompression + crc32c)", "read_zarr_own_ms", _f),
    ("… of which manifest checksum", "read_checksum_ms", _f),
    ("image side (current implementation)", "image_side_ms", _f),
    ("targets + image side", "targets_plus_image_ms", _f),
    ("build host work (stored arrays → committed shard)", "build_host_ms", _f),
    ("… of which checksum", "build_checksum_ms", _f),
    ("device encode (float32 maps → stored arrays)", "device_encode_ms", _f),
    ("device decode (stored arrays → float32)", "device_decode_ms", _f),
    ("floor: memcpy of the stored bytes", "floor_memcpy_ms", _f),
    ("floor: page-cache read of the shard files", "floor_page_cache_ms", _f),
    ("stored bytes", "stored_bytes_per_sample", _mb),
    ("on disk", "disk_bytes_per_sample", _mb),
    ("targets through shared memory", "shm_bytes_per_sample", _mb),
    ("targets host → device", "h2d_bytes_per_sample", _mb),
    ("image through shared memory", "image_shm_bytes_per_sample", _mb),
    ("float32 teacher output", "float32_bytes_per_sample", _mb),
    (f"cores for the build at R = {R_TEACHER:g}/s (host work)", "cores_build_at_R", _cores),
    ("… with the encode on the host", "cores_build_at_R_with_host_encode", _cores),
    (f"cores for the targets at S = {S_STUDENT:g}/s", "cores_targets_at_S", _cores),
    (f"cores for targets + image at S = {S_STUDENT:g}/s", "cores_feed_at_S", _cores),
)


def feed_markdown(res: dict) -> str:
    d, w, c = res["device"], res["workload"], res["codecs"]
    image = [[f"{name[4:]} (" + ("whole image resized, float32 from the loader" if f["host_normalise"] else
                                 "crop region only, uint8 from the loader") + ")"]
             + [_f(f[k]) for k in (*IMAGE_PARTS, "image_side_ms")]
             + [_mb(f["image_shm_bytes_per_sample"])] for name, f in res["image_side"].items()]
    codecs = [[teacher, f"`{enc}`", name, f"{x['ratio']:.2f}", f"{x['encode_MBps']:,.0f}", f"{x['decode_MBps']:,.0f}"]
              for key, teacher in (("workload_teacher", f"{w['teacher']} (workload, random weights)"),
                                   ("demo_teacher", "demo teacher (trained)"))
              for enc, by in c.get(key, {}).items() for name, x in by.items()]
    return "\n".join([
        f"# bench-feed: the host cost of the feed ({w['teacher']}, {w['crop']} px, {' + '.join(w['points'])})", "",
        f"Device `{d['device']}`{', ' + d['gpu'] if 'gpu' in d else ''}; {d['threads']} torch thread, "
        f"process CPU time, the fastest of {PASSES} passes; load average at start "
        f"{' / '.join(str(x) for x in d['load_average_start'])} on {d['cores']} cores."
        + (" **--quick: tiny shapes, the figures mean nothing.**" if res.get("quick") else ""), "",
        "## Per sample", "",
        *table(["per sample, host CPU ms"] + [f"`{e}`" for e in ENCODINGS],
               [[label] + [f(res[e][k]) for e in ENCODINGS] for label, k, f in TARGET_ROWS]), "",
        f"Cores assume R = {R_TEACHER:g} teacher images/s and S = {S_STUDENT:g} student samples/s "
        f"({res['assumptions']['basis']}).", "", "## Goals (int8)", "",
        *table(["figure", "value", "goal", "status", "where the time goes"],
               [[f"`{g['figure']}`", g["value"] if isinstance(g["value"], int) else _f(g["value"]), g["goal"],
                 "met" if g["met"] else "**missed**", g["where"]] for g in res["int8"]["goals"]]), "",
        "## Image side (500×375 JPEG, the recipe's replay at the crop, hash check)", "",
        *table(["implementation", "JPEG + PNG decode", "draw + apply", "replay hashes", "host normalise",
                "total (fastest pass)", "bytes through shm"], image), "",
        "## Codecs (lossless step on the stored chunks, one thread)", "",
        *table(["teacher maps", "encoding", "codec", "ratio", "encode MB/s", "decode MB/s"], codecs), "",
        "Read path by store codec (`cache.codec`-`level`; Zarr read of one sample's arrays: decompression + crc32c "
        "+ Zarr's own work, no manifest checksum):", "",
        *table(["encoding", "codec", "Zarr read ms", "on disk"],
               [[f"`{enc}`", name, f"{x['read_zarr_ms']:.2f}", _mb(x["disk_bytes_per_sample"])]
                for enc in ENCODINGS for name, x in res[enc]["store_codecs"].items()]), "",
        f"crc32c (in every variant): {_f(c['crc32c_MBps'], 0)} MB/s; blosc clevel {c['blosc_level']}; demo "
        f"teacher: {c['demo_teacher_source']}.", ""])
