"""Shared CLI plumbing: config options and turning library errors into one clear line + exit code."""

from __future__ import annotations

import contextlib
import errno
import re
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from attnfd_pipeline.config import Config, ConfigError, load_config

DEFAULT_CONFIG = Path("configs/demo.toml")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="TOML recipe (configs/*.toml).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. student.alpha=2 (repeatable).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Run seed (train.seed of the stage).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="DEBUG detail on the console and in log.txt.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only on the console "
                                        "(log.txt keeps INFO).")]
TensorboardOpt = Annotated[bool, typer.Option("--tensorboard", help="Also write TensorBoard scalars into <run>/tb/ "
                                              "(needs the tensorboard extra).")]


def logs(verbose: bool, quiet: bool) -> None:
    """Apply --verbose / --quiet to the console and to the run logs (log.txt) this command writes."""
    from attnfd_pipeline.engine import logging as run_logging

    with errors():
        run_logging.configure(verbose=verbose, quiet=quiet)


def load(config: Path, overrides: list[str] | None) -> Config:
    with errors():
        return load_config(config, overrides or [])


@contextlib.contextmanager
def errors():
    """Known, user-facing errors → one line on stderr and exit code 2 (no traceback). Any error that ends the
    block is first written into the run logs (log.txt) the block opened; they close when the block ends."""
    from attnfd_pipeline.engine import logging as run_logging

    with run_logging.held():
        with _logged(run_logging.log_error):
            with _known_errors():
                yield


@contextlib.contextmanager
def _logged(log_error):
    """Unknown errors (a traceback follows on the console) and interrupts reach log.txt too."""
    import traceback

    try:
        yield
    except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise
    except KeyboardInterrupt:
        log_error("interrupted (KeyboardInterrupt)")
        raise
    except Exception as e:
        log_error(f"{type(e).__name__}: {e}\n{''.join(traceback.format_exception(e)).rstrip()}")
        raise


@contextlib.contextmanager
def _known_errors():
    from attnfd_pipeline.data.datasets import DataError
    from attnfd_pipeline.engine import logging as run_logging

    known: tuple[type[BaseException], ...] = (ConfigError, DataError, FileNotFoundError, ValueError)
    try:
        from attnfd_pipeline.cache import CacheError

        known = known + (CacheError,)
    except ImportError:  # pragma: no cover - cache package not importable
        pass
    try:
        yield
    except known as e:
        _fail(run_logging, f"error: {message_of(e)}")
    except OSError as e:
        if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        _fail(run_logging, f"error: disk full: {e}")


def _fail(run_logging, line: str):
    run_logging.log_error(line)
    typer.secho(line, err=True, fg=typer.colors.RED)
    raise typer.Exit(2) from None


_EXC_LINE = re.compile(r"(?:\w+\.)*\w+: ")


def message_of(e: BaseException) -> str:
    """The message of ``e``; for an error re-raised from a DataLoader worker ("Caught DataError in
    DataLoader worker process 0. Original Traceback …"), the worker's own message without the traceback."""
    text = str(e)
    _, marker, tb = text.partition("Original Traceback")
    if not marker:
        return text
    lines = tb.splitlines()
    frames = [j for j, line in enumerate(lines) if line.startswith('  File "')]
    j = frames[-1] + 1 if frames else 1
    while j < len(lines) and lines[j].startswith(" "):  # the frame's source lines
        j += 1
    if j < len(lines) and _EXC_LINE.match(lines[j]):  # "package.module.DataError: message …"
        return "\n".join([_EXC_LINE.sub("", lines[j], count=1), *lines[j + 1:]]).strip()
    return text
