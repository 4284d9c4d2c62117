"""Progress over the whole job: run i of N, epoch e of E, step s of S, rates and an ETA from measured speed.

``Progress`` counts one unit of work (a run's steps, a cache build's samples). Inside ``job(desc, runs=N)``
(a command that runs several trainings or builds: studies, bench-accuracy, sweep, a teacher with fitted
CBAMs) it also names the run it belongs to and estimates what is left of the whole job: the rest of this
run at its measured rate, plus the runs still to come at the mean duration of the runs finished so far (the
current run's projected duration while none has finished).

On a terminal (stderr is a TTY) a rich bar shows it live; otherwise one plain line every ``log_every``
seconds goes through the ``attnfd`` logger (console and the run's log.txt), so logs stay readable. With a
live bar the plain lines still reach log.txt, only less often (``FILE_EVERY``).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time

FILE_EVERY = 60.0  # seconds between plain lines in log.txt while a live bar shows the progress


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Job:
    """A command's whole job: ``runs`` units (trainings, cache builds) done one after another."""

    def __init__(self, desc: str, runs: int):
        self.desc, self.runs = desc, max(int(runs), 1)
        self.index = 0  # 1-based index of the current run (0: none started)
        self.label = ""
        self.durations: list[float] = []  # measured runs (skipped ones took no time and teach nothing)
        self._measured = True  # the current run's duration is recorded (or it was skipped)
        self.start = self._run_start = time.perf_counter()

    def next(self, label: str = "") -> None:
        """The next run starts (the previous one, if any, is finished)."""
        self._finish()
        self.index = min(self.index + 1, self.runs)
        self.label, self._run_start = label, time.perf_counter()
        self._measured = False

    def skip(self, label: str = "") -> None:
        """The next run was already done (reused): it counts as finished and adds no time."""
        self._finish()
        self.index = min(self.index + 1, self.runs)
        self.label, self._measured = label, True

    def _finish(self) -> None:
        if self.index and not self._measured:
            self.durations.append(time.perf_counter() - self._run_start)
            self._measured = True

    def remaining(self, run_left: float) -> float:
        """Seconds left in the job when the current run has ``run_left`` seconds to go."""
        later = self.runs - max(self.index, 1)
        if later <= 0:
            return run_left
        per_run = (sum(self.durations) / len(self.durations) if self.durations
                   else time.perf_counter() - self._run_start + run_left)
        return run_left + later * per_run

    def prefix(self) -> str:
        return f"{self.desc} run {max(self.index, 1)}/{self.runs}" + (f" ({self.label})" if self.label else "")

    def done_line(self) -> str:
        return f"{self.desc}: {self.runs} runs done in {_fmt_time(time.perf_counter() - self.start)}"


_current: contextvars.ContextVar[Job | None] = contextvars.ContextVar("attnfd_job", default=None)


def current_job() -> Job | None:
    return _current.get()


@contextlib.contextmanager
def job(desc: str, runs: int):
    """Make every ``Progress`` inside the block report run i of ``runs`` and the whole job's ETA."""
    j = Job(desc, runs)
    token = _current.set(j)
    try:
        yield j
    finally:
        j._finish()
        _current.reset(token)


