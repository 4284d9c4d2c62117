"""Run logs: every run or cache folder gets ``log.txt`` with what the console shows, through Python ``logging``.

One logger (``attnfd``) carries the pipeline's lines. It has a console handler (stdout, looked up at every
line so a redirected or captured stdout is honoured) at INFO by default; ``configure(verbose, quiet)`` sets it
to DEBUG or WARNING. ``run_log(folder)`` adds a file handler on ``<folder>/log.txt`` (appended, so a resumed
run keeps its history) for as long as a run writes that folder; the file takes INFO even under ``--quiet``
(a run started under nohup must leave a readable trace) and DEBUG under ``--verbose``.

Inside ``held()`` (the CLI's ``stages.common.errors`` block) file handlers stay open until the block ends: an
error that ends the command is written into every open run log by ``log_error`` before the process exits, with
the same message the console shows. Outside it (library calls, dask sweep workers) ``run_log`` writes the
error itself and closes its file when the run ends.
While several run logs are open in one process (threaded dask workers), each takes only the records of
the thread that opened it, so their lines stay apart.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from pathlib import Path
from attnfd_pipeline.errors import UserError

LOGGER_NAME = "attnfd"
FILE_NAME = "log.txt"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"

logger = logging.getLogger(LOGGER_NAME)


class _ConsoleHandler(logging.StreamHandler):
    """Writes to the *current* stdout (warnings, errors and progress lines, marked ``stderr=True``, to stderr):
    pytest and click swap the streams."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record):
        to_err = record.levelno >= logging.WARNING or getattr(record, "stderr", False)
        # not setStream: it flushes the previous stream, which a finished CliRunner call has closed
        self.stream = sys.stderr if to_err else sys.stdout
        super().emit(record)


class _ThreadFilter(logging.Filter):
    """While two run logs are open in one process (threaded dask workers), each takes only its own thread's
    records; a lone run log takes its helper threads' too (the cache build's writer thread reports progress)."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record):
        return record.thread == self.thread or len(_open) <= 1


class _NotOnConsole(logging.Filter):
    """Drops records marked ``console=False`` (progress lines while a live bar shows the same figures)."""

    def filter(self, record):
        return getattr(record, "console", True)


class _RunFileHandler(logging.FileHandler):
    """A run's log.txt. Records wait in memory until the run ``begin``s writing its folder: a run refused before
    that (bad input, a checkpoint that does not fit) leaves its folder as it was, log included."""

    def __init__(self, path: Path):
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.live = False
        self.pending: list[logging.LogRecord] = []

    def emit(self, record):
        if self.live:
            super().emit(record)
        elif len(self.pending) < 10_000:
            self.pending.append(record)

    def begin(self) -> None:
        if not self.live:
            self.live = True
            for r in self.pending:
                super().emit(r)
            self.pending = []


_state = {"console": None, "held": 0, "file_level": logging.INFO}
_open: dict[Path, _RunFileHandler] = {}


def get_logger() -> logging.Logger:
    """The pipeline logger, with its console handler installed on first use."""
    if _state["console"] is None:
        h = _ConsoleHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        h.setLevel(logging.INFO)
        h.addFilter(_NotOnConsole())
        logger.addHandler(h)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        _state["console"] = h
    return logger


def configure(*, verbose: bool = False, quiet: bool = False) -> None:
    """Console level for this process (``--verbose``: DEBUG, ``--quiet``: WARNING) and the run logs' level
    (DEBUG with ``--verbose``, INFO otherwise)."""
    if verbose and quiet:
        raise UserError("--verbose and --quiet exclude each other")
    get_logger()
    _state["console"].setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    _state["file_level"] = logging.DEBUG if verbose else logging.INFO


def _attach(folder: Path) -> _RunFileHandler | None:
    path = (folder / FILE_NAME).resolve()
    if path in _open:
        return None
    h = _RunFileHandler(path)
    h.setFormatter(logging.Formatter(_FORMAT))
    h.setLevel(_state["file_level"])
    h.addFilter(_ThreadFilter())
    get_logger().addHandler(h)
    _open[path] = h
    return h


def begin(folder: str | Path | None) -> None:
    """The run starts writing ``folder``: its log.txt is created (with the lines logged so far) and grows from
    now on. Nothing for a folder without a run log (another rank's, an object store's)."""
    if folder is None:
        return
    h = _open.get((Path(folder) / FILE_NAME).resolve())
    if h is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        h.begin()


def _detach(h: _RunFileHandler) -> None:
    logger.removeHandler(h)
    h.close()
    _open.pop(Path(h.baseFilename), None)


@contextlib.contextmanager
def run_log(folder: str | Path | None):
    """Copy the pipeline's log lines into ``<folder>/log.txt`` while the block runs, from the moment the run
    calls ``begin(folder)`` (``None``: no file, e.g. a cache on an object store, where appending is not
    possible)."""
    h = _attach(Path(folder)) if folder is not None else None
    try:
        yield
    except BaseException as e:
        if h is not None and not _state["held"]:
            kind = "KeyboardInterrupt" if isinstance(e, KeyboardInterrupt) else type(e).__name__  # Ctrl-C, however raised
            _write_error(h, f"{kind}: {e}")
            _detach(h)
        raise  # inside held(): the file stays open until the CLI has written the error it reports
    if h is not None:
        _detach(h)


def _write_error(h: _RunFileHandler, message: str) -> None:
    if not h.live:  # refused before it wrote anything: the folder stays as it was
        return
    record = logger.makeRecord(LOGGER_NAME, logging.ERROR, __file__, 0, f"run ended by an error: {message}", (),
                               None)
    h.handle(record)


def log_error(message: str) -> None:
    """Write an error that ends the command into every open run log (not to the console: the caller says it)."""
    for h in list(_open.values()):
        _write_error(h, message)


def close_run_logs() -> None:
    for h in list(_open.values()):
        _detach(h)


@contextlib.contextmanager
def held():
    """Run logs opened inside this block stay open until the outermost such block ends (then they close)."""
    _state["held"] += 1
    try:
        yield
    finally:
        _state["held"] -= 1
        if not _state["held"]:
            close_run_logs()
