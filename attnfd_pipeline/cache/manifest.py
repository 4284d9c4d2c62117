"""Manifest parts: one Parquet file per shard, the commit record of that shard.

A part is written after all of its shard's arrays, through a dot-prefixed temp file + fsync +
``os.replace`` (on an fsspec store: one whole-object put, ``storage.write_bytes``), so it exists only if
its shard is complete. Readers skip dot-files. The part's schema metadata carries the cache fingerprint,
so a part can never be mixed into another cache.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache.errors import CacheError
from attnfd_pipeline.cache.schema import manifest_schema, part_name, part_shard
from attnfd_pipeline.cache.storage import Location
from attnfd_pipeline.utils import atomic_write_bytes


def write_part(manifest_dir: str | Path, shard: int, rows: Sequence[dict], targets: Sequence[str],
               fingerprint: str, meta: dict[str, str] | None = None) -> Location:
    """Write the manifest part of ``shard`` atomically; ``rows`` sorted by (image_index, aug_seed); ``meta``:
    more schema metadata (provenance: the device that encoded the shard, the checksum algorithm)."""
    schema = manifest_schema(targets, fingerprint, shard)
    if meta:
        schema = schema.with_metadata({**schema.metadata, **{k.encode(): str(v).encode() for k, v in meta.items()}})
    table = pa.Table.from_pylist(list(rows), schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    path = storage.join(storage.location(manifest_dir), part_name(shard))
    storage.write_bytes(path, buf.getvalue(), local=atomic_write_bytes)
    return path


def list_parts(manifest_dir: str | Path) -> dict[int, Location]:
    """Committed parts by shard number (temp and stray files ignored)."""
    d = storage.location(manifest_dir)
    out = {}
    for name in storage.listdir(d):
        s = part_shard(name)
        if s is not None:
            out[s] = storage.join(d, name)
    return dict(sorted(out.items()))


def read_part(path: str | Path, fingerprint: str | None = None) -> pa.Table:
    """Read one part; with ``fingerprint``, refuse a part written for another cache."""
    path = storage.location(path)
    try:
        where, fs = storage.parquet_source(path)
        table = pq.read_table(where, filesystem=fs)
    except Exception as e:  # noqa: BLE001 - any unreadable part is a corrupt commit record
        raise CacheError(f"{path}: unreadable manifest part ({e})") from None
    if fingerprint is not None:
        meta = table.schema.metadata or {}
        got = meta.get(b"fingerprint", b"").decode()
        if got != fingerprint:
            raise CacheError(f"{path}: manifest part belongs to cache {got[:16] or '<none>'}, not {fingerprint[:16]}")
    return table


def committed_shards(manifest_dir: str | Path, fingerprint: str) -> set[int]:
    """Shards with a committed part (the fingerprint of each checked from the footer only)."""
    out = set()
    for s, p in list_parts(manifest_dir).items():
        try:
            where, fs = storage.parquet_source(p)
            meta = pq.read_schema(where, filesystem=fs).metadata or {}
        except Exception as e:  # noqa: BLE001
            raise CacheError(f"{p}: unreadable manifest part ({e})") from None
        got = meta.get(b"fingerprint", b"").decode()
        if got != fingerprint:
            raise CacheError(f"{p}: manifest part belongs to cache {got[:16] or '<none>'}, not {fingerprint[:16]}")
        out.add(s)
    return out


def read_manifest(manifest_dir: str | Path, fingerprint: str | None = None) -> pa.Table | None:
    """All committed parts concatenated, sorted by (image_index, aug_seed); None if there are none."""
    parts = [read_part(p, fingerprint) for p in list_parts(manifest_dir).values()]
    if not parts:
        return None
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in parts])
    return table.sort_by([("image_index", "ascending"), ("aug_seed", "ascending")])
