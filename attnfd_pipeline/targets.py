"""Names of the teacher targets, declared once: the refined distillation points (``B``, ``E``, ``D``: the
CBAM-refined maps F''), ``logits``, and the raw features ``raw_<point>``.

The teacher produces them under these names, the cache stores one array per name, and the distillation
methods ask for them by name. This module imports nothing, so the teacher, the cache schema and the
losses registry all depend on it and not on each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

POINTS = ("B", "E", "D")  # the distillation points: backbone output, ASPP output, decoder feature
RAW_PREFIX = "raw_"
LOGITS = "logits"
EXTRAS = (LOGITS, "raw")  # the ``cache.extra`` entries, in canonical order


def raw_name(point: str) -> str:
    """Name of the raw (pre-CBAM) teacher feature at ``point``: ``raw_B`` …"""
    return RAW_PREFIX + point


def is_raw(name: str) -> bool:
    return name.startswith(RAW_PREFIX)


def target_names(points: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """Arrays a cache config produces: the refined points, then ``logits``, then ``raw_<point>``."""
    names = list(points)
    if LOGITS in extra:
        names.append(LOGITS)
    if "raw" in extra:
        names += [raw_name(p) for p in points]
    return names


def extra_for(targets: Iterable[str], extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The inverse of ``target_names``: the ``cache.extra`` entries (``logits``, ``raw``) that make a cache
    hold every one of ``targets``, joined with the ``extra`` already asked for, in canonical order."""
    targets = list(targets)
    need = set(extra) | ({LOGITS} if LOGITS in targets else set())
    need |= {"raw"} if any(is_raw(t) for t in targets) else set()
    return tuple(e for e in EXTRAS if e in need)


def target_kind(name: str) -> str:
    """``refined``, ``raw`` or ``logits``."""
    if name == LOGITS:
        return LOGITS
    return "raw" if is_raw(name) else "refined"


def target_point(name: str) -> str | None:
    """The distillation point a target belongs to (None for ``logits``)."""
    if name == LOGITS:
        return None
    return name[len(RAW_PREFIX):] if is_raw(name) else name
