"""``attnfd cache verify``: re-read every committed sample and check it against its commit record.

Checks: every chunk decodes (crc32c), no committed sample holds NaN (a NaN-filled sample is a chunk
that was never written or was deleted), each sample's stored bytes (float16 values, or int8 codes + scales
+ offsets) match the manifest checksum, the manifest parts match the shards (rows exactly the shard's images × seeds, ids as in the dataset), and a
replay check on a sample of rows (re-draw and re-apply the augmentation, compare the stored
parameters and image/label hashes). Shards are checked in parallel with dask's threaded scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnfd_pipeline import augment
from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache.encoding import checksum, stored_arrays
from attnfd_pipeline.cache.errors import CacheError
from attnfd_pipeline.cache.info import CacheInfo, load_info
from attnfd_pipeline.cache.manifest import list_parts, read_part
from attnfd_pipeline.cache.schema import CHECKSUM_PREFIX, params_from_row, paths, shard_range
from attnfd_pipeline.cache.storage import Location
from attnfd_pipeline.cache.writer import shard_file


@dataclass(frozen=True)
class BadSample:
    image_id: str
    image_index: int
    aug_seed: int
    target: str
    reason: str

    def __str__(self) -> str:
        return f"image {self.image_id!r} (index {self.image_index}), aug seed {self.aug_seed}, target {self.target!r}: {self.reason}"


@dataclass
class VerifyReport:
    path: Location
    fingerprint: str
    shards_total: int
    shards_committed: int
    samples_checked: int = 0
    replayed: int = 0
    bad: list[BadSample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # manifest / layout / replay problems
    notes: list[str] = field(default_factory=list)  # not errors (e.g. uncommitted shards holding data)

    @property
    def complete(self) -> bool:
        return self.shards_committed == self.shards_total

    @property
    def ok(self) -> bool:
        return not self.bad and not self.problems

    def lines(self) -> list[str]:
        out = [f"cache {self.path} (fingerprint {self.fingerprint[:16]})",
               f"shards committed: {self.shards_committed}/{self.shards_total}",
               f"samples checked: {self.samples_checked}; replayed: {self.replayed}"]
        out += [f"note: {n}" for n in self.notes]
        out += [f"PROBLEM: {p}" for p in self.problems]
        out += [f"BAD: {b}" for b in self.bad]
        out.append("OK" if self.ok else f"FAILED: {len(self.bad)} bad sample targets, {len(self.problems)} problems")
        return out


def _check_shard(arrs: list, s0: int, s1: int, sums: np.ndarray, algorithm: str) -> list[tuple]:
    """Read one shard of one target (its stored arrays: float16 values, or int8 codes, scales, offsets);
    (index, seed, reason) for each bad sample. ``sums``: (n, K). NaN marks a never-written sample: in the
    float16 values, or in the scales of an int8 target (uint8 codes cannot hold NaN). ``algorithm``: the
    cache's checksum (``CacheInfo.checksum``)."""
    K = arrs[0].shape[1]
    nan_at = 0 if len(arrs) == 1 else 1
    bad = []
    try:
        blocks = [a[s0:s1] for a in arrs]
    except Exception:  # noqa: BLE001 - a corrupt chunk fails the whole slice: find which one
        blocks = None
    for i in range(s0, s1):
        for k in range(K):
            if blocks is not None:
                xs = [b[i - s0, k] for b in blocks]
            else:
                try:
                    xs = [a[i, k] for a in arrs]
                except Exception as e:  # noqa: BLE001
                    bad.append((i, k, f"unreadable chunk ({e})"))
                    continue
            nan = np.isnan(xs[nan_at])
            if nan.all():
                bad.append((i, k, "missing: all NaN (chunk absent or deleted)"))
            elif nan.any():
                bad.append((i, k, f"{int(nan.sum())} NaN values"))
            elif checksum(xs, algorithm) != sums[i - s0, k]:
                bad.append((i, k, "checksum mismatch"))
    return bad


