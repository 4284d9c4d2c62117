"""Reading side, safe in DataLoader workers (docs/method.md "Reading in DataLoader workers").

``CacheReader`` holds only paths, a dict and numpy arrays (no per-row Python objects), opens the Zarr
group lazily on first use in each process and re-opens it after a fork (``os.getpid()`` changes), and
drops the open handles when pickled (spawn / forkserver workers). Every read is checked against the
manifest checksum of that (image, seed, target), with the algorithm ``cache.json`` records. The reader reads
targets and manifest records only: the Stage 2 dataset replays and hash-checks its crops itself
(``data.stage2.replay_cached``).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from attnfd_pipeline.augment import AugmentParams
from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache.encoding import checksum, decode, stored_arrays
from attnfd_pipeline.cache.fingerprint import (cache_dir_for, cache_inputs, cache_root_path, diff_inputs,
                                               fingerprint_of)
from attnfd_pipeline.cache.info import CacheInfo, load_info
from attnfd_pipeline.cache.manifest import list_parts, read_manifest
from attnfd_pipeline.cache.errors import CacheError
from attnfd_pipeline.cache.schema import CHECKSUM_PREFIX, params_from_row, paths
from attnfd_pipeline.cache.shards import ChunkFile
from attnfd_pipeline.cache.storage import Location


_LOOP = threading.local()


def _read_or_error(f: ChunkFile, index: int, aug_seed: int):
    try:
        return f.read(index, aug_seed)
    except (OSError, ValueError) as e:  # a crc32c mismatch, a truncated shard: reported per target
        return e


def _thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop for the reads (one per thread and process, shared by every reader; a forked
    child makes its own instead of using the parent's copy)."""
    if getattr(_LOOP, "pid", None) != os.getpid():
        _LOOP.loop, _LOOP.pid = asyncio.new_event_loop(), os.getpid()
    return _LOOP.loop