class Progress:
    """Count, rate, extra throughput figures, epoch and ETA of one unit of work (see the module docstring).

    ``done``: units finished before this call (a resumed run): shown in the count, not used for the rate.
    ``epochs``: shows "epoch e/E" (``update(epoch=e)``). ``stream``: write plain lines there instead of the
    logger (tests, a file)."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", *, stream=None, log_every: float = 10.0,
                 enabled: bool = True, done: int = 0, epochs: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream
        shown_on = stream if stream is not None else sys.stderr
        self.tty = hasattr(shown_on, "isatty") and shown_on.isatty()
        self.log_every = log_every
        self.enabled = enabled
        self.n = self.done = done
        self.epochs, self.epoch = epochs, 0
        self.job = current_job()
        self.start = self._last = self._last_file = time.perf_counter()
        self.postfix: dict[str, str] = {}
        self._shown = -1  # count at the last printed line
        self.counters: dict[str, float] = {}
        self._bar = _RichBar.open(shown_on, self) if (enabled and self.tty) else None

    def update(self, n: int = 1, *, counters: dict[str, float] | None = None, epoch: int | None = None,
               **postfix) -> None:
        """Advance by ``n``; ``counters`` (e.g. {"MB": 1.2}) accumulate and are shown as rates."""
        self.n += n
        self.epoch = self.epoch if epoch is None else epoch
        for k, v in (counters or {}).items():
            self.counters[k] = self.counters.get(k, 0.0) + v
        self.postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in postfix.items()})
        if self._bar is not None:
            self._bar.update()
        now = time.perf_counter()
        if self._bar is None and (now - self._last >= self.log_every or self.n >= self.total):
            self._last = now
            self._render()
        elif self._bar is not None and now - self._last_file >= FILE_EVERY:
            self._last_file = now
            self._render(console=False)

    def eta(self) -> tuple[float, float | None]:
        """(seconds left in this unit, seconds left in the whole job or None outside a job)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = (self.n - self.done) / elapsed
        left = (self.total - self.n) / rate if rate > 0 else 0.0
        return left, (self.job.remaining(left) if self.job is not None and self.job.runs > 1 else None)

    def figures(self) -> list[str]:
        """Everything after the count: rates, postfix values, elapsed and ETA."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        parts = [f"{(self.n - self.done) / elapsed:.2f} {self.unit}/s"]
        parts += [f"{v / elapsed:.2f} {k}/s" for k, v in self.counters.items()]
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        left, job_left = self.eta()
        parts.append(f"elapsed {_fmt_time(elapsed)} eta {_fmt_time(left)}"
                     + (f" (job {_fmt_time(job_left)})" if job_left is not None else ""))
        return parts

    def head(self) -> str:
        head = f"{self.job.prefix()} | " if self.job is not None else ""
        head += self.desc
        return head + (f" epoch {self.epoch}/{self.epochs}" if self.epochs else "")

    def line(self) -> str:
        return " | ".join([f"{self.head()}: {self.n}/{self.total} {self.unit}", *self.figures()])

    def _render(self, console: bool = True) -> None:
        if not self.enabled:
            return
        self._shown = self.n
        if self.stream is not None:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            return
        from attnfd_pipeline.engine.logging import get_logger

        get_logger().info(self.line(), extra={"console": console, "stderr": True})

    def close(self) -> None:
        """Stop the bar; in a log, print the final count unless it was just printed."""
        if self._bar is not None:
            self._bar.close()
            self._render(console=False)
        elif self.n and self._shown != self.n:
            self._render()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _RichBar:
    """The live terminal bar of a ``Progress`` (rich ships with typer)."""

    def __init__(self, stream, owner: Progress):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
        from rich.progress import Progress as RichProgress
        from rich.table import Column

        self.owner = owner
        # long figures fold onto a second line rather than being cut on a narrow terminal
        self.bar = RichProgress(TextColumn("{task.description}", table_column=Column(no_wrap=True)),
                                BarColumn(bar_width=24), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}", table_column=Column(no_wrap=False, min_width=30)),
                                console=Console(file=stream), refresh_per_second=4)
        self.bar.start()
        self.task = self.bar.add_task(owner.head(), total=owner.total, completed=owner.n, info="")

    @classmethod
    def open(cls, stream, owner: Progress) -> "_RichBar | None":
        """A live bar, or None (plain lines) where rich is missing (typer-slim installs)."""
        try:
            return cls(stream, owner)
        except ImportError:
            return None

    def update(self) -> None:
        o = self.owner
        self.bar.update(self.task, completed=o.n, description=o.head(), info=" | ".join(o.figures()))

    def close(self) -> None:
        self.update()
        self.bar.stop()
