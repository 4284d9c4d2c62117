"""A build lock: one writer per (cache, rank). Created with O_EXCL and holding pid + host; a lock whose
process is dead on this host is stale and taken over; a live one makes the build refuse (or wait)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from attnfd_pipeline.cache.schema import CacheError


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
    """Context manager around an exclusive lock file."""

    def __init__(self, path: str | Path, *, wait: float = 0.0, poll: float = 0.5):
        self.path = Path(path)
        self.wait, self.poll = wait, poll
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return None

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> "BuildLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait
        while True:
            if self._try_create():
                self.held = True
                return self
            holder = self._holder()
            if holder is None:
                # being written right now, or garbage: give a writer a moment, then treat as stale
                time.sleep(0.05)
                if self._holder() is None and self.path.exists():
                    self._take_over(None)
                continue
            same_host = holder.get("host") == socket.gethostname()
            if same_host and not _pid_alive(int(holder.get("pid", -1))):
                self._take_over(holder)
                continue
            if time.monotonic() >= deadline:
                raise CacheError(f"{self.path.parent}: cache is being built by pid {holder.get('pid')} on host "
                                 f"{holder.get('host')} (lock {self.path}); wait for it, or delete the lock file if "
                                 f"that process is gone")
            time.sleep(self.poll)

    def _take_over(self, holder: dict | None) -> None:
        # rename first so two processes taking over the same stale lock cannot both succeed
        stale = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        try:
            os.replace(self.path, stale)
        except FileNotFoundError:
            return
        got = self._holder_at(stale)
        if holder is not None and got is not None and got != holder:
            # someone else created a fresh lock between our read and the rename: put it back
            try:
                os.link(stale, self.path)
            except FileExistsError:
                pass
        stale.unlink(missing_ok=True)

    @staticmethod
    def _holder_at(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return None

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
