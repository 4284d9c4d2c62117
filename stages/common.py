"""Shared CLI plumbing: config options and turning library errors into one clear line + exit code."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from attnfd_pipeline.config import Config, ConfigError, load_config

DEFAULT_CONFIG = Path("configs/demo.toml")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="TOML recipe (configs/*.toml).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override, e.g. student.alpha=2 (repeatable).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Run seed (train.seed of the stage).")]


def load(config: Path, overrides: list[str] | None) -> Config:
    with errors():
        return load_config(config, overrides or [])


@contextlib.contextmanager
def errors():
    """Known, user-facing errors → one line on stderr and exit code 2 (no traceback)."""
    from attnfd_pipeline.data.datasets import DataError

    known: tuple[type[BaseException], ...] = (ConfigError, DataError, FileNotFoundError, ValueError)
    try:
        from attnfd_pipeline.cache import CacheError

        known = known + (CacheError,)
    except ImportError:  # pragma: no cover - cache package not importable
        pass
    try:
        yield
    except known as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