def verify_cache(cache_dir: str | Path, *, source: Any = None, replay: int = 8, workers: int = 2,
                 seed: int = 0) -> VerifyReport:
    """Check a cache; never raises for what it finds (see ``VerifyReport``), only if it is not a cache."""
    d = storage.location(cache_dir)
    info = load_info(d)
    parts = list_parts(paths(d)["manifest"])
    report = VerifyReport(d, info.fingerprint, info.num_shards, len(parts))
    arrays = _open_arrays(report, d, info)
    if arrays is None:
        return report
    src_ids = None
    if source is not None:
        ident = source.identity()
        if ident != info.dataset:
            report.problems.append("the dataset differs from the one the cache was built on "
                                   f"(cache: {info.dataset}, now: {ident}); id and replay checks skipped")
            source = None
        else:
            src_ids = np.asarray(source.ids).astype(str)
    tables = {}
    for s, p in parts.items():
        t = _check_part(report, info, s, p, src_ids)
        if t is not None:
            tables[s] = t
    _note_uncommitted(report, d, info, parts, src_ids)
    _check_samples(report, info, arrays, tables, workers)
    if source is not None and replay > 0 and tables:
        _replay_check(report, info, tables, source, replay, seed)
    return report


def _open_arrays(report: VerifyReport, d: Location, info: CacheInfo) -> dict[str, list] | None:
    """The stored arrays of every target, their shapes checked against ``cache.json``; None (the reason in
    ``report.problems``) when they cannot be opened or do not match."""
    import zarr

    try:
        group = zarr.open_group(storage.zarr_store(paths(d)["features"], read_only=True), mode="r")
        arrays = {name: [group[a] for a, _ in stored_arrays(name, info.encoding)] for name in info.target_names}
    except Exception as e:  # noqa: BLE001
        report.problems.append(f"cannot open the arrays ({e})")
        return None
    for name, arrs in arrays.items():
        expected = (info.num_images, info.K, *info.targets[name].chw)
        if tuple(arrs[0].shape) != expected:
            report.problems.append(f"array {name!r} has shape {tuple(arrs[0].shape)}, cache.json says {expected}")
    return None if report.problems else arrays


def _check_part(report: VerifyReport, info: CacheInfo, s: int, p: Location, src_ids: np.ndarray | None):
    """The manifest part of shard ``s`` if its rows are exactly the shard's images × seeds with every checksum
    column (and, given the dataset's ids, the right image ids); else None, the reason in ``report.problems``."""
    N, K, S = info.num_images, info.K, info.shard_size
    if s >= info.num_shards:
        report.problems.append(f"{storage.name(p)}: shard {s} does not exist (cache has {info.num_shards} shards)")
        return None
    try:
        t = read_part(p, info.fingerprint)
    except CacheError as e:
        report.problems.append(str(e))
        return None
    s0, s1 = shard_range(s, S, N)
    idx = t.column("image_index").to_numpy()
    seeds = t.column("aug_seed").to_numpy()
    want_idx = np.repeat(np.arange(s0, s1), K)
    want_seed = np.tile(np.arange(K), s1 - s0)
    if len(idx) != len(want_idx) or (idx != want_idx).any() or (seeds != want_seed).any():
        report.problems.append(f"{storage.name(p)}: rows are not exactly images {s0}..{s1 - 1} × seeds 0..{K - 1} "
                               f"in order ({len(idx)} rows)")
        return None
    missing_cols = [CHECKSUM_PREFIX + n for n in info.target_names if CHECKSUM_PREFIX + n not in t.column_names]
    if missing_cols:
        report.problems.append(f"{storage.name(p)}: columns missing: {missing_cols}")
        return None
    if src_ids is not None:
        got = np.asarray(t.column("image_id").to_pylist(), dtype=str)
        wrong = np.flatnonzero(got != src_ids[idx])
        for r in wrong[:10]:
            report.problems.append(f"{storage.name(p)}: row {r} has image id {got[r]!r}, the dataset has "
                                   f"{src_ids[idx[r]]!r} at index {idx[r]}")
    return t


