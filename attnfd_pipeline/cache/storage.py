"""Where a cache lives — a local directory or an fsspec store. The only module that knows which.

A *location* is a ``Path`` (local: a plain path or a ``file://`` URL, e.g. a shared NFS/Lustre mount) or
a ``str`` URL of any other fsspec store zarr accepts (``s3://bucket/prefix``, ``gs://…``, ``memory://…``).

The commit protocol is the same on both, only its primitives differ:

| primitive | local directory | fsspec store |
| --- | --- | --- |
| metadata / manifest part | temp file + fsync + rename | one whole-object put (visible whole or not at all) |
| build lock | ``O_EXCL`` create | exclusive create (``fs.open(path, "xb")``), where the backend gives one |
| Zarr arrays | ``zarr.storage.LocalStore`` (renames, does not fsync: we fsync) | ``zarr.storage.FsspecStore`` |
| Parquet manifest read | the file | ``pyarrow.fs.PyFileSystem(FSSpecHandler(fs))`` |

On both, a shard's data is written before its manifest part, and the part is the commit record.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import Any, Union

from attnfd_pipeline.cache.errors import CacheError
from attnfd_pipeline.utils import atomic_write_bytes, atomic_write_json

Location = Union[Path, str]

LOCAL_PROTOCOLS = (None, "file", "local")
# backends whose exclusive create ("xb") is one conditional request (S3 If-None-Match, GCS
# ifGenerationMatch=0, Azure overwrite=False) or a check inside one process (memory)
EXCLUSIVE_CREATE = frozenset({"memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # pyproject optional extras


def _protocol(url: str) -> str | None:
    from fsspec.core import split_protocol

    return split_protocol(url)[0]


def location(root: str | Path, what: str | None = None) -> Location:
    """``root`` as a location: a ``Path`` for local roots, else the URL (no trailing slash), after checking
    that fsspec knows the protocol and its backend is installed. ``what`` names the setting in errors."""
    if isinstance(root, Path):
        return root
    from fsspec.core import split_protocol

    protocol, rest = split_protocol(str(root))
    if protocol in LOCAL_PROTOCOLS:
        return Path(rest)
    _check_backend(protocol, f"{what} = {root!r}" if what else repr(str(root)))
    return str(root).rstrip("/")


def _check_backend(protocol: str, where: str) -> None:
    import fsspec
    from fsspec.registry import known_implementations

    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        extra = EXTRAS.get(protocol)
        install = (f"pip install 'attnfd-pipeline[{extra}]'" if extra else
                   known_implementations.get(protocol, {}).get("err") or str(e))
        raise CacheError(f"{where}: the fsspec backend for {protocol}:// is not installed ({e}); install it: "
                         f"{install}") from None
    except ValueError:
        raise CacheError(f"{where}: fsspec knows no protocol {protocol!r}; use a local path, a file:// URL or an "
                         f"fsspec URL such as s3://bucket/prefix or gs://bucket/prefix") from None


def is_local(loc: Location) -> bool:
    return isinstance(loc, Path)


def _fs(url: str):
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def join(loc: Location, *parts: str) -> Location:
    if is_local(loc):
        return loc.joinpath(*parts)
    return "/".join([loc.rstrip("/"), *parts])


def name(loc: Location) -> str:
    return loc.name if is_local(loc) else loc.rstrip("/").rsplit("/", 1)[-1]


def parent(loc: Location) -> Location:
    return loc.parent if is_local(loc) else loc.rstrip("/").rsplit("/", 1)[0]


def exists(loc: Location) -> bool:
    if is_local(loc):
        return loc.exists()
    fs, path = _fs(loc)
    return fs.exists(path)


def is_file(loc: Location) -> bool:
    if is_local(loc):
        return loc.is_file()
    fs, path = _fs(loc)
    return fs.isfile(path)


def listdir(loc: Location) -> list[str]:
    """Names directly under ``loc`` (empty if it does not exist). Remote listings are re-read, never cached:
    other writers add manifest parts."""
    if is_local(loc):
        return [p.name for p in loc.iterdir()] if loc.is_dir() else []
    fs, path = _fs(loc)
    fs.invalidate_cache(path)
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def files(loc: Location) -> dict[str, int]:
    """Every file below ``loc``: relative POSIX path → size in bytes."""
    if is_local(loc):
        if not loc.is_dir():
            return {}
        return {p.relative_to(loc).as_posix(): p.stat().st_size for p in sorted(loc.rglob("*")) if p.is_file()}
    fs, path = _fs(loc)
    fs.invalidate_cache(path)
    root = path.rstrip("/") + "/"
    found = fs.find(path, detail=True)
    return {k[len(root):]: int(v.get("size") or 0) for k, v in sorted(found.items()) if k.startswith(root)}


def makedirs(loc: Location) -> None:
    """Create a local directory (and its parents); object stores have no directories to create."""
    if is_local(loc):
        loc.mkdir(parents=True, exist_ok=True)


def read_bytes(loc: Location) -> bytes:
    """The whole file; ``FileNotFoundError`` if absent."""
    if is_local(loc):
        return loc.read_bytes()
    fs, path = _fs(loc)
    return fs.cat_file(path)


def write_bytes(loc: Location, data: bytes, *, local: Callable[[Path, bytes], Any] = atomic_write_bytes) -> None:
    """Publish ``data`` at ``loc`` so no reader (and no crash) ever sees part of it: locally ``local(path,
    data)`` (temp + fsync + rename; callers pass the name their module resolves, the seam the failure-
    injection tests patch); on an object store, one whole-object put."""
    if is_local(loc):
        local(loc, data)
        return
    fs, path = _fs(loc)
    fs.pipe_file(path, data)


def write_json(loc: Location, obj: Any, *, local: Callable[[Path, Any], Any] = atomic_write_json) -> None:
    """``write_bytes`` of ``obj`` as indented, key-sorted JSON (``utils.atomic_write_json``'s format)."""
    if is_local(loc):
        local(loc, obj)
        return
    write_bytes(loc, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def remove(loc: Location) -> None:
    """Delete a file; absent is fine."""
    if is_local(loc):
        loc.unlink(missing_ok=True)
        return
    fs, path = _fs(loc)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def create_exclusive(loc: Location, data: bytes) -> bool:
    """Create ``loc`` holding ``data`` unless it exists (then False), atomically against other creators:
    ``O_EXCL`` + fsync locally, ``fs.open(path, "xb")`` on a backend that implements it."""
    if is_local(loc):
        try:
            fd = os.open(loc, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    protocol = _protocol(loc)
    if protocol not in EXCLUSIVE_CREATE:
        raise CacheError(f"{loc}: building a cache needs an exclusive create for its lock, which the fsspec "
                         f"{protocol}:// backend does not promise (known to: {', '.join(sorted(EXCLUSIVE_CREATE))}). "
                         f"Build on a local or shared file system (or one of those stores) and copy the finished "
                         f"cache here; reading it from {protocol}:// works")
    fs, path = _fs(loc)
    try:
        with fs.open(path, "xb") as f:  # S3/GCS/Azure: the check is the final conditional put
            f.write(data)
    except FileExistsError:
        return False
    return True


def stale_lock_hint(loc: Location) -> str:
    """How to remove a lock whose holder is gone."""
    if is_local(loc):
        return "delete the lock file if that process is gone"
    return (f"remove the lock object if that process is gone (a lock on {_protocol(loc)}:// is never taken over "
            f"automatically): python -c \"import fsspec; fs, p = fsspec.core.url_to_fs('{loc}'); fs.rm_file(p)\"")


def takes_over_stale_locks(loc: Location) -> bool:
    """Stale locks are taken over only where rename is atomic (local file systems): on an object store
    two processes deleting and re-creating the same stale lock could both end up holding it."""
    return is_local(loc)


def durable_size(loc: Location) -> int:
    """Size of a file just written through zarr, made durable first (0 if there is none): zarr's
    LocalStore renames without fsync, so fsync it; a completed object-store put is already durable."""
    if is_local(loc):
        if not loc.exists():
            return 0
        fd = os.open(loc, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return loc.stat().st_size
    fs, path = _fs(loc)
    try:
        return int(fs.size(path) or 0)
    except FileNotFoundError:
        return 0


def free_bytes(loc: Location) -> int | None:
    """Free space on the file system that holds (or will hold) ``loc``; None on object stores (no fixed
    capacity to check against)."""
    if not is_local(loc):
        return None
    p = loc.absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def zarr_store(loc: Location, *, read_only: bool):
    """What ``zarr.open_group`` gets: the path itself locally (zarr opens its LocalStore, as it always
    did), a ``zarr.storage.FsspecStore`` otherwise."""
    if is_local(loc):
        return loc
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(loc, read_only=read_only)


def parquet_source(loc: Location) -> tuple[Any, Any]:
    """``(where, filesystem)`` for ``pyarrow.parquet.read_table`` / ``read_schema``."""
    if is_local(loc):
        return loc, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = _fs(loc)
    return path, PyFileSystem(FSSpecHandler(fs))
