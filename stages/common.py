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

ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a finished run trained under another recipe "
                                         "(without it, a finished run is reused or the rerun refused).")]
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="TOML recipe (configs/*.toml).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. student.alpha=2 (repeatable).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", min=0, help="Run seed (train.seed of the stage).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="DEBUG detail on the console and in log.txt.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only on the console "
                                        "(log.txt keeps INFO).")]
TensorboardOpt = Annotated[bool, typer.Option("--tensorboard", help="Also write TensorBoard scalars into <run>/tb/ "
                                              "(needs the tensorboard extra).")]


def option_overrides(overrides: list[str] | None, **options: tuple[str, object]) -> list[str]:
    """``--set`` overrides plus those of dedicated options (``name=(key, value)``, ``value`` None: not given).
    An option and a ``--set`` of the same key are refused naming both, never silently resolved."""
    out = list(overrides or [])
    given = {o.split("=", 1)[0].strip(): o for o in out}
    for name, (key, value) in options.items():
        if value is None:
            continue
        if key in given:
            flag = "--" + name.replace("_", "-")
            raise typer.BadParameter(f"{flag} {value} and --set {given[key]} both set {key}; give one",
                                     param_hint=f"{flag} / --set {key}")
        out.append(f"{key}={value}")
    return out


def logs(verbose: bool, quiet: bool) -> None:
    """Apply --verbose / --quiet to the console and to the run logs (log.txt) this command writes."""
    from attnfd_pipeline.engine import logging as run_logging

    with errors():
        run_logging.configure(verbose=verbose, quiet=quiet)


def load(config: Path, overrides: list[str] | None) -> Config:
    with errors():
        if config == DEFAULT_CONFIG and not config.is_file():
            raise ConfigError(f"{config}: no config here (the default is the demo's, read from the repository's "
                              f"folder); pass --config FILE")
        return load_config(config, overrides or [])


def show_paths(cfg: Config) -> None:
    """The folders a stage reads and writes, resolved (relative paths in a config file are from its folder)."""
    from attnfd_pipeline.engine.logging import get_logger

    get_logger().info(f"data {Path(cfg.data.root).resolve()} | runs {cfg.run_root.resolve()} | cache "
                      f"{cfg.cache.root if '://' in cfg.cache.root else Path(cfg.cache.root).resolve()}")


def rerun_command(command: str, config: Path, overrides: list[str] | None, *, force: bool = False) -> str:
    """The command line that repeats this run with ``--resume`` (the overrides as ``--set``; ``--force`` kept:
    a forced teacher retrain cut short still has the bundle it replaces beside it)."""
    import shlex

    sets = "".join(f" --set {shlex.quote(o)}" for o in overrides or [])
    return f"attnfd {command} -c {shlex.quote(str(config))}{sets}{' --force' if force else ''} --resume"


@contextlib.contextmanager
def interrupts(resume_with: str):
    """Ctrl-C → where the run stopped and the command that continues it, exit code 130 (no traceback). The
    last checkpoint is whole: a save under way when the interrupt came finished first."""
    from attnfd_pipeline.engine.train import RunInterrupted

    try:
        yield
    except KeyboardInterrupt as e:
        where = f"interrupted at epoch {e.epoch}/{e.epochs}, step {e.step}" if isinstance(e, RunInterrupted) else "interrupted"
        typer.secho(f"{where}; resume with {resume_with}", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(130) from None


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

    from attnfd_pipeline.errors import UserError

    # the project's own error types only: any other exception (a ValueError of NumPy or torch too) is a bug,
    # and keeps its traceback (``_logged`` writes it into log.txt as well)
    known: tuple[type[BaseException], ...] = (UserError, ConfigError, DataError, FileNotFoundError)
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