class CacheReader:
    """Read targets, augmentation parameters and stored hashes of committed (image, seed) samples."""

    def __init__(self, path: str | Path, *, verify: bool = True):
        self.path = storage.location(path)  # a Path, or the URL of a cache on an fsspec store
        self.verify = verify
        self.info: CacheInfo = load_info(self.path)
        self.fingerprint: str = self.info.fingerprint
        self.targets: tuple[str, ...] = self.info.target_names
        self.num_images: int = self.info.num_images
        self.K: int = self.info.K
        self.encoding: str = self.info.encoding
        table = read_manifest(paths(self.path)["manifest"], self.fingerprint)
        n_slots = self.num_images * self.K
        # row of sample (i, k) in the columns below, -1 where not committed
        self._row = np.full(n_slots, -1, dtype=np.int64)
        self._cols: dict[str, np.ndarray] = {}
        if table is not None:
            idx = table.column("image_index").to_numpy().astype(np.int64)
            seed = table.column("aug_seed").to_numpy().astype(np.int64)
            if (idx >= self.num_images).any() or (seed >= self.K).any() or (idx < 0).any() or (seed < 0).any():
                raise CacheError(f"{self.path}: manifest rows outside (num_images={self.num_images}, K={self.K})")
            self._row[idx * self.K + seed] = np.arange(len(idx))
            for name in table.column_names:
                col = table.column(name)
                if name.startswith(CHECKSUM_PREFIX) or name.endswith("_hash"):
                    self._cols[name] = np.asarray(col.to_pylist(), dtype=np.bytes_)  # hex: 1 byte per char
                elif pa.types.is_string(col.type):
                    self._cols[name] = np.asarray(col.to_pylist(), dtype=str)  # fixed-width unicode, no objects
                else:
                    self._cols[name] = col.to_numpy()
        self.num_committed = int((self._row >= 0).sum())
        self._group = None
        self._arrays: dict = {}
        self._pid = None
        self._local = threading.local()  # per thread: its async array handles

    # -- process-local store handle -------------------------------------------------------------
    def _store(self):
        if self._group is None or self._pid != os.getpid():
            import zarr

            store = storage.zarr_store(paths(self.path)["features"], read_only=True)
            self._group = zarr.open_group(store, mode="r")
            self._arrays = {}
            self._local = threading.local()
            self._pid = os.getpid()
        return self._group

    def _fetch(self, index: int, aug_seed: int, arrays: Sequence[str]) -> list:
        """Chunk (index, aug_seed) of each of ``arrays``. On a local store in the writer's layout, straight from
        the shard files (``cache.shards``: one ``pread`` per chunk, its crc32c, the codec); on a local store
        in any other layout, all at once through zarr's async API in one event-loop run of this thread's own
        loop (one sync round instead of one per array: at the paper's shapes an int8 sample is 9 arrays, and
        the per-read fixed cost dominated); elsewhere (fsspec stores keep their own loop) one ``arr[i, k]``
        after another. Each entry is the
        array or the exception reading it raised."""
        self._store()
        if not storage.is_local(self.path):
            out = []
            for a in arrays:
                try:
                    out.append(self._array(a)[index, aug_seed])
                except Exception as e:  # noqa: BLE001 - reported per target by the caller
                    out.append(e)
            return out
        direct = [self._chunk_file(a) for a in arrays]
        if all(f is not None for f in direct):
            return [_read_or_error(f, index, aug_seed) for f in direct]
        loop, handles = self._loop_and_handles(arrays)

        async def fetch():
            return await asyncio.gather(*(handles[a].getitem((index, aug_seed)) for a in arrays),
                                        return_exceptions=True)

        return loop.run_until_complete(fetch())

    def _chunk_file(self, array: str) -> ChunkFile | None:
        """The direct reader of ``array`` (``cache.shards``), None when its layout is not the writer's own."""
        files = self._local.__dict__.setdefault("files", {})
        if array not in files:
            files[array] = ChunkFile.open(paths(self.path)["features"] / array)
        return files[array]

    def _loop_and_handles(self, arrays: Sequence[str]):
        loop = _thread_loop()
        handles = self._local.__dict__.setdefault("handles", {})
        missing = [a for a in arrays if a not in handles]
        if missing:
            import zarr.api.asynchronous as za

            async def open_all():
                group = await za.open_group(storage.zarr_store(paths(self.path)["features"], read_only=True), mode="r")
                return {a: await group.getitem(a) for a in missing}

            handles.update(loop.run_until_complete(open_all()))
        return loop, handles

    def _array(self, name: str):
        """Array handles are opened once per process: on an object store each re-open is one more request
        (its ``zarr.json``) per target per sample."""
        group = self._store()
        if name not in self._arrays:
            self._arrays[name] = group[name]
        return self._arrays[name]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_group"] = None
        state["_arrays"] = {}
        state["_pid"] = None
        state["_local"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    # -- lookups ---------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.num_committed == self.num_images * self.K

    def has(self, index: int, aug_seed: int) -> bool:
        return 0 <= index < self.num_images and 0 <= aug_seed < self.K and self._row[index * self.K + aug_seed] >= 0

    def _row_of(self, index: int, aug_seed: int) -> int:
        if not (0 <= index < self.num_images and 0 <= aug_seed < self.K):
            raise CacheError(f"{self.path}: sample (index {index}, aug seed {aug_seed}) outside the cache "
                             f"({self.num_images} images × K={self.K})")
        row = int(self._row[index * self.K + aug_seed])
        if row < 0:
            raise CacheError(f"{self.path}: sample (index {index}, aug seed {aug_seed}) is not committed "
                             f"(its shard was never written; resume with `attnfd cache build`)")
        return row

    def image_id(self, index: int, aug_seed: int = 0) -> str:
        return str(self._cols["image_id"][self._row_of(index, aug_seed)])

    def params(self, index: int, aug_seed: int) -> AugmentParams:
        """The augmentation this sample's targets were computed on."""
        return params_from_row(self._cols, self._row_of(index, aug_seed))

    def hashes(self, index: int, aug_seed: int) -> tuple[str, str]:
        """(image_hash, label_hash) of the augmented uint8 crop the teacher saw."""
        row = self._row_of(index, aug_seed)
        return self._cols["image_hash"][row].decode(), self._cols["label_hash"][row].decode()

    def read(self, index: int, aug_seed: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """``(C, H, W)`` targets of sample (index, aug_seed), checksum-verified: float16 as stored, or
        float32 dequantised from an int8 cache."""
        return {name: decode(self.encoding, parts) for name, parts in self.read_stored(index, aug_seed, names).items()}

    def read_stored(self, index: int, aug_seed: int, names: Sequence[str] | None = None) -> dict[str, list[np.ndarray]]:
        """The stored arrays of each target of sample (index, aug_seed) (``encoding.stored_arrays`` order:
        float16 values, or uint8 codes, float32 scales, float32 offsets), checksum-verified."""
        row = self._row_of(index, aug_seed)
        names = self.targets if names is None else tuple(names)
        for name in names:
            if name not in self.targets:
                raise CacheError(f"{self.path}: no target {name!r} in this cache (has {', '.join(self.targets)})")
        layout = {name: [a for a, _ in stored_arrays(name, self.encoding)] for name in names}
        got = iter(self._fetch(index, aug_seed, [a for arrays in layout.values() for a in arrays]))
        out = {}
        for name, arrays in layout.items():
            parts = [next(got) for _ in arrays]
            failed = next((p for p in parts if isinstance(p, BaseException)), None)
            if failed is not None:  # crc32c mismatch, truncated shard …
                raise CacheError(f"{self.path}: unreadable data for {self._where(row, index, aug_seed, name)}: "
                                 f"{failed}") from None
            if self.verify and checksum(parts, self.info.checksum).encode() != self._cols[CHECKSUM_PREFIX + name][row]:
                raise CacheError(f"{self.path}: checksum mismatch for {self._where(row, index, aug_seed, name)} "
                                 f"(data changed after it was written)")
            out[name] = parts
        return out

    def _where(self, row: int, index: int, aug_seed: int, name: str) -> str:
        """The sample and target an error names (formatted only when there is one: reads are the hot path)."""
        return f"image {str(self._cols['image_id'][row])!r} (index {index}), aug seed {aug_seed}, target {name!r}"

    @property
    def augment_impl(self) -> int:
        """The augmentation implementation the cache was built with (``augment.impl``; absent: 1)."""
        return int(self.info.augment.get("impl", 1))

    def augment_config(self):
        """The AugmentConfig the cache was built with (from cache.json)."""
        from attnfd_pipeline.config import AugmentConfig, from_dict

        return from_dict(AugmentConfig, self.info.augment, "cache.json inputs.augment")

    def manifest(self) -> pa.Table:
        """All committed rows (sorted by image index, seed); an empty table when nothing is committed."""
        table = read_manifest(paths(self.path)["manifest"], self.fingerprint)
        if table is None:
            from attnfd_pipeline.cache.schema import manifest_schema

            return manifest_schema(self.targets, self.fingerprint, 0).empty_table()
        return table

    def __len__(self) -> int:
        return self.num_committed

    def __repr__(self) -> str:
        return (f"CacheReader({str(self.path)!r}, {self.num_committed}/{self.num_images * self.K} samples, "
                f"targets {list(self.targets)})")


# -----------------------------------------------------------------------------------------------
# finding a cache from a config, and checking a cache fits a config


def find_cache(cfg, teacher: Any, source: Any, *, require_complete: bool = False) -> Location:
    """The cache directory of ``cfg`` for ``teacher`` (object, info dict or sha256 — the teacher is never
    loaded) and ``source`` (object or identity dict): a ``Path``, or the URL on an fsspec store. Raises
    CacheError if absent or incomplete."""
    fp = fingerprint_of(cache_inputs(cfg, teacher, source))
    d = cache_dir_for(cfg, fp)
    if not storage.is_file(paths(d)["info"]):
        others = list_caches(cfg.cache.root)
        hint = ""
        if others:
            hint = f"; caches under {cfg.cache.root}: " + ", ".join(storage.name(p) for p in others)
        raise CacheError(f"no cache {d} for this config/teacher/dataset (fingerprint {fp[:16]}); "
                         f"run `attnfd cache build`{hint}")
    info = load_info(d)
    if info.fingerprint != fp:
        raise CacheError(f"{d}: cache.json fingerprint {info.fingerprint[:16]} does not match its "
                         f"directory ({fp[:16]})")
    if require_complete:
        n = committed_count(d)
        if n < info.num_shards:
            raise CacheError(f"{d}: incomplete cache ({n}/{info.num_shards} shards committed); "
                             f"resume with `attnfd cache build`")
    return d


def list_caches(root: str | Path) -> list[Location]:
    root = cache_root_path(root)
    found = (storage.join(root, name) for name in sorted(storage.listdir(root)))
    return [d for d in found if storage.is_file(paths(d)["info"])]


def committed_count(cache_dir: str | Path) -> int:
    return len(list_parts(paths(cache_dir)["manifest"]))


def check_compatible(cfg, info: CacheInfo | dict | str | Path, *, teacher: Any = None, source: Any = None) -> None:
    """Raise CacheError naming every field where the cache (its ``CacheInfo``, ``cache.json`` dict or directory)
    differs from what ``cfg`` would produce. Teacher and dataset are compared only when given."""
    if isinstance(info, dict):
        info = CacheInfo.from_json(info)
    elif not isinstance(info, CacheInfo):
        info = load_info(info)
    recorded = dict(info.inputs)
    expected = cache_inputs(cfg, teacher if teacher is not None else recorded["teacher_sha256"],
                            source if source is not None else recorded["dataset"])
    diffs = diff_inputs(recorded, expected)
    if diffs:
        raise CacheError(f"cache {info.fingerprint[:16]} does not match the config:\n  " + "\n  ".join(diffs))


def describe_cache(cache_dir: str | Path) -> dict:
    """Summary for ``attnfd cache info``: size on disk, shapes, fingerprint, completeness, codec."""
    d = storage.location(cache_dir)
    info = load_info(d)
    N, K, S = info.num_images, info.K, info.shard_size
    targets = {}
    for name in info.target_names:
        t = info.targets[name]
        nbytes = sum(sum(storage.files(storage.join(paths(d)["features"], array)).values())
                     for array, _ in stored_arrays(name, info.encoding))
        targets[name] = {"shape": [N, K, *t.chw], "stride": t.stride, "bytes_on_disk": nbytes,
                         "stored_bytes_per_sample": t.bytes_per_sample,
                         "float16_bytes_per_sample": int(np.prod(t.chw)) * 2, "pool": t.pool}
    parts = list_parts(paths(d)["manifest"])
    committed = len(parts)
    return {
        "path": str(d),
        "fingerprint": info.fingerprint,
        "size_bytes": sum(storage.files(d).values()),
        "targets": targets,
        "num_images": N,
        "K": K,
        "shards_committed": committed,
        "shards_total": info.num_shards,
        "complete": committed == info.num_shards,
        "codec": info.codec,
        "level": info.level,
        "dtype": info.dtype,
        "mantissa_bits": info.mantissa_bits,
        "encoding": info.encoding,
        "pool": {n: f for n, (f, _, _) in info.pools.items()},
        "float16_bytes_per_sample": sum(t["float16_bytes_per_sample"] for t in targets.values()),
        "samples_committed": sum(max(0, min(N, (s + 1) * S) - s * S) * K for s in parts),
        "teacher_sha256": info.teacher_sha256,
        "dataset": info.dataset,
    }


__all__ = ["CacheReader", "find_cache", "check_compatible", "describe_cache", "list_caches"]
