"""Student run folders: the name that tells runs apart, and whether a finished run in that folder is the run
a config describes (the name does not encode everything, so the resolved config decides).

Run names are stable across versions — a finished run is found and reused by its name — and runs written
before a setting existed are read with what they followed then (their result.json through
``records.RESULT.migrate``; the older ``student.mode`` / ``student.online_fresh`` spelling of
``student.targets`` loads through ``config``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
from pathlib import Path

from attnfd_pipeline.config import Config, ConfigError, StudentConfig, TargetSource, load_config
from attnfd_pipeline.engine.train import RESUMABLE_CHANGES
from attnfd_pipeline.losses import parse_methods
from attnfd_pipeline.records import RESULT, RESULT_JSON
from attnfd_pipeline.teacher import bundle_path, load_teacher_info
from attnfd_pipeline.errors import UserError


def _settings_tag(s: StudentConfig) -> str:
    """Short hash of the method sections that differ from their defaults ('' when none do)."""
    changed = {}
    for n in parse_methods(s.method):
        params = s.method_recipe(n)  # effective weight: a section's own alpha names the run it is equivalent to
        if params != s.default_method_recipe(n):
            changed[n] = params
    if not changed:
        return ""
    return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]


def recipe_tag(s: StudentConfig) -> str:
    """``_ceavg``, ``_convbn``, ``_connwarm``, ``_cbamtap`` for the released-code recipe details a run follows
    (config.StudentConfig); "" at the defaults, so the names of earlier runs are kept."""
    parts = [("ceavg", s.ce_batch_average), ("convbn", s.cbam_trainable == "conv_bn"),
             ("connwarm", s.connector_schedule == "warmup_only"), ("cbamtap", s.cbam_lr == "tap")]
    return "".join(f"_{name}" for name, on in parts if on)


def run_name(cfg: Config) -> str:
    """Run folder name: everything that makes runs differ (method, α, norm, points, target source — ``cached``,
    ``online`` or ``online-fresh`` —, K, the variant: method settings when not the defaults, storage, recipe
    switches; seed)."""
    s = cfg.student
    variant = run_variant(cfg)
    tail = f"{'_' + variant if variant else ''}_s{s.train.seed}"
    if s.alpha == 0:  # the plain student: only its crops (cached seeds at K, or fresh) and its CE set it apart
        tag = f"{s.model.name}_baseline_{'fresh' if s.targets.fresh else f'K{cfg.cache.K}'}{tail}"
    else:
        tag = (f"{s.model.name}_{s.method}_a{s.alpha:g}_{s.norm}_{'-'.join(s.points)}_{s.targets.tag}"
               f"_K{cfg.cache.K}{tail}")
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", tag)


def run_variant(cfg: Config) -> str:
    """The part of ``run_name(cfg)`` between the crops and the seed (``variant_tag`` reads it back from a name):
    the method settings hash, the storage and the released-recipe switches, ``"p6031d366_int8_ceavg"``; only
    ``"ceavg"`` can set a plain student apart; "" at the defaults."""
    s = cfg.student
    if s.alpha == 0:
        return "ceavg" if s.ce_batch_average else ""
    settings = _settings_tag(s)
    return ((f"_p{settings}" if settings else "") + storage_tag(cfg) + recipe_tag(s)).lstrip("_")


def variant_tag(name: str) -> str:
    """``run_variant`` read back from a student run name (what the lab has of a finished run): the part after
    its crops (``K<n>``, or a plain student's ``fresh``) and before its seed. Two runs that agree on everything
    else but this trained differently: the lab's tables never pool them."""
    stem = re.sub(r"_s\d+$", "", name)
    m = re.search(r"_(K\d+|baseline_fresh)(?=_|$)", stem)
    return stem[m.end():].lstrip("_") if m else ""


def storage_tag(cfg: Config) -> str:
    """``_int8``, ``_poolD2`` … for a cached run on a cache that is not float16 at full resolution (its
    targets, and with pooling its loss, differ); "" otherwise, so the names of earlier runs are kept."""
    c = cfg.cache
    if cfg.student.targets is not TargetSource.CACHED or cfg.student.alpha == 0:
        return ""
    tag = "" if c.encoding == "float16" else f"_{c.encoding}"
    return tag + "".join(f"_pool{p}{f}" for p, f in c.pool)


def student_dir(cfg: Config) -> Path:
    return cfg.run_root / "student" / run_name(cfg)


def seed_order(s: StudentConfig) -> str | None:
    """The cached-seed order a run's crops follow (None: fresh crops, which never read the cached seeds)."""
    return None if s.targets.fresh else s.seed_order


def finished_run_differences(cfg: Config) -> str | None:
    """Why the finished run in ``student_dir(cfg)`` is not the run ``cfg`` describes (None when it is): it
    was distilled from another teacher bundle, or its resolved config trains differently (student and
    augmentation settings, K). The run name does not encode everything (lr, epochs, crop …), so a sweep or
    a bench must not let such a run silently stand in. Where it ran and how often it evaluated may differ
    (``engine.train.RESUMABLE_CHANGES``)."""
    run_dir = student_dir(cfg)
    result = json.loads((run_dir / RESULT_JSON).read_text())
    recorded = (result.get("teacher") or {}).get("sha256")
    if cfg.student.alpha > 0 and recorded and bundle_path(cfg).is_file():
        current = load_teacher_info(bundle_path(cfg))["sha256"]
        if recorded != current:
            return f"distilled from teacher {recorded[:12]}, the bundle is now {current[:12]}"
    resolved = run_dir / "config.resolved.toml"
    if not resolved.is_file():
        return None
    try:
        old = load_config(resolved)
    except (ConfigError, ValueError):
        return None  # written by another version: nothing to compare
    # the order a run followed is what result.json records (a resolved config without the key loads with the
    # current default, which may not be the order that run followed)
    followed = RESULT.migrate(result, str(run_dir / RESULT_JSON))["seed_order"]
    old_student = dataclasses.replace(old.student, seed_order=followed)
    diff = differences("student", _recipe(old_student), _recipe(cfg.student))
    diff += differences("augment", dataclasses.asdict(old.augment), dataclasses.asdict(cfg.augment))
    diff += [] if old.cache.K == cfg.cache.K else [f"cache.K: {old.cache.K} → {cfg.cache.K}"]
    diff += [f"cache.{k}: {getattr(old.cache, k)!r} → {getattr(cfg.cache, k)!r}" for k in ("encoding", "pool")
             if cfg.student.targets is TargetSource.CACHED and getattr(old.cache, k) != getattr(cfg.cache, k)]
    return "; ".join(diff) or None


def _recipe(s: StudentConfig) -> dict:
    """``s`` as a dict without the sections of methods it does not train with (``student.cirkd`` does not
    change an AttnFD run: adding or tuning it in a config must not orphan finished runs)."""
    used = set(parse_methods(s.method)) if s.alpha > 0 else set()
    unused = {"seed_order"} if s.targets.fresh else set()  # fresh crops never read the cached seeds
    fields = dataclasses.asdict(s)
    del fields["sections"]
    return {**{k: _plain(v) for k, v in fields.items() if k not in unused},
            **{name: s.method_recipe(name) for name in s.sections if name in used}}


def _plain(v):
    return v.value if isinstance(v, enum.Enum) else v


def differences(prefix: str, old: dict, new: dict) -> list[str]:
    """``"prefix.key: old → new"`` for each (nested) key whose value differs, except where a run happens
    (``engine.train.RESUMABLE_CHANGES``)."""
    out = []
    for k in new:
        if isinstance(new[k], dict) and isinstance(old.get(k), dict):
            out += differences(f"{prefix}.{k}", old[k], new[k])
        elif k not in RESUMABLE_CHANGES and old.get(k) != new[k]:
            out.append(f"{prefix}.{k}: {old.get(k)!r} → {new[k]!r}")
    return out


def finished_result(cfg: Config) -> dict:
    """The result.json of the finished run of ``cfg``; ``ValueError`` naming the folder and what differs
    when it was trained under another config (``finished_run_differences``)."""
    reason = finished_run_differences(cfg)
    if reason:
        raise UserError(f"{student_dir(cfg)}: a finished run with another config ({reason}); move or delete "
                         f"that folder to retrain it")
    return json.loads((student_dir(cfg) / RESULT_JSON).read_text())
