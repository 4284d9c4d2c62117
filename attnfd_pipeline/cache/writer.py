"""Writing side: create the store's metadata once, then commit whole shards from a background thread.

Each shard is buffered in full (S images × K seeds, float32 from the teacher) and handed to
``ShardWriter``, whose thread does the lossy float16 step with its checks, the per-sample checksums,
compression and I/O (``arr[s0:s1] = buf``, one slice per target), and finally writes the shard's
manifest part — the commit record. The bounded queue lets the teacher run on the next shard while the
previous one is compressed and written (whole-shard writes are ~10× faster than per-sample writes, and
two writers in one shard lose data: docs/method.md "Concurrent writes").
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache.manifest import write_part
from attnfd_pipeline.cache.schema import (CHECKSUM_PREFIX, DTYPE, FEATURES_DIR, FILL_VALUE, CacheError,
                                          compressors, disk_full_error, effective_mantissa_bits, is_disk_full,
                                          lossy_steps, paths, sample_checksum, to_float16)
from attnfd_pipeline.cache.storage import Location
from attnfd_pipeline.utils import atomic_write_json


def array_attributes(info: dict, name: str) -> dict:
    t = info["targets"][name]
    return {
        "target": name,
        "kind": t["kind"],
        "point": t["point"],
        "stride": t["stride"],
        "layout": ["image", "aug_seed", "channel", "y", "x"],
        "dtype": DTYPE,
        "source_dtype": "float32",
        "lossy": lossy_steps(info["mantissa_bits"]),
        "mantissa_bits": effective_mantissa_bits(info["mantissa_bits"]),
        "fill_value_meaning": "NaN = sample never written (its shard is not committed)",
        "fingerprint": info["fingerprint"],
    }


def create_store(cache_dir: str | Path, info: dict) -> None:
    """Create the Zarr group and one array per target if missing, then ``cache.json``. Idempotent and
    deterministic (no timestamps), so every writer may call it; an existing ``cache.json`` must agree."""
    import zarr

    p = paths(cache_dir)
    storage.makedirs(p["dir"])
    storage.makedirs(p["manifest"])
    if storage.is_file(p["info"]):
        recorded = json.loads(storage.read_bytes(p["info"]))
        for key in ("fingerprint", "target_names", "targets", "num_images"):
            if recorded.get(key) != info.get(key):
                raise CacheError(f"{p['info']}: recorded {key} differs from this build's "
                                 f"({recorded.get(key)!r} vs {info.get(key)!r}); the cache directory is not "
                                 f"consistent with its fingerprint — remove it and rebuild")
    group = zarr.open_group(storage.zarr_store(p["features"], read_only=False), mode="a",
                            attributes={"format": info["format"], "fingerprint": info["fingerprint"]})
    existing = set(group.array_keys())
    N, K, S = info["num_images"], info["K"], info["shard_size"]
    for name in info["target_names"]:
        C, H, W = info["targets"][name]["chw"]
        if name in existing:
            arr = group[name]
            if tuple(arr.shape) != (N, K, C, H, W) or str(arr.dtype) != DTYPE:
                raise CacheError(f"{storage.join(p['features'], name)}: shape {arr.shape} / {arr.dtype} differs "
                                 f"from the expected {(N, K, C, H, W)} {DTYPE}")
            continue
        try:
            group.create_array(name, shape=(N, K, C, H, W), dtype=DTYPE, chunks=(1, 1, C, H, W),
                               shards=(S, K, C, H, W), compressors=compressors(info["codec"], info["level"]),
                               fill_value=FILL_VALUE, attributes=array_attributes(info, name),
                               dimension_names=["image", "aug_seed", "channel", "y", "x"])
        except Exception as e:  # another writer created it between our listing and now
            if "exist" not in str(e).lower():
                raise
    if not storage.is_file(p["info"]):
        storage.write_json(p["info"], info, local=atomic_write_json)


def shard_file(cache_dir: str | Path, name: str, shard: int) -> Location:
    """The file (object) holding shard ``shard`` of array ``name`` (default v3 chunk keys)."""
    return storage.join(storage.location(cache_dir), FEATURES_DIR, name, "c", str(shard), "0", "0", "0", "0")


@dataclass
class ShardBuffer:
    """One shard's teacher outputs (float32, (n_images, K, C, H, W) per target) and manifest rows
    (sorted by image index then seed; checksums filled in by the writer)."""

    shard: int
    start: int
    stop: int
    arrays: dict[str, np.ndarray]
    rows: list[dict] = field(default_factory=list)


_STOP = object()


class ShardWriter:
    """Background thread committing ``ShardBuffer``s: float16 step + checks, checksums, one slice write
    per target, then the manifest part. Errors are re-raised in the submitting thread."""

    def __init__(self, cache_dir: str | Path, info: dict, *, rank: int = 0, max_queue: int = 1,
                 on_commit: Callable[[ShardBuffer, int, float], None] | None = None):
        import zarr

        self.dir = storage.location(cache_dir)
        self.info = info
        self.rank = rank
        self.targets: Sequence[str] = list(info["target_names"])
        group = zarr.open_group(storage.zarr_store(paths(self.dir)["features"], read_only=False), mode="r+")
        self.arrays = {name: group[name] for name in self.targets}
        self.on_commit = on_commit
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self.seconds = 0.0  # time spent converting, compressing and writing
        self.bytes_written = 0
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    def submit(self, buf: ShardBuffer) -> None:
        while True:
            self._raise_if_failed()
            try:
                self.queue.put(buf, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Commit everything queued, stop the thread, re-raise its error if any."""
        if self._thread.is_alive():
            while self._thread.is_alive():
                try:
                    self.queue.put(_STOP, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            if self.error is not None:
                continue  # drain after a failure; the submitter raises it
            try:
                t0 = time.perf_counter()
                nbytes = self.commit(item)
                self.seconds += time.perf_counter() - t0
                self.bytes_written += nbytes
                if self.on_commit is not None:
                    self.on_commit(item, nbytes, time.perf_counter() - t0)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def commit(self, buf: ShardBuffer) -> int:
        """Write one shard (all targets) then its manifest part; returns the bytes on disk."""
        ids = [r["image_id"] for r in buf.rows]
        seeds = [r["aug_seed"] for r in buf.rows]
        converted = {}
        for name in self.targets:
            x = buf.arrays[name]
            n, K = x.shape[:2]
            flat = x.reshape(n * K, *x.shape[2:])
            y = to_float16(flat, self.info["mantissa_bits"], target=name, ids=ids, seeds=seeds)
            for j, row in enumerate(buf.rows):
                row[CHECKSUM_PREFIX + name] = sample_checksum(y[j])
            converted[name] = y.reshape(x.shape)
        for row in buf.rows:
            row["rank"] = self.rank
        nbytes = 0
        try:
            for name, y in converted.items():  # all checks passed before anything is written
                self.arrays[name][buf.start:buf.stop] = y
                # durable before the commit record that vouches for it
                nbytes += storage.durable_size(shard_file(self.dir, name, buf.shard))
            # the commit record comes last: a shard whose data did not fully land has no part
            write_part(paths(self.dir)["manifest"], buf.shard, buf.rows, self.targets, self.info["fingerprint"])
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self.dir, e, f"writing shard {buf.shard} (images {buf.start}..{buf.stop - 1})") from e
            raise
        return nbytes
