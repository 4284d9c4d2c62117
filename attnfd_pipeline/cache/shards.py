"""One sample's chunk read straight from its shard file, for the layout the cache writer creates — the Stage 2
hot path on a local store.

The read path at the paper's shapes is 3 (float16) or 9 (int8) chunk reads per sample, and zarr-python's
per-read machinery (selection, codec pipeline, event loop, a file read for the shard index and one for the
chunk) cost more host CPU than the bytes themselves. Every step here is the Zarr v3 specification's
``sharding_indexed`` codec with ``index_location = "end"`` (docs/cache-format.md "Reading a sample"):

- the shard's index — ``(offset, nbytes)`` as little-endian uint64 per inner chunk, C order, then its crc32c —
  is read once per shard file and kept (a few kB);
- the chunk is one ``pread`` of its bytes: crc32c checked (the last 4 bytes), then decompressed by the
  codec's own library (numcodecs' zstd or blosc, what zarr itself calls) into a writable array;
- a missing shard file or an empty index entry gives the fill value, as zarr does.

``ChunkFile.open`` accepts only metadata it understands exactly (any other layout, codec or option: None,
and the reader keeps zarr); ``attnfd cache verify`` still reads through zarr, an independent check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

EMPTY = 2 ** 64 - 1  # offset and nbytes of an inner chunk that was never written
DTYPES = {"float16": "<f2", "float32": "<f4", "uint8": "u1"}
MAX_INDEXES = 4096  # shard indexes kept per array before the cache is dropped (each is S·K·16 bytes)


class ChunkFile:
    """Reads chunk ``(i, k)`` (one sample: the rest of the chunk is the whole ``(C, H, W)`` or ``(C,)``) of one
    sharded array of a local cache."""

    def __init__(self, array_dir: Path, dtype: str, shape: tuple, shard: tuple, inner: tuple, compressor: str | None,
                 fill):
        self.dir, self.dtype, self.shape, self.shard, self.inner = array_dir, np.dtype(dtype), shape, shard, inner
        self.compressor, self.fill = compressor, fill
        self.per_shard = int(np.prod([s // c for s, c in zip(shard, inner)]))
        self.nbytes = int(np.prod(inner)) * self.dtype.itemsize
        self._indexes: dict[tuple, np.ndarray | None] = {}
        self._codec = None

    @classmethod
    def open(cls, array_dir: Path) -> "ChunkFile | None":
        """The reader of ``array_dir`` (a Zarr v3 array folder), or None when its metadata is anything but the
        layout the writer creates."""
        try:
            meta = json.loads((array_dir / "zarr.json").read_text())
            return cls._from_meta(array_dir, meta)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None

    @classmethod
    def _from_meta(cls, array_dir: Path, meta: dict) -> "ChunkFile | None":
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers"):
            return None
        key = meta["chunk_key_encoding"]
        if key["name"] != "default" or key.get("configuration", {}).get("separator", "/") != "/":
            return None
        if meta["data_type"] not in DTYPES or meta["chunk_grid"]["name"] != "regular" or len(meta["codecs"]) != 1:
            return None
        sharding = meta["codecs"][0]
        conf = sharding.get("configuration", {})
        if sharding["name"] != "sharding_indexed" or conf.get("index_location", "end") != "end":
            return None
        if [c["name"] for c in conf["index_codecs"]] != ["bytes", "crc32c"] or not _little(conf["index_codecs"][0]):
            return None
        codecs = conf["codecs"]
        names = [c["name"] for c in codecs]
        if names[0] != "bytes" or not _little(codecs[0]) or names[-1] != "crc32c" or len(names) not in (2, 3):
            return None
        compressor = names[1] if len(names) == 3 else None
        if compressor not in (None, "zstd", "blosc"):
            return None
        shape = tuple(meta["shape"])
        shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        inner = tuple(conf["chunk_shape"])
        if len(shape) < 3 or inner[:2] != (1, 1) or inner[2:] != shape[2:] or shard[2:] != shape[2:]:
            return None
        fill = meta["fill_value"]
        fill = float("nan") if fill == "NaN" else fill
        if not isinstance(fill, (int, float)):
            return None
        return cls(array_dir, DTYPES[meta["data_type"]], shape, shard, inner, compressor, fill)

    def read(self, i: int, k: int) -> np.ndarray:
        """Chunk (i, k) as a writable ``inner[2:]`` array; ValueError when a crc32c does not match."""
        coords = (i // self.shard[0], k // self.shard[1]) + (0,) * (len(self.shape) - 2)
        path = self.dir / "c" / "/".join(str(c) for c in coords)
        pos = (i % self.shard[0]) * (self.shard[1] // self.inner[1]) + (k % self.shard[1])
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # no shard file: every chunk in it is the fill value
            return self._filled()
        try:
            index = self._index(fd, coords, path)
            offset, nbytes = (int(v) for v in index[pos])
            if offset == EMPTY and nbytes == EMPTY:
                return self._filled()
            buf = np.empty(nbytes, np.uint8)
            if os.preadv(fd, [buf], offset) != nbytes:
                raise ValueError(f"{path}: truncated shard (chunk {pos} at {offset}+{nbytes})")
        finally:
            os.close(fd)
        data = buf[:-4]
        _check_crc(data, buf[-4:].tobytes(), f"{path}: chunk {pos}")
        return self._decode(data).reshape(self.inner[2:])

    def _index(self, fd: int, coords: tuple, path: Path) -> np.ndarray:
        index = self._indexes.get(coords)
        if index is None:
            n = self.per_shard * 16 + 4
            size = os.fstat(fd).st_size
            tail = os.pread(fd, n, size - n) if size >= n else b""
            if len(tail) != n:
                raise ValueError(f"{path}: truncated shard (no index)")
            _check_crc(np.frombuffer(tail, np.uint8)[:-4], tail[-4:], f"{path}: shard index")
            index = np.frombuffer(tail[:-4], dtype="<u8").reshape(self.per_shard, 2)
            if len(self._indexes) >= MAX_INDEXES:
                self._indexes.clear()
            self._indexes[coords] = index
        return index

    def _decode(self, data: np.ndarray) -> np.ndarray:
        if self.compressor is None:
            if len(data) != self.nbytes:
                raise ValueError(f"chunk of {len(data)} bytes, expected {self.nbytes}")
            return data.view(self.dtype)  # a view of the buffer read: writable, no copy
        if self._codec is None:
            from numcodecs import Blosc, Zstd

            self._codec = Zstd() if self.compressor == "zstd" else Blosc()
        out = np.empty(self.nbytes, np.uint8)
        self._codec.decode(data, out=out)
        return out.view(self.dtype)

    def _filled(self) -> np.ndarray:
        return np.full(self.inner[2:], self.fill, dtype=self.dtype)


def _little(codec: dict) -> bool:
    return codec.get("configuration", {}).get("endian", "little") == "little"


def _check_crc(data, stored: bytes, where: str) -> None:
    import google_crc32c

    if google_crc32c.value(data) != int.from_bytes(stored, "little"):
        raise ValueError(f"{where}: stored and computed crc32c do not match")
