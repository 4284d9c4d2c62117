"""The teacher-feature cache layout, declared once: target names (from ``attnfd_pipeline.targets``), array
layout and codecs, the manifest columns and the layout versions (docs/cache-format.md). How a target is
encoded, decoded and checksummed lives in ``cache.encoding``.

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

from attnfd_pipeline.augment import AugmentParams
from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache.errors import CacheError
# the target names are declared in a module without dependencies (the teacher and the losses use them too)
from attnfd_pipeline.targets import (LOGITS, RAW_PREFIX, extra_for, raw_name, target_kind,  # noqa: F401
                                     target_names, target_point)

# the layout versions cache.json records, oldest first (what changed: the steps of ``info.CACHE_JSON``)
FORMAT = "attnfd-cache/2"
FORMATS = ("attnfd-cache/1", FORMAT)
# what the fingerprint hashes as the format: the stored values are those of /1, so a config keeps the
# fingerprint (and finds the caches) it had before the checksum changed
FINGERPRINT_FORMAT = "attnfd-cache/1"
FEATURES_DIR = "features.zarr"
MANIFEST_DIR = "manifest"
CACHE_JSON = "cache.json"
LOCK_NAME = ".lock"
DTYPE = "float16"
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
