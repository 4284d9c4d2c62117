"""The teacher-feature cache layout, declared once: target names (from ``attnfd_pipeline.targets``), array
layout and codecs, the manifest columns, and the lossy float32 → float16 step with its checks
(docs/cache-format.md).

One cache directory (``<cache.root>/<fingerprint[:16]>/``) holds

- ``features.zarr/`` — a Zarr v3 group with one array per target (``B``, ``E``, ``D``, ``logits``,
  ``raw_B`` …) of shape ``(N, K, C, H, W)``, float16, one chunk per sample, shards of
  ``(S, K, C, H, W)``, spec codecs only (zstd or blosc, then crc32c), ``fill_value = NaN``;
- ``manifest/part-<shard:05d>.parquet`` — one row per (image, aug seed) of that shard; the part is the
  commit record of its shard (written last, atomically);
- ``cache.json`` — the fingerprint and every input that went into it (``info.CacheInfo``).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from attnfd_pipeline.augment import AugmentParams
from attnfd_pipeline.cache import encoding as enc
from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache.errors import CacheError
# the target names are declared in a module without dependencies (the teacher and the losses use them too)
from attnfd_pipeline.targets import (LOGITS, RAW_PREFIX, extra_for, raw_name, target_kind,  # noqa: F401
                                     target_names, target_point)

FORMAT = "attnfd-cache/1"
FEATURES_DIR = "features.zarr"
MANIFEST_DIR = "manifest"
CACHE_JSON = "cache.json"
LOCK_NAME = ".lock"
DTYPE = "float16"
FLOAT16_MAX = 65504.0
CHECKSUM_PREFIX = "checksum_"
FILL_VALUE = float("nan")


def cache_target_names(cache_cfg) -> list[str]:
    """The arrays of a cache config (``cache.points`` and ``cache.extra``), in array order."""
    return target_names(cache_cfg.points, cache_cfg.extra)


class ShardRange(typing.NamedTuple):
    shard: int
    start: int  # first image index
    stop: int  # one past the last image index


def shard_range(shard: int, shard_size: int, n_images: int) -> tuple[int, int]:
    """Image indices ``[start, stop)`` stored in ``shard``."""
    start = shard * shard_size
    return start, min(start + shard_size, n_images)


def num_shards(n_images: int, shard_size: int) -> int:
    return -(-n_images // shard_size)


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def part_shard(name: str) -> int | None:
    """Shard number of a manifest part file name, None for anything else (temp files, strays)."""
    if not (name.startswith("part-") and name.endswith(".parquet")):
        return None
    digits = name[len("part-"):-len(".parquet")]
    return int(digits) if digits.isdigit() else None


def compressors(codec: str, level: int, typesize: int = 2) -> list:
    """Spec codecs only: any Zarr v3 implementation can read the store (numcodecs filters would make
    others refuse it). crc32c last, so a flipped byte in a stored chunk is reported on read."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if codec == "zstd":
        return [ZstdCodec(level=level), Crc32cCodec()]
    if codec == "blosc":
        return [BloscCodec(cname="lz4", clevel=level, shuffle="shuffle", typesize=typesize), Crc32cCodec()]
    if codec == "none":
        return [Crc32cCodec()]
    raise CacheError(f"unknown cache codec {codec!r} (known: zstd, blosc, none)")


def effective_mantissa_bits(mantissa_bits: int) -> int:
    """float16 keeps 10 mantissa bits; config 0 means 'keep them all'."""
    return 10 if mantissa_bits in (0, 10) else int(mantissa_bits)


def lossy_steps(mantissa_bits: int, encoding: str = "float16", pool: int = 1) -> list[str]:
    steps = []
    if pool > 1:
        steps.append(f"average-pooled by {pool} (window = stride = {pool}, a last partial window averages the "
                     f"pixels it covers), in float32")
    if encoding == "int8":
        return steps + ["per (sample, channel) affine quantisation to uint8 codes: value = offset + code * scale, "
                        "offset = channel min, scale = (max - min) / 255 (0 for a constant channel); "
                        "|error| <= scale / 2"]
    steps += ["cast float32 -> float16 (round to nearest even); refused if non-finite or |x| > 65504"]
    m = effective_mantissa_bits(mantissa_bits)
    if m < 10:
        steps.append(f"float16 mantissa rounded to {m} bits (round to nearest even on the bit pattern)")
    return steps


# ---------------------------------------------------------------------------------------------
# lossy step: float32 → float16 (+ optional mantissa rounding), refused when it cannot be exact enough


def round_mantissa(x16: np.ndarray, bits: int) -> np.ndarray:
    """Round float16 values to ``bits`` mantissa bits (round to nearest, ties to even) on the bit
    pattern; the carry may move into the exponent (correct rounding up to the next binade)."""
    bits = effective_mantissa_bits(bits)
    if bits >= 10:
        return x16
    drop = 10 - bits
    u = np.ascontiguousarray(x16).view(np.uint16)
    sign = u & np.uint16(0x8000)
    mag = (u & np.uint16(0x7FFF)).astype(np.uint32)
    lsb = (mag >> drop) & 1
    mag = (mag + ((1 << (drop - 1)) - 1) + lsb) & ~np.uint32((1 << drop) - 1)
    return (sign | mag.astype(np.uint16)).view(np.float16)


