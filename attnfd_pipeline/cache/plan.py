"""``attnfd cache plan``: what a build will cost before anything is written.

Samples, float16 bytes per sample per target, the compressed total (measured by compressing a few
real teacher outputs with the configured codec when a teacher is given; ratio 1 otherwise), free disk,
and the time (measured on a few teacher batches). Storage is the first-class cost of this design
(~13.5 MB per (image, seed) at paper scale: docs/method.md "Compression and precision"), so a plan that does
not fit refuses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache.build import run_teacher, shard_samples, teacher_device
from attnfd_pipeline.cache.fingerprint import cache_dir_for, cache_inputs, cache_root_path, fingerprint_of
from attnfd_pipeline.cache.manifest import list_parts
from attnfd_pipeline.cache.encoding import bytes_per_sample, decode, encode_target, pool_maps, pool_of, pooled_hw
from attnfd_pipeline.cache.errors import CacheError
from attnfd_pipeline.cache.schema import (LOGITS, ShardRange, cache_target_names, num_shards, paths, shard_range,
                                          target_point)
from attnfd_pipeline.cache.storage import Location

# per chunk: crc32c (4 B) + shard index entry (16 B); per shard: index crc (4 B)
CHUNK_OVERHEAD = 20
_MB = 1e6


@dataclass
class Plan:
    cache_dir: Location
    fingerprint: str
    num_images: int
    K: int
    samples: int
    samples_committed: int
    targets: dict[str, dict] = field(default_factory=dict)  # name → chw, bytes (float16), ratio
    free_bytes: int | None = 0  # None: an object store (no capacity to check)
    measured: bool = False  # ratio and time measured on real teacher outputs
    seconds_per_sample: float | None = None  # teacher + load/augment, main thread
    probe_samples: int = 0
    encoding: str = "float16"

    @property
    def bytes_per_sample(self) -> int:
        return sum(t["bytes"] for t in self.targets.values())

    @property
    def compressed_bytes_per_sample(self) -> float:
        return sum(t["bytes"] / t["ratio"] + CHUNK_OVERHEAD for t in self.targets.values())

    @property
    def estimated_bytes(self) -> int:
        return int(self.compressed_bytes_per_sample * self.samples)

    @property
    def remaining_bytes(self) -> int:
        return int(self.compressed_bytes_per_sample * (self.samples - self.samples_committed))

    @property
    def estimated_seconds(self) -> float | None:
        if self.seconds_per_sample is None:
            return None
        return self.seconds_per_sample * (self.samples - self.samples_committed)

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.remaining_bytes <= self.free_bytes

    def check(self) -> None:
        if not self.fits:
            raise CacheError(f"cache {self.cache_dir} needs about {self.remaining_bytes / _MB:,.1f} MB more but only "
                             f"{self.free_bytes / _MB:,.1f} MB are free there; lower cache.K, choose fewer "
                             f"cache.points, set cache.mantissa_bits or a codec, or free disk space")

    def lines(self) -> list[str]:
        out = [f"cache dir: {self.cache_dir} (fingerprint {self.fingerprint[:16]})",
               f"samples: {self.num_images} images × K={self.K} = {self.samples}"
               + (f" ({self.samples_committed} already committed)" if self.samples_committed else "")]
        for name, t in self.targets.items():
            C, H, W = t["chw"]
            line = (f"  {name:>8}: {C}×{H}×{W} {self.encoding} = {t['bytes'] / 1e3:,.1f} kB/sample, "
                    f"compression ×{t['ratio']:.2f}{'' if self.measured else ' (assumed)'}")
            if "rel_error" in t:
                line += f", rel. L2 error of channel-normalised maps {t['rel_error']:.1e}"
                if t["tiny_channels"] > 0:
                    line += (f"; WARNING {t['tiny_channels'] * 100:.1f}% of channels have RMS < 1e-4 "
                             f"(float16 keeps few significant bits there)")
            out.append(line)
        out.append(f"bytes per sample: {self.bytes_per_sample / 1e3:,.1f} kB {self.encoding}, "
                   f"~{self.compressed_bytes_per_sample / 1e3:,.1f} kB on disk")
        out.append(f"estimated total: {self.estimated_bytes / _MB:,.1f} MB "
                   f"(still to write: {self.remaining_bytes / _MB:,.1f} MB); free: "
                   + ("unknown (object store)" if self.free_bytes is None else f"{self.free_bytes / _MB:,.1f} MB"))
        if self.estimated_seconds is not None:
            out.append(f"estimated time: {self.estimated_seconds:,.0f} s "
                       f"({1 / self.seconds_per_sample:,.1f} samples/s measured on {self.probe_samples} samples)")
        out.append("fits on disk" if self.fits else "DOES NOT FIT on disk")
        return out


def _free_bytes(path: Location) -> int | None:
    return storage.free_bytes(path)


def compressed_bytes(x: np.ndarray, codec: str, level: int) -> int:
    """Bytes of the samples ``x[i]`` of one stored array after ``codec`` at ``level``, each sample compressed
    alone as in the store (chunk = one sample); the raw bytes for ``codec = "none"``."""
    if codec == "none":
        return int(x.nbytes)
    import numcodecs

    comp = numcodecs.Zstd(level=level) if codec == "zstd" else numcodecs.Blosc(
        cname="lz4", clevel=level, shuffle=numcodecs.Blosc.SHUFFLE)
    return sum(len(comp.encode(np.ascontiguousarray(s))) for s in x)


def measure_storage(x32: np.ndarray, encoding: str, mantissa_bits: int, pool: int, codec: str, level: int, *,
                    target: str, ids: Sequence[str] = (), seeds: Sequence[int] = ()) -> dict[str, Any]:
    """What float32 maps ``(n, C, H, W)`` cost as the store holds them: encoded (``encode_target``: pooled by
    ``pool``, then float16 with ``mantissa_bits`` or int8), each sample of each stored array compressed alone,
    decoded back. Per sample ``raw_bytes`` and ``stored_bytes`` (without ``CHUNK_OVERHEAD``), their ``ratio``,
    ``precision_stats`` of the decoded maps against the pooled float32 ones and their ``zero_fraction``;
    ``parts`` (the stored arrays) and ``decoded`` (float32) for further measures. The one place that computes
    the storage figures: ``plan_cache``, the bench's storage options and the fidelity bench all call it."""
    parts = encode_target(x32, encoding, mantissa_bits, pool, target=target, ids=ids, seeds=seeds)
    y = np.asarray(decode(encoding, parts), dtype=np.float32)
    raw = sum(int(p.nbytes) for p in parts)
    packed = sum(compressed_bytes(p, codec, level) for p in parts)
    return {"raw_bytes": raw // len(x32), "stored_bytes": packed / len(x32), "ratio": raw / max(packed, 1),
            **precision_stats(pool_maps(x32, pool), y), "zero_fraction": float((y == 0).mean()),
            "parts": parts, "decoded": y}


