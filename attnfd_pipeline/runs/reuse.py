"""Finished work is never overwritten by default: a rerun of a finished student run or teacher bundle reuses
it when the recipe is the same, and is refused — naming the keys that differ and the two ways on (``--force``
replaces it, another ``name`` keeps both) — when it is not.

The library's ``run_student`` / ``run_teacher`` train whatever they are asked to; the command line asks these
first (``attnfd student`` / ``attnfd teacher`` without ``--force``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from attnfd_pipeline.config import Config, ConfigError, from_dict
from attnfd_pipeline.records import RESULT_JSON
from attnfd_pipeline.runs.naming import differences, finished_run_differences, student_dir
from attnfd_pipeline.teacher import bundle_path, load_teacher_info
from attnfd_pipeline.utils import sha256_file

# data settings that change where or how fast the files are read, not what the teacher learns from them
_DATA_UNCHANGED = frozenset({"root", "num_workers"})


class FinishedWorkError(ConfigError):
    """A rerun would replace a finished run or bundle trained under another recipe."""


def _ways_on(what: str, flag: str) -> str:
    return (f"pass {flag} to replace the {what}, or keep it and give the new recipe another run folder with "
            f"--set name=\"NEW\"")


def reusable_student(cfg: Config) -> dict | None:
    """The result.json of the finished run ``cfg`` describes (None when the folder has no finished run);
    :class:`FinishedWorkError` naming what differs when the finished run was trained under another recipe."""
    result = student_dir(cfg) / RESULT_JSON
    if not result.is_file():
        return None
    reason = finished_run_differences(cfg)
    if reason:
        raise FinishedWorkError(f"{student_dir(cfg)}: a finished run with another recipe is there ({reason}); "
                                f"{_ways_on('finished run', '--force')}")
    return json.loads(result.read_text())


def forget_finished_student(cfg: Config) -> None:
    """``--force``: the run folder no longer holds a finished run (its result.json goes first), so a forced
    retrain that is interrupted is not later taken for the finished run it replaces."""
    (student_dir(cfg) / RESULT_JSON).unlink(missing_ok=True)


def teacher_differences(cfg: Config) -> str | None:
    """How ``cfg``'s teacher recipe differs from the one its teacher folder's bundle was made with (None when it
    does not, or when the bundle records no recipe to compare). An imported bundle is always another recipe."""
    source = _bundle_info(bundle_path(cfg)).get("source")
    if isinstance(source, dict):
        return f"the bundle was imported from {source.get('path')}, not trained"
    old = _bundle_recipe(bundle_path(cfg))
    if old is None:
        return None
    diff = differences("teacher", _teacher_recipe(old), _teacher_recipe(cfg))
    diff += differences("augment", dataclasses.asdict(old.augment), dataclasses.asdict(cfg.augment))
    diff += differences("data", _data_recipe(old), _data_recipe(cfg))
    return "; ".join(diff) or None


def _bundle_info(path: Path) -> dict:
    try:
        return load_teacher_info(path)
    except (FileNotFoundError, ValueError):
        return {}


def _bundle_recipe(path: Path) -> Config | None:
    """The config the bundle records it was made with (its .json; not ``config.resolved.toml``, which a later
    run that was interrupted before writing its bundle may have rewritten); None when it records none that
    this version reads."""
    try:
        recorded = _bundle_info(path).get("config")
        return from_dict(Config, _without_nulls(recorded)) if isinstance(recorded, dict) else None
    except (FileNotFoundError, ValueError):
        return None


def _without_nulls(d: dict) -> dict:
    """A recorded ``Config.to_dict()`` as a config file reads: an unset optional key (None) left out."""
    return {k: _without_nulls(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def _teacher_recipe(cfg: Config) -> dict:
    t = dataclasses.asdict(cfg.teacher)
    if cfg.teacher.cbam_mode != "fitted":  # the side-CBAM fit runs in "fitted" mode only
        t.pop("fit_epochs"), t.pop("fit_lr")
    return t


def _data_recipe(cfg: Config) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in _DATA_UNCHANGED}


def _whole_bundle(path: Path) -> bool:
    """The bundle and its metadata are there and belong together (the .json records the .pt's SHA-256)."""
    if not path.is_file():
        return False
    try:
        recorded = load_teacher_info(path)["file_sha256"]
    except (FileNotFoundError, ValueError):
        return False
    return recorded is None or recorded == sha256_file(path)  # None: a /1 bundle that recorded none


def reusable_teacher(cfg: Config) -> Path | None:
    """The bundle ``cfg`` would write when one made with the same recipe is there (None: no bundle yet);
    :class:`FinishedWorkError` naming what differs otherwise."""
    path = bundle_path(cfg)
    if not _whole_bundle(path):
        return None  # none yet, or a save cut between the .pt and its .json: train it (again)
    reason = teacher_differences(cfg)
    if reason:
        raise FinishedWorkError(f"{path}: a finished teacher bundle with another recipe is there ({reason}); caches "
                                f"and students built from it need it as it is; {_ways_on('bundle', '--force')}")
    return Path(path)