def _where(ids: Sequence[str], seeds: Sequence[int], flat_bad: np.ndarray, per_sample: int) -> str:
    first = int(np.flatnonzero(flat_bad)[0]) // per_sample
    return f"image {ids[first]!r}, aug seed {seeds[first]}"


def to_float16(x: np.ndarray, mantissa_bits: int, *, target: str, ids: Sequence[str],
               seeds: Sequence[int]) -> np.ndarray:
    """float32 samples ``(n, C, H, W)`` → float16, refusing non-finite values and float16 overflow.

    ``ids``/``seeds`` name each of the ``n`` samples for the error message."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    per = int(np.prod(x.shape[1:])) if n else 1
    flat = x.reshape(n, -1)
    if x.size:  # fast path: min/max propagate NaN, so two passes without temporaries decide
        hi, lo = float(flat.max()), float(flat.min())
        ok = np.isfinite(hi) and np.isfinite(lo) and hi <= FLOAT16_MAX and lo >= -FLOAT16_MAX
    else:
        ok = True
    finite = np.isfinite(flat) if not ok else None
    if finite is not None and not finite.all():
        bad = ~finite
        rows = np.flatnonzero(bad.any(axis=1))
        names = ", ".join(f"{ids[r]!r}/seed {seeds[r]}" for r in rows[:5])
        raise CacheError(f"target {target!r}: {int(bad.sum())} non-finite teacher values (first at "
                         f"{_where(ids, seeds, bad.ravel(), per)}; samples {names}); refusing to write them")
    big = None if ok else np.abs(flat) > FLOAT16_MAX
    if big is not None and big.any():
        rows = np.flatnonzero(big.any(axis=1))
        names = ", ".join(f"{ids[r]!r}/seed {seeds[r]}" for r in rows[:5])
        raise CacheError(f"target {target!r}: {int(big.sum())} values overflow float16 (max |x| = "
                         f"{float(np.abs(flat).max()):.4g} > 65504, first at {_where(ids, seeds, big.ravel(), per)}; "
                         f"samples {names}); refusing to write them")
    # torch's float32 → float16 cast is IEEE round-to-nearest-even like numpy's (bitwise equal, checked
    # in the tests) and several times faster
    y = torch.from_numpy(x).to(torch.float16).numpy()
    if effective_mantissa_bits(mantissa_bits) < 10:
        y = round_mantissa(y, mantissa_bits)
        inf = ~np.isfinite(y.reshape(n, -1))
        if inf.any():
            raise CacheError(f"target {target!r}: values round to inf with mantissa_bits={mantissa_bits} (at "
                             f"{_where(ids, seeds, inf.ravel(), per)}); refusing to write them")
    return y


def sample_checksum(*parts: np.ndarray) -> str:
    """Checksum of one stored sample (the bytes of its stored arrays, C order: float16 values, or int8
    codes then scales then offsets): recorded in the manifest, checked on every read."""
    return enc.sample_checksum(*parts)


# ---------------------------------------------------------------------------------------------
# manifest


def _arrow_type(tp) -> pa.DataType:
    return {bool: pa.bool_(), int: pa.int32(), float: pa.float64(), str: pa.string()}[tp]


PARAM_FIELDS: tuple[tuple[str, type], ...] = tuple(
    (f.name, typing.get_type_hints(AugmentParams)[f.name]) for f in dataclasses.fields(AugmentParams))


def manifest_schema(targets: Sequence[str], fingerprint: str, shard: int) -> pa.Schema:
    """One row per (image, aug seed), sorted by (image_index, aug_seed)."""
    fields = [
        pa.field("image_id", pa.string()),
        pa.field("image_index", pa.int64()),
        pa.field("aug_seed", pa.int32()),
        pa.field("image_h", pa.int32()),  # source size before augmentation
        pa.field("image_w", pa.int32()),
    ]
    fields += [pa.field(name, _arrow_type(tp)) for name, tp in PARAM_FIELDS]
    fields += [pa.field("image_hash", pa.string()), pa.field("label_hash", pa.string())]
    fields += [pa.field(CHECKSUM_PREFIX + t, pa.string()) for t in targets]
    fields.append(pa.field("rank", pa.int32()))
    meta = {"fingerprint": fingerprint, "format": FORMAT, "shard": str(shard)}
    return pa.schema(fields, metadata=meta)


def params_from_row(columns: dict[str, np.ndarray], row: int) -> AugmentParams:
    return AugmentParams(**{name: tp(columns[name][row].item()) for name, tp in PARAM_FIELDS})


def paths(cache_dir: str | Path) -> dict:
    """The cache's parts as locations (``storage``): ``Path``s for a local cache, URLs on an fsspec store."""
    d = storage.location(cache_dir)
    return {"dir": d, "features": storage.join(d, FEATURES_DIR), "manifest": storage.join(d, MANIFEST_DIR),
            "info": storage.join(d, CACHE_JSON), "lock": storage.join(d, LOCK_NAME)}
