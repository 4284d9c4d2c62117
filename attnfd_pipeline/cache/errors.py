"""The cache's exceptions, in a module that imports nothing of the package: every cache module raises
them without importing the package ``attnfd_pipeline.cache`` (whose ``__init__`` imports those modules)."""

from __future__ import annotations

import errno
from pathlib import Path


class CacheError(RuntimeError):
    """Anything wrong with a cache: refused values, corrupt or missing data, incompatible config, a
    held lock. The message names the cache and, where it applies, the image id, seed and target."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def is_disk_full(e: BaseException) -> bool:
    """True for an OSError meaning "no space left" (ENOSPC) or "disk quota exceeded" (EDQUOT)."""
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def disk_full_error(cache_dir: str | Path, e: OSError, what: str) -> CacheError:
    """The CacheError for a full disk while ``what``: names the cache path and how to resume."""
    return CacheError(f"{cache_dir}: disk full ({e.strerror or e}) while {what}; nothing of it was committed and "
                      f"every shard committed before is intact. Free disk space on the cache's file system "
                      f"(`attnfd cache plan` shows the space needed) and rerun `attnfd cache build` to resume")
