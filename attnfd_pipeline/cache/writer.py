"""Writing side: create the store's metadata once, then commit whole shards from a background thread.

Each shard is buffered in full (S images × K seeds, already in its stored form: the build encodes on the
teacher's device, ``encoding.encode``) and handed to ``ShardWriter``, whose thread does the per-sample
checksums, compression and I/O (``arr[s0:s1] = buf``, one slice per stored array), and finally writes the
shard's manifest part — the commit record. The bounded queue lets the teacher run on the next shard while the
previous one is compressed and written (whole-shard writes are ~10× faster than per-sample writes, and
two writers in one shard lose data: docs/method.md "Concurrent writes").
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache.encoding import (OFFSET_SUFFIX, SCALE_SUFFIX, checksum, effective_mantissa_bits, lossy_steps,
                                            stored_arrays)
from attnfd_pipeline.cache.info import CacheInfo, load_info
from attnfd_pipeline.cache.manifest import write_part
from attnfd_pipeline.cache.errors import CacheError, disk_full_error, is_disk_full
from attnfd_pipeline.cache.schema import CHECKSUM_PREFIX, DTYPE, FEATURES_DIR, FILL_VALUE, compressors, paths
from attnfd_pipeline.cache.storage import Location
from attnfd_pipeline.utils import atomic_write_json


def array_attributes(info: CacheInfo, name: str, array: str | None = None, dtype: str = DTYPE) -> dict:
    """Attributes of ``array`` (default: the target's main array) storing target ``name``."""
    t = info.targets[name]
    encoding, pool = info.encoding, t.pool
    attrs = {
        "target": name,
        "kind": t.kind,
        "point": t.point,
        "stride": t.stride,
        "layout": ["image", "aug_seed", "channel", "y", "x"],
        "dtype": dtype,
        "source_dtype": "float32",
        "lossy": lossy_steps(info.mantissa_bits, encoding, pool),
        "mantissa_bits": effective_mantissa_bits(info.mantissa_bits),
        "fill_value_meaning": "NaN = sample never written (its shard is not committed)",
        "fingerprint": info.fingerprint,
    }
    if encoding != "float16" or pool > 1:  # attributes of float16 caches stay as they were
        attrs.update(encoding=encoding, pool=pool, full_chw=list(t.teacher_chw))
    if encoding == "int8":
        role = {name: "codes", name + SCALE_SUFFIX: "scale", name + OFFSET_SUFFIX: "offset"}[array or name]
        attrs.update(role=role, decode=f"{name} = {name}{OFFSET_SUFFIX} + {name} (uint8 code) * {name}{SCALE_SUFFIX}, "
                                       f"per (image, aug_seed, channel)")
        del attrs["mantissa_bits"]
        if role == "codes":
            attrs["fill_value_meaning"] = (f"codes are 0 where never written; {name}{SCALE_SUFFIX} is NaN there, "
                                           f"so a missing sample decodes to NaN")
        else:
            attrs["layout"] = ["image", "aug_seed", "channel"]
    return attrs


def _array_specs(info: CacheInfo, name: str
                 ) -> list[tuple[str, str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(array, dtype, shape, chunk, shard) of every array storing target ``name``."""
    N, K, S = info.num_images, info.K, info.shard_size
    C, H, W = info.targets[name].chw
    out = []
    for array, dtype in stored_arrays(name, info.encoding):
        if array == name:
            out.append((array, dtype, (N, K, C, H, W), (1, 1, C, H, W), (S, K, C, H, W)))
        else:  # per (sample, channel) scale / offset
            out.append((array, dtype, (N, K, C), (1, 1, C), (S, K, C)))
    return out


def create_store(cache_dir: str | Path, info: CacheInfo) -> None:
    """Create the Zarr group and one array per target if missing, then ``cache.json``. Idempotent and
    deterministic (no timestamps), so every writer may call it; an existing ``cache.json`` must agree."""
    import zarr

    p = paths(cache_dir)
    storage.makedirs(p["dir"])
    storage.makedirs(p["manifest"])
    if storage.is_file(p["info"]):
        recorded = load_info(p["dir"])
        for key in ("fingerprint", "target_names", "targets", "num_images"):
            if getattr(recorded, key) != getattr(info, key):
                raise CacheError(f"{p['info']}: recorded {key} differs from this build's "
                                 f"({getattr(recorded, key)!r} vs {getattr(info, key)!r}); the cache directory is "
                                 f"not consistent with its fingerprint — remove it and rebuild")
    group = zarr.open_group(storage.zarr_store(p["features"], read_only=False), mode="a",
                            attributes={"format": info.format, "fingerprint": info.fingerprint})
    existing = set(group.array_keys())
    for name in info.target_names:
        for array, dtype, shape, chunk, shard in _array_specs(info, name):
            if array in existing:
                arr = group[array]
                if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
                    raise CacheError(f"{storage.join(p['features'], array)}: shape {arr.shape} / {arr.dtype} differs "
                                     f"from the expected {shape} {dtype}")
                continue
            dims = ["image", "aug_seed", "channel", "y", "x"][:len(shape)]
            try:
                group.create_array(array, shape=shape, dtype=dtype, chunks=chunk, shards=shard,
                                   compressors=compressors(info.codec, info.level, np.dtype(dtype).itemsize),
                                   fill_value=0 if dtype == "uint8" else FILL_VALUE,
                                   attributes=array_attributes(info, name, array, dtype), dimension_names=dims)
            except Exception as e:  # another writer created it between our listing and now
                if "exist" not in str(e).lower():
                    raise
    if not storage.is_file(p["info"]):
        storage.write_json(p["info"], info.to_json(), local=atomic_write_json)


def shard_file(cache_dir: str | Path, name: str, shard: int, ndim: int = 5) -> Location:
    """The file (object) holding shard ``shard`` of array ``name`` (default v3 chunk keys; ``ndim`` 3 for
    the per-channel scale / offset arrays of int8 targets)."""
    return storage.join(storage.location(cache_dir), FEATURES_DIR, name, "c", str(shard), *["0"] * (ndim - 1))


@dataclass
class ShardBuffer:
    """One shard's stored arrays (``encoding.stored_arrays`` of each target: (n_images, K, …), as written) and
    manifest rows (sorted by image index then seed; checksums filled in by the writer). ``encoded_on``:
    the device kind that encoded them (recorded in the manifest part)."""

    shard: int
    start: int
    stop: int
    arrays: dict[str, np.ndarray]
    rows: list[dict] = field(default_factory=list)
    encoded_on: str = "cpu"


_STOP = object()


class ShardWriter:
    """Background thread committing ``ShardBuffer``s: checksums, one slice write per stored array, then the
    manifest part. Errors are re-raised in the submitting thread."""

    def __init__(self, cache_dir: str | Path, info: CacheInfo, *, rank: int = 0, max_queue: int = 1,
                 on_commit: Callable[[ShardBuffer, int, float], None] | None = None):
        import zarr

        self.dir = storage.location(cache_dir)
        self.info = info
        self.rank = rank
        self.targets: Sequence[str] = list(info.target_names)
        group = zarr.open_group(storage.zarr_store(paths(self.dir)["features"], read_only=False), mode="r+")
        self.encoding = info.encoding
        self.arrays = {array: group[array] for name in self.targets for array, _ in stored_arrays(name, self.encoding)}
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
        n, K = buf.stop - buf.start, self.info.K
        for name in self.targets:
            parts = [buf.arrays[array].reshape(n * K, *buf.arrays[array].shape[2:])
                     for array, _ in stored_arrays(name, self.encoding)]
            for j, row in enumerate(buf.rows):  # rows (image, seed) in order: row j is sample j of the shard
                row[CHECKSUM_PREFIX + name] = checksum([p[j] for p in parts], self.info.checksum)
        converted = {array: buf.arrays[array] for name in self.targets for array, _ in stored_arrays(name, self.encoding)}
        for row in buf.rows:
            row["rank"] = self.rank
        nbytes = 0
        try:
            for array, y in converted.items():  # all checks passed before anything is written
                self.arrays[array][buf.start:buf.stop] = y
                # durable before the commit record that vouches for it
                nbytes += storage.durable_size(shard_file(self.dir, array, buf.shard, y.ndim))
            # the commit record comes last: a shard whose data did not fully land has no part
            write_part(paths(self.dir)["manifest"], buf.shard, buf.rows, self.targets, self.info.fingerprint,
                       meta={"encoded_on": buf.encoded_on, "checksum": self.info.checksum})
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(self.dir, e, f"writing shard {buf.shard} (images {buf.start}..{buf.stop - 1})") from e
            raise
        return nbytes
