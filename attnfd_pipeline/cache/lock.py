"""A build lock: one writer per (cache, rank). Created exclusively (O_EXCL locally, ``fs.open(path, "xb")``
on an fsspec store — ``storage.create_exclusive``) and holding pid + host; on a local file system a lock
whose process is dead on this host is stale and taken over; a live one (and on an object store any one)
makes the build refuse (or wait), naming how to remove a stale lock."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache.errors import CacheError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_alive(holder: dict | None) -> bool:
    """Whether the process named by a lock's content may still be writing: one on this host is alive iff
    its pid is; one on another host cannot be checked and counts as alive; no content counts as alive
    (the file is being written this instant)."""
    if holder is None:
        return True
    if holder.get("host") != socket.gethostname():
        return True
    try:
        pid = int(holder.get("pid", -1))
    except (TypeError, ValueError):
        return False
    return pid > 0 and _pid_alive(pid)


class BuildLock:
    """Context manager around an exclusive lock file (an exclusively created object on an fsspec store)."""

    def __init__(self, path: str | Path, *, wait: float = 0.0, poll: float = 0.5):
        self.path = storage.location(path)
        self.wait, self.poll = wait, poll
        self.held = False

    def _holder(self) -> dict | None:
        return self.holder_at(self.path)

    def _try_create(self) -> bool:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        return storage.create_exclusive(self.path, json.dumps(me).encode())

    def acquire(self) -> "BuildLock":
        storage.makedirs(storage.parent(self.path))
        takeover = storage.takes_over_stale_locks(self.path)
        deadline = time.monotonic() + self.wait
        while True:
            if self._try_create():
                self.held = True
                return self
            holder = self._holder()
            if holder is None:
                # being written right now, or garbage: give a writer a moment, then treat as stale
                time.sleep(0.05)
                holder = self._holder()
                if holder is not None or not storage.exists(self.path):
                    continue
                if takeover:
                    self._take_over(None)
                    continue
            elif takeover and holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
                self._take_over(holder)
                continue
            if time.monotonic() >= deadline:
                raise CacheError(self._held_message(holder))
            time.sleep(self.poll)

    def _held_message(self, holder: dict | None) -> str:
        holder = holder or {}
        return (f"{storage.parent(self.path)}: cache is being built by pid {holder.get('pid')} on host "
                f"{holder.get('host')} (lock {self.path}); wait for it, or {storage.stale_lock_hint(self.path)}")

    def _take_over(self, holder: dict | None) -> None:
        # local file systems only (storage.takes_over_stale_locks): rename first so two processes taking
        # over the same stale lock cannot both succeed
        stale = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        try:
            os.replace(self.path, stale)
        except FileNotFoundError:
            return
        got = self.holder_at(stale)
        if holder is not None and got is not None and got != holder:
            # someone else created a fresh lock between our read and the rename: put it back
            try:
                os.link(stale, self.path)
            except FileExistsError:
                pass
        stale.unlink(missing_ok=True)

    @staticmethod
    def holder_at(path: str | Path) -> dict | None:
        """The holder record (pid, host, time) of the lock file at ``path``; None if absent or unreadable."""
        try:
            return json.loads(storage.read_bytes(storage.location(path)))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, OSError):
            return None

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid():
                storage.remove(self.path)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
