"""Saved formats and their migrations.

A file the project writes and reads back later carries a format version under the key ``format``.
``SavedFormat.migrate`` brings an object of any version this release knows to the current one, one step per
version, so its reader parses only the current shape: what changed between two versions is said once, in
the step between them, and nowhere else. A version this release does not know (a newer release wrote the
file) is refused naming the file, the version found and the versions read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from attnfd_pipeline.errors import UserError

Step = Callable[..., dict]  # (the object at version v, **context) -> the object at the next version


@dataclass(frozen=True)
class SavedFormat:
    """One saved format: its versions, oldest first (the last is the one written), and the steps between them."""

    what: str  # the file, in words ("cache.json")
    versions: tuple[str, ...]
    steps: Mapping[str, Step] = field(default_factory=dict)  # versions[i] → the step to versions[i + 1]
    unversioned: str | None = None  # the version of an object without ``format`` (files written before it)
    error: type[Exception] = UserError

    def __post_init__(self):
        missing = [v for v in self.versions[:-1] if v not in self.steps]
        if missing:
            raise ValueError(f"{self.what}: no migration step from {missing}")

    @property
    def current(self) -> str:
        return self.versions[-1]

    def version_of(self, d: Mapping[str, Any], where: str) -> str:
        """The version ``d`` was written in; ``error`` naming ``where`` when it is not one of ``versions``."""
        version = d.get("format", self.unversioned)
        if version not in self.versions:
            raise self.error(f"{where}: {self.what} format {version!r} is not one this release reads "
                             f"({', '.join(self.versions)}); a newer attnfd-pipeline may have written it")
        return version

    def migrate(self, d: Mapping[str, Any], where: str, **context) -> dict[str, Any]:
        """``d`` at the current version (a new dict; ``d`` is left as it is). ``context`` goes to every step
        (what an old version left to another file, e.g. a run's resolved config)."""
        out = dict(d)
        start = self.versions.index(self.version_of(out, where))
        for old, new in zip(self.versions[start:-1], self.versions[start + 1:]):
            out = self.steps[old](out, **context)
            out["format"] = new
        return out