def _note_uncommitted(report: VerifyReport, d: Location, info: CacheInfo, parts: dict, src_ids) -> None:
    """A note (not an error) for each shard holding data without a manifest part."""
    N, K, S, targets = info.num_images, info.K, info.shard_size, info.target_names
    for s in range(info.num_shards):
        if s not in parts and any(storage.exists(shard_file(d, n, s)) for n in targets):  # the main arrays suffice
            s0, s1 = shard_range(s, S, N)
            who = (", ".join(repr(str(x)) for x in src_ids[s0:s1]) if src_ids is not None
                   else f"indices {s0}..{s1 - 1}")
            report.notes.append(f"shard {s} holds data but is not committed: no manifest part for images {who} × "
                                f"aug seeds 0..{K - 1}, targets {', '.join(targets)} (interrupted build or deleted "
                                f"part; `attnfd cache build` rewrites it)")


def _check_samples(report: VerifyReport, info: CacheInfo, arrays: dict, tables: dict, workers: int) -> None:
    """Every committed sample of every target against its checksum, shards in parallel (dask threads)."""
    import dask

    N, K, S, targets = info.num_images, info.K, info.shard_size, list(info.target_names)
    tasks, keys = [], []
    for s, t in tables.items():
        s0, s1 = shard_range(s, S, N)
        ids = np.asarray(t.column("image_id").to_pylist(), dtype=str).reshape(s1 - s0, K)
        for name in targets:
            sums = np.asarray(t.column(CHECKSUM_PREFIX + name).to_pylist(), dtype=str).reshape(s1 - s0, K)
            tasks.append(dask.delayed(_check_shard)(arrays[name], s0, s1, sums, info.checksum))
            keys.append((s, name, ids))
        report.samples_checked += (s1 - s0) * K
    results = dask.compute(*tasks, scheduler="threads", num_workers=max(1, workers)) if tasks else []
    for (s, name, ids), bad in zip(keys, results):
        s0 = shard_range(s, S, N)[0]
        for i, k, reason in bad:
            report.bad.append(BadSample(str(ids[i - s0, k]), i, k, name, reason))
    report.bad.sort(key=lambda b: (b.image_index, b.aug_seed, targets.index(b.target)))


def _replay_check(report: VerifyReport, info: CacheInfo, tables: dict, source: Any, n: int, seed: int) -> None:
    from attnfd_pipeline.config import AugmentConfig, from_dict

    aug_cfg = from_dict(AugmentConfig, info.augment, "cache.json inputs.augment")
    rows = [(s, r) for s, t in tables.items() for r in range(t.num_rows)]
    pick = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    for j in sorted(pick):
        s, r = rows[j]
        t = tables[s]
        cols = {name: t.column(name).to_numpy(zero_copy_only=False)[r:r + 1] for name in t.column_names}
        i, k = int(cols["image_index"][0]), int(cols["aug_seed"][0])
        where = f"image {cols['image_id'][0]!r} (index {i}), aug seed {k}"
        stored = params_from_row(cols, 0)
        image, label = source.load(i)
        drawn = augment.draw(aug_cfg, i, k, tuple(image.shape[-2:]))
        if drawn != stored:
            report.problems.append(f"replay {where}: re-drawn augmentation {drawn} differs from the stored {stored}")
        img, lab = augment.apply(stored, image, label, impl=aug_cfg.impl)
        if augment.content_hash(img) != cols["image_hash"][0]:
            report.problems.append(f"replay {where}: augmented image hash differs from the stored one")
        if augment.content_hash(lab) != cols["label_hash"][0]:
            report.problems.append(f"replay {where}: augmented label hash differs from the stored one")
        report.replayed += 1