def precision_stats(x32: np.ndarray, x16: np.ndarray) -> dict[str, float]:
    """Relative L2 error of channel-normalised maps (each (sample, channel) map scaled to unit L2 norm,
    all-zero maps left out) after the lossy step, and the fraction of channels whose RMS is below
    1e-4 but not zero (float16 keeps few significant bits there)."""
    a = x32.astype(np.float64).reshape(x32.shape[0] * x32.shape[1], -1)
    b = x16.astype(np.float64).reshape(a.shape)
    na = np.linalg.norm(a, axis=1)
    keep = na > 0
    a, b, na = a[keep], b[keep], na[keep][:, None]
    ref = a / na
    err = b / na - ref  # same scale for both, so a global scale error is counted too
    rel = float(np.sqrt((err ** 2).sum() / max((ref ** 2).sum(), 1e-300))) if len(a) else 0.0
    rms = na[:, 0] / np.sqrt(a.shape[1]) if len(a) else np.zeros(0)
    tiny = float((rms < 1e-4).sum() / max(x32.shape[0] * x32.shape[1], 1))
    return {"rel_error": rel, "tiny_channels": tiny}


def plan_cache(cfg, source: Any, *, teacher: Any = None, teacher_info: Any = None,
               target_specs: dict[str, tuple[int, int, int]] | None = None, probe_samples: int | None = None,
               check: bool = True) -> Plan:
    """Estimate the cache of ``cfg`` on ``source``. With ``teacher``: measured compression and time on
    the first ``probe_samples`` samples (default two teacher batches). Without: needs ``teacher_info``
    (dict or sha256, for the fingerprint) and ``target_specs``; ratio 1, no time. ``check``: raise
    CacheError when it does not fit on disk."""
    c = cfg.cache
    names = cache_target_names(c)
    if teacher is not None:
        target_specs = teacher.target_specs(tuple(cfg.augment.crop_size), names)
        teacher_info = teacher
    if teacher_info is None or target_specs is None:
        raise CacheError("plan_cache needs a teacher, or its info/sha256 and the target specs")
    fp = fingerprint_of(cache_inputs(cfg, teacher_info, source))
    d = cache_dir_for(cfg, fp)
    N = len(source)
    committed = 0
    for s in list_parts(paths(d)["manifest"]):
        if s < num_shards(N, c.shard_size):
            a, b = shard_range(s, c.shard_size, N)
            committed += (b - a) * c.K
    plan = Plan(d, fp, N, c.K, N * c.K, committed, free_bytes=_free_bytes(d), encoding=c.encoding)
    encoding = c.encoding
    for n in names:
        C, H, W = (int(v) for v in target_specs[n])
        h, w = pooled_hw(H, W, pool_of(c.pool, n))
        plan.targets[n] = {"chw": [C, h, w], "bytes": bytes_per_sample((C, h, w), encoding), "ratio": 1.0}

    if teacher is not None and N > 0:
        n_probe = probe_samples or 2 * c.batch_size
        n_img = min(N, max(1, -(-n_probe // c.K)))
        rows, crops, load_s = shard_samples(cfg, source, ShardRange(0, 0, n_img), source.ids)
        crops = crops[:n_probe]
        device = teacher_device(teacher)
        # first batch warms up (allocations, kernel selection); time the rest when there is a rest
        warm = crops[:c.batch_size]
        t0 = time.perf_counter()
        outs, _ = run_teacher(teacher, warm, names, c.batch_size, device)
        warm_s = time.perf_counter() - t0
        rest = crops[c.batch_size:]
        if rest:
            more, teacher_s = run_teacher(teacher, rest, names, c.batch_size, device)
            outs = {n: np.concatenate([outs[n], more[n]]) for n in names}
            timed = len(rest)
        else:
            teacher_s, timed = warm_s, len(warm)
        ids = [r["image_id"] for r in rows][:len(crops)]
        seeds = [r["aug_seed"] for r in rows][:len(crops)]
        for n in names:
            m = measure_storage(outs[n], encoding, c.mantissa_bits, pool_of(c.pool, n), c.codec, c.level,
                                target=n, ids=ids, seeds=seeds)
            plan.targets[n].update({k: m[k] for k in ("ratio", "rel_error", "tiny_channels")})
        plan.seconds_per_sample = teacher_s / timed + load_s / max(len(rows), 1)
        plan.probe_samples = len(crops)
        plan.measured = True
    if check:
        plan.check()
    return plan


# ---------------------------------------------------------------------------------------------
# the plan before any teacher exists: shapes from the model config, every encoding side by side


def model_target_specs(cfg, names: list[str] | None = None) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of each cache target at the configured crop, from the teacher's model config alone: the
    model is built on torch's ``meta`` device (no weights, no memory, no bundle) and run on a meta input."""
    import torch

    from attnfd_pipeline.models import build_model

    names = names or cache_target_names(cfg.cache)
    m = cfg.teacher.model
    num_classes = cfg.data.num_classes  # a built-in's or the declared classes
    with torch.device("meta"):
        model = build_model(m.name, num_classes, output_stride=m.output_stride).eval()
        out = model(torch.zeros(1, 3, *cfg.augment.crop_size))
    specs = {}
    for n in names:  # a refined map F'' has its raw map's shape
        key = target_point(n) or LOGITS  # the raw map of a point, or the logits
        specs[n] = tuple(int(v) for v in out[key].shape[1:])
    return specs


def storage_variants(cache_cfg) -> list[tuple[str, tuple[tuple[str, int], ...]]]:
    """(encoding, pool) pairs a plan compares: each encoding unpooled, then each with the configured pooling
    (``cache.pool``; D pooled by 2 when nothing is configured and D is cached)."""
    from attnfd_pipeline.cache.encoding import ENCODINGS

    pool = tuple(cache_cfg.pool) or ((("D", 2),) if "D" in cache_cfg.points else ())
    out = [(e, ()) for e in ENCODINGS]
    return out + ([(e, pool) for e in ENCODINGS] if pool else [])


def variant_name(encoding: str, pool) -> str:
    return encoding + "".join(f"+pool{p}{f}" for p, f in pool)


def encoding_table(cfg, num_images: int, *, specs: dict[str, tuple[int, int, int]] | None = None,
                   teacher_images_per_s: float | None = None, ratios: dict[str, float] | None = None) -> dict:
    """Bytes per sample per target and the total for ``num_images`` × K of every storage variant
    (``storage_variants``), with the zstd compression measured by the storage bench (``ratios``, default
    ``encoding.MEASURED_COMPRESSION``) and, given a teacher throughput, the time to build. JSON-ready."""
    from attnfd_pipeline.cache.encoding import MEASURED_COMPRESSION, RECOMMENDED

    c = cfg.cache
    specs = specs or model_target_specs(cfg)
    ratios = dict(MEASURED_COMPRESSION if ratios is None else ratios)
    samples = num_images * c.K
    table = {}
    for encoding, pool in storage_variants(c):
        name = variant_name(encoding, pool)
        per_target = {}
        for n in cache_target_names(c):
            C, H, W = specs[n]
            h, w = pooled_hw(H, W, pool_of(pool, n))
            per_target[n] = {"chw": [C, h, w], "bytes": bytes_per_sample((C, h, w), encoding)}
        raw = sum(t["bytes"] for t in per_target.values())
        ratio = float(ratios.get(name, ratios.get(encoding, 1.0))) if c.codec != "none" else 1.0
        per = raw / ratio + CHUNK_OVERHEAD * len(per_target)
        table[name] = {"encoding": encoding, "pool": dict(pool), "targets": per_target, "raw_bytes_per_sample": raw,
                       "compression": ratio, "bytes_per_sample": per, "total_bytes": per * samples}
    f16 = table["float16"]["total_bytes"]
    for row in table.values():
        row["compression_vs_float16"] = f16 / row["total_bytes"]
    recommended = variant_name(RECOMMENDED[0], tuple(p for p in RECOMMENDED[1] if p[0] in c.points))
    return {"config": cfg.name, "num_images": num_images, "K": c.K, "samples": samples,
            "crop_size": list(cfg.augment.crop_size), "teacher": cfg.teacher.model.name,
            "points": list(cache_target_names(c)), "compression_source": "measured by `attnfd bench-storage` "
            "(zstd level 1 on a trained teacher's maps), not on this config's teacher",
            "build_seconds": samples / teacher_images_per_s if teacher_images_per_s else None,
            "teacher_images_per_s": teacher_images_per_s,
            "encodings": table, "recommended": recommended if recommended in table else "float16",
            "configured": variant_name(c.encoding, c.pool), "cache_root": c.root,
            "free_bytes": _root_free_bytes(c.root)}


def _root_free_bytes(root: str) -> int | None:
    """Free disk under ``cache.root`` (None on an object store, or where its backend is not installed)."""
    try:
        return storage.free_bytes(cache_root_path(root))
    except (CacheError, OSError, ValueError):
        return None


def encoding_lines(t: dict) -> list[str]:
    """The table of ``encoding_table`` as text."""
    out = [f"{t['config']}: {t['num_images']:,} images × K={t['K']} = {t['samples']:,} samples, crop "
           f"{t['crop_size'][0]}×{t['crop_size'][1]}, teacher {t['teacher']}, targets {', '.join(t['points'])}",
           f"compression: {t['compression_source']}",
           f"{'storage':<18} {'per sample (raw)':>17} {'zstd':>6} {'per sample':>12} {'total':>11} {'vs float16':>10}"]
    for name, r in t["encodings"].items():
        marks = [m for m, on in (("this config", name == t.get("configured")), ("recommended", name == t["recommended"]))
                 if on]
        mark = f"  <- {', '.join(marks)}" if marks else ""
        out.append(f"{name:<18} {r['raw_bytes_per_sample'] / 1e6:>14.2f} MB {r['compression']:>5.2f}× "
                   f"{r['bytes_per_sample'] / 1e6:>9.2f} MB {r['total_bytes'] / 1e9:>8.1f} GB "
                   f"{r['compression_vs_float16']:>9.2f}×{mark}")
    if "free_bytes" in t:
        free = t["free_bytes"]
        out.append(f"free disk at {t['cache_root']}: " + ("unknown (object store)" if free is None else
                                                         f"{free / 1e9:,.1f} GB"))
    if t["build_seconds"] is not None:
        out.append(f"build time at {t['teacher_images_per_s']:g} teacher images/s (assumed; one forward per "
                   f"sample): {t['build_seconds'] / 60:,.0f} min")
    return out


def plan_build(cfg, teacher: Any, source: Any) -> Plan:
    """What a build settles before it writes anything: its inputs (``source.check(teacher)``: an image split's
    files are usable and the teacher was trained for its classes; the source is not empty), then the plan of
    its cache (``Plan.check()`` refuses one that does not fit)."""
    source.check(teacher)
    if len(source) == 0:
        raise CacheError("the sample source is empty: nothing to cache")
    return plan_cache(cfg, source, teacher=teacher, check=False)
