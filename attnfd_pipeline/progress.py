"""A dependency-free progress line: count, rate, extra throughput figures and ETA.

Writes to stderr with carriage returns on a terminal and one line every ``log_every`` seconds when
stderr is a file (CI logs), so long runs stay readable in both.
"""

from __future__ import annotations

import sys
import time


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total: int, desc: str = "", unit: str = "it", *, stream=None, log_every: float = 10.0,
                 enabled: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every = 0.2 if self.tty else log_every
        self.enabled = enabled
        self.n = 0
        self.start = self._last = time.perf_counter()
        self.postfix: dict[str, str] = {}
        self._shown = -1  # count at the last printed line
        self.counters: dict[str, float] = {}

    def update(self, n: int = 1, *, counters: dict[str, float] | None = None, **postfix) -> None:
        """Advance by ``n``; ``counters`` (e.g. {"MB": 1.2}) accumulate and are shown as rates."""
        self.n += n
        for k, v in (counters or {}).items():
            self.counters[k] = self.counters.get(k, 0.0) + v
        self.postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in postfix.items()})
        now = time.perf_counter()
        if now - self._last >= self.log_every or self.n >= self.total:
            self._last = now
            self._render(final=False)

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.n / elapsed
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}", f"{rate:.2f} {self.unit}/s"]
        parts += [f"{v / elapsed:.2f} {k}/s" for k, v in self.counters.items()]
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        parts.append(f"elapsed {_fmt_time(elapsed)} eta {_fmt_time(eta)}")
        return " | ".join(parts)

    def _render(self, final: bool) -> None:
        if not self.enabled:
            return
        self._shown = self.n
        end = "\n" if (final or not self.tty) else ""
        prefix = "\r" if self.tty else ""
        self.stream.write(prefix + self.line() + end)
        self.stream.flush()

    def close(self) -> None:
        """Finish the line on a terminal; in a log, print the final count unless it was just printed."""
        if self.tty or (self.n and self._shown != self.n):
            self._render(final=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
