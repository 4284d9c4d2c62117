"""``RunRecord``: what a finished student run records in its ``result.json``.

The student runner (``runs.run_student``) writes it; the lab (results, report, accuracy, studies,
sweep) reads it back with ``RunRecord.from_dict`` / ``read_record``. The file records its format
(``RESULT_JSON_FORMAT``); ``RESULT.migrate`` brings one written by an older version to the current shape
(``formats.SavedFormat``), with what the run's ``config.resolved.toml`` still says where the old file is
silent.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnfd_pipeline.config import LEGACY_SEED_ORDER, TargetSource, targets_of
from attnfd_pipeline.errors import ConfigError, UserError
from attnfd_pipeline.formats import SavedFormat

RESULT_JSON = "result.json"
# validation as every version so far evaluates: short side resized to the crop size, then the centre crop
CENTER_CROP = "center_crop"
RESULT_JSON_FORMATS = ("attnfd-result/1", "attnfd-result/2")
RESULT_JSON_FORMAT = RESULT_JSON_FORMATS[-1]


def _v1_to_v2(d: dict, resolved: dict | None = None) -> dict:
    """attnfd-result/2 records the whole recipe and the protocol of its scores. A /1 file (no ``format``) left
    mode, α, method, model, norm, points, seed and K to the run's resolved config where it lacks them (the
    first ones record little more than the scores), and predates ``augment`` (then always the replayed
    cached seeds, or fresh crops under the older ``student.online_fresh``), ``student.seed_order`` (runs
    then followed ``LEGACY_SEED_ORDER``) and ``eval.protocol`` (then always the centre crop)."""
    s = (resolved or {}).get("student", {})
    configured = _configured_source(s)
    mode = d.get("mode", configured.mode)
    filled = {
        "mode": mode, "augment": d.get("augment") or TargetSource.of(mode, configured.augment).augment,
        "alpha": float(d.get("alpha", s.get("alpha", 0.0))), "method": d.get("method") or s.get("method", "attnfd"),
        "model": d.get("model", s.get("model", {}).get("name")), "norm": d.get("norm", s.get("norm")),
        "points": d.get("points") or s.get("points") or [], "seed": d.get("seed", s.get("train", {}).get("seed")),
        "K": d.get("K", (resolved or {}).get("cache", {}).get("K")),
        "seed_order": d.get("seed_order", LEGACY_SEED_ORDER), "eval_protocol": d.get("eval_protocol") or CENTER_CROP,
    }
    return {**d, **filled}


RESULT = SavedFormat("result.json", RESULT_JSON_FORMATS, {RESULT_JSON_FORMATS[0]: _v1_to_v2},
                     unversioned=RESULT_JSON_FORMATS[0])


@dataclass(frozen=True)
class RunRecord:
    run: str  # the run folder's name (``runs.run_name``)
    model: str | None = None  # student model name
    method: str = "none"  # ``student.method`` of a distilled run, "none" for the plain student (α = 0)
    methods: tuple[str, ...] = ()  # the methods of a combination ("attnfd+kd" → attnfd, kd)
    weights: dict[str, float] = field(default_factory=dict)  # each method's own weight w_m (loss = CE + α Σ w_m L_m)
    method_settings: dict[str, dict] = field(default_factory=dict)  # the config sections of the methods used
    alpha: float = 0.0
    norm: str | None = None
    points: tuple[str, ...] = ()
    mode: str = "cached"  # where the targets came from: "cached" or "online" (``TargetSource.mode``)
    augment: str = "replay"  # "replay" (the K cached seeds) or "fresh" (a new draw every epoch; ``TargetSource.augment``)
    seed_order: str | None = LEGACY_SEED_ORDER  # cached-seed order per epoch; None for fresh crops
    seed: int | None = None  # the run seed (initialisation, data order, cached-seed order)
    K: int | None = None  # cached augmentation seeds per image
    targets: tuple[str, ...] = ()  # the cached / online targets the methods read
    teacher: dict | None = None  # model, cbam_mode, sha256, points of the teacher distilled from
    dataset: str | None = None
    eval_protocol: str = CENTER_CROP  # how the validation metrics below were measured
    epochs: int | None = None
    best_miou: float | None = None
    final_miou: float | None = None  # fractions (0.61 = 61 % mIoU), final-epoch validation
    final_pixel_acc: float | None = None
    final_class_acc: float | None = None
    final_fwiou: float | None = None
    per_class_iou: tuple[float | None, ...] | None = None
    class_names: tuple[str, ...] = ()
    train_seconds: float | None = None  # training time, resumed parts included
    cache: str | None = None  # the cache folder a cached run read

    @property
    def distilled(self) -> bool:
        return self.alpha > 0

    @property
    def target_source(self) -> TargetSource:
        """Where the run's targets came from, and on which crops (``student.targets``)."""
        return TargetSource.of(self.mode, self.augment)

    @property
    def fresh(self) -> bool:
        """Online with a fresh augmentation every epoch (``student.targets = "online-fresh"``)."""
        return self.target_source.fresh

    @property
    def mode_tag(self) -> str:
        """``cached``, ``online`` (teacher online on the replayed cached crops) or ``online-fresh``."""
        return self.target_source.tag

    @property
    def finished(self) -> bool:
        return self.final_miou is not None

    @classmethod
    def from_dict(cls, d: dict[str, Any], resolved: dict[str, Any] | None = None,
                  where: str = RESULT_JSON) -> "RunRecord":
        """From a result.json dict of any version (``RESULT.migrate``; ``resolved``: the run's resolved config
        as a dict, for what an older file left to it). Unknown keys are ignored."""
        d = RESULT.migrate(d, where, resolved=resolved)
        alpha = float(d.get("alpha", 0.0))
        fresh = TargetSource.of(d["mode"], d["augment"]).fresh
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values |= {
            "run": d.get("run") or "", "method": d.get("method", "attnfd") if alpha > 0 else "none",
            "methods": tuple(d.get("methods") or ()), "alpha": alpha, "points": tuple(d.get("points") or ()),
            "seed_order": None if fresh else d["seed_order"],  # fresh crops read no cached seed
            "targets": tuple(d.get("targets") or ()), "class_names": tuple(d.get("class_names") or ()),
            "per_class_iou": tuple(d["per_class_iou"]) if d.get("per_class_iou") is not None else None,
            "weights": dict(d.get("weights") or {}), "method_settings": dict(d.get("method_settings") or {}),
        }
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The result.json dict (tuples as lists, so it equals the file read back), with its format."""
        out: dict[str, Any] = {"format": RESULT_JSON_FORMAT}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def _configured_source(s: dict) -> TargetSource:
    """The target source a resolved student table names (``config.targets_of``: ``targets``, or the older
    spelling); cached where it names none or one this version does not know."""
    try:
        return targets_of(s)
    except ConfigError:
        return TargetSource.CACHED


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def read_record(run_dir: str | Path) -> RunRecord:
    """The ``RunRecord`` of a run folder, filled from its ``config.resolved.toml`` where result.json is silent
    (the run's folder name stands in for a missing ``run``)."""
    run_dir = Path(run_dir)
    path = run_dir / RESULT_JSON
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(d).__name__}")
    rec = RunRecord.from_dict(d, _read_toml(run_dir / "config.resolved.toml"), where=str(path))
    return rec if rec.run else dataclasses.replace(rec, run=run_dir.name)
