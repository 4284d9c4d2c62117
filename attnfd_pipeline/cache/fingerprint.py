"""Cache fingerprint: a hash of every input that decides what a cache contains.

Same inputs → same directory (reused, resumed); any change → a new directory, never mixed. The
fingerprint is computable without loading the teacher (only its recorded weights hash is needed), so
Stage 2 can find its cache from a config, the teacher bundle's metadata and the dataset listing.

Inputs: teacher weights hash (incl. CBAMs and CBAM mode), dataset identity, the full augmentation
recipe (crop size, scales, seed …; its implementation ``impl`` only when it is not 1), K, target names, dtype,
codec + level, mantissa bits, encoding, pooling, shard size, package version and cache format. Not included:
teacher batch size and device (eval-mode targets do not depend on the batch; float rounding differences between
devices are within float16 tolerance).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import attnfd_pipeline
from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache.errors import CacheError
from attnfd_pipeline.cache.schema import DTYPE, FINGERPRINT_FORMAT, cache_target_names
from attnfd_pipeline.cache.storage import Location


def teacher_sha256(teacher: Any) -> str:
    """Accept a teacher object (``.sha256``), its info dict (``["sha256"]``) or the hash itself."""
    if isinstance(teacher, str):
        sha = teacher
    elif isinstance(teacher, dict):
        sha = teacher.get("sha256")
    else:
        sha = getattr(teacher, "sha256", None)
    if not isinstance(sha, str) or not sha:
        raise CacheError("teacher weights hash (sha256) missing: cannot compute the cache fingerprint")
    return sha


def dataset_identity(source: Any) -> dict:
    """Accept a sample source (``.identity()``) or an identity dict."""
    ident = source if isinstance(source, dict) else source.identity()
    return json.loads(json.dumps(ident))  # plain JSON types (tuples → lists)


def cache_inputs(cfg, teacher: Any, source: Any) -> dict[str, Any]:
    """Everything the fingerprint hashes, as plain JSON. ``teacher``: object, info dict or sha256;
    ``source``: sample source or its identity dict."""
    c = cfg.cache
    augment = json.loads(json.dumps(dataclasses.asdict(cfg.augment)))
    if augment.get("impl") == 1:  # part of the fingerprint definition: ``impl`` counts only when it is not 1
        del augment["impl"]
    inputs = {
        "format": FINGERPRINT_FORMAT,
        "package_version": attnfd_pipeline.__version__,
        "teacher_sha256": teacher_sha256(teacher),
        "dataset": dataset_identity(source),
        "augment": augment,
        "K": c.K,
        "targets": cache_target_names(c),
        "dtype": DTYPE,
        "codec": c.codec,
        "level": c.level if c.codec != "none" else 0,
        "mantissa_bits": 10 if c.mantissa_bits in (0, 10) else c.mantissa_bits,
        "shard_size": c.shard_size,
    }
    # part of the fingerprint definition: encoding and pooling count only when they are not the defaults
    # (float16, unpooled), so a config of the defaults fingerprints to the caches built before these settings
    if c.encoding != "float16":
        inputs["encoding"] = c.encoding
    if c.pool:
        inputs["pool"] = {p: f for p, f in c.pool}
    return inputs


def fingerprint_of(inputs: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``inputs``."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_fingerprint(cfg, teacher: Any, source: Any) -> str:
    return fingerprint_of(cache_inputs(cfg, teacher, source))


def cache_root_path(root: str | Path) -> Location:
    """``cache.root`` as a location (``storage``): a local directory for a path or a ``file://`` URL (e.g. a
    shared POSIX mount, ``file:///mnt/shared/cache``), else the URL of any fsspec store zarr accepts
    (``s3://bucket/prefix``, ``gs://…``, ``memory://…``). Builds there commit with whole-object puts and an
    exclusive-create lock; a protocol whose backend is missing is refused naming what to install."""
    return storage.location(root, "cache.root")


def cache_dir_for(cfg, fingerprint: str) -> Location:
    return storage.join(cache_root_path(cfg.cache.root), fingerprint[:16])


def diff_inputs(recorded: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of the fields that differ (recursing into tables)."""
    out = []
    for key in sorted(set(recorded) | set(expected)):
        a, b = recorded.get(key, "<absent>"), expected.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_inputs(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: cache has {a!r}, config gives {b!r}")
    return out
