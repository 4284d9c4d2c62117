"""Stage 1b: run the frozen teacher on every (image, aug seed) and commit the targets shard by shard.

For each shard a writer owns (``range(rank, n_shards, world)``) and that has no committed manifest
part: replay ``AugmentParams(i, k)`` for its images and seeds, run the teacher in batches of
``cache.batch_size`` crops (eval, no_grad; batches never cross a shard, so a resumed or multi-writer
build feeds the teacher exactly the batches of an uninterrupted one and ends bitwise identical), then
encode each batch on the teacher's device (pooling, the float16 cast with its checks or the int8
quantisation: ``encoding.encode``) and copy only the stored arrays to the host (pinned, non-blocking on
CUDA, so the next batch's forward overlaps the copies), then hand the shard to the background
``ShardWriter``, which checksums, compresses and writes it while the teacher runs on the next shard. The target shapes come from the first shard's outputs, so a
build runs no extra dry forward.
"""

from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnfd_pipeline import augment
from attnfd_pipeline.cache import storage
from attnfd_pipeline.cache import encoding as enc
from attnfd_pipeline.cache.encoding import (HostCopies, encode, lossy_steps, pool_of, pooled_hw,
                                            to_host)
from attnfd_pipeline.cache.fingerprint import cache_dir_for, cache_fingerprint, cache_inputs, fingerprint_of
from attnfd_pipeline.cache.info import CacheInfo, TargetInfo, load_info
from attnfd_pipeline.cache.lock import BuildLock, holder_alive
from attnfd_pipeline.cache.manifest import committed_shards
from attnfd_pipeline.cache.errors import CacheError, disk_full_error, is_disk_full
from attnfd_pipeline.cache.schema import (CACHE_JSON, LOCK_NAME, ShardRange, cache_target_names,
                                          num_shards, paths, shard_range, target_kind, target_point)
from attnfd_pipeline.cache.storage import Location
from attnfd_pipeline.cache.writer import ShardBuffer, ShardWriter, create_store
from attnfd_pipeline.data.replay import replay
from attnfd_pipeline.engine.logging import begin as begin_run_log
from attnfd_pipeline.engine.logging import get_logger, run_log
from attnfd_pipeline.progress import Progress
from attnfd_pipeline.utils import atomic_write_json


@dataclass
class BuildResult:
    path: Location  # a Path for a local cache, the URL on an fsspec store
    fingerprint: str
    shards_total: int
    shards_written: int
    shards_skipped: int  # already committed (resume) or owned by another rank
    samples_written: int
    bytes_written: int  # compressed bytes on disk of the shards written now
    seconds: float
    teacher_seconds: float  # main-thread time: teacher.targets + encoding on its device + queuing the copies
    load_seconds: float  # image load + augmentation + normalisation (loader thread, overlapped)
    writer_seconds: float  # background thread: checksums, compression, I/O

    @property
    def samples_per_s(self) -> float:
        return self.samples_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def teacher_samples_per_s(self) -> float:
        return self.samples_written / self.teacher_seconds if self.teacher_seconds > 0 else 0.0


BUILD_RECORD = "cache_build.json"  # in the run folder (``cfg.run_root``): what the last build of its cache did


def write_build_record(cfg, r: Any, writers: int = 1) -> Path | None:
    """``runs/<name>/cache_build.json`` of a build ``r`` (a ``BuildResult``, or a many-writer result with
    ``writers`` writers) that wrote any shard; a build with nothing left to write leaves the record as it is."""
    if not r.shards_written:
        return None
    return atomic_write_json(Path(cfg.run_root) / BUILD_RECORD, {
        "path": str(r.path), "seconds": r.seconds, "samples_written": r.samples_written,
        "bytes_written": r.bytes_written, "samples_per_s": r.samples_per_s,
        "teacher_samples_per_s": r.teacher_samples_per_s, "resumed": r.shards_skipped > 0, "writers": writers})


def read_build_record(cfg) -> dict | None:
    """The run's ``cache_build.json`` (``write_build_record``); None before any build of its cache wrote one."""
    path = Path(cfg.run_root) / BUILD_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def teacher_device(teacher: Any) -> torch.device:
    try:
        return next(teacher.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _stride(crop: int, size: int) -> int | float:
    s = crop / size
    return int(s) if s == int(s) else round(s, 6)


def cache_info(cfg, teacher: Any, source: Any, specs: dict[str, Sequence[int]]) -> CacheInfo:
    """The ``cache.json`` of the cache this config, teacher and source produce (deterministic); ``specs``: the
    teacher's (C, H, W) per target."""
    c = cfg.cache
    inputs = cache_inputs(cfg, teacher, source)
    names = cache_target_names(c)
    crop_h, crop_w = cfg.augment.crop_size
    missing = [n for n in names if n not in specs]
    if missing:
        raise CacheError(f"teacher gives no spec for target(s) {missing}")
    encoding = c.encoding
    targets = {}
    for n in names:
        C, H, W = (int(v) for v in specs[n])
        f = pool_of(c.pool, n)
        h, w = pooled_hw(H, W, f)
        targets[n] = TargetInfo(chw=(C, h, w), kind=target_kind(n), point=target_point(n), stride=_stride(crop_h, h),
                                bytes_per_sample=enc.bytes_per_sample((C, h, w), encoding), pool=f,
                                full_chw=(C, H, W) if f > 1 else None)
    n_images = len(source)
    info_fn = getattr(teacher, "info", None)
    teacher_info = info_fn() if callable(info_fn) else {"sha256": inputs["teacher_sha256"]}
    return CacheInfo(
        fingerprint=fingerprint_of(inputs), inputs=inputs, teacher=json.loads(json.dumps(teacher_info)),
        num_images=n_images, K=c.K, shard_size=c.shard_size, num_shards=num_shards(n_images, c.shard_size),
        crop_size=(crop_h, crop_w), target_names=tuple(names), targets=targets,
        dtype=enc.stored_arrays("x", encoding)[0][1],  # of the main arrays: float16, or uint8 codes
        codec=c.codec, level=inputs["level"], mantissa_bits=inputs["mantissa_bits"],
        lossy=tuple(lossy_steps(inputs["mantissa_bits"], encoding)), teacher_batch_size=c.batch_size,
        encoding=encoding)


def lock_path(cache_dir: Location, rank: int, world: int) -> Location:
    return storage.join(cache_dir, LOCK_NAME if world == 1 else f"{LOCK_NAME}.{rank}of{world}")


def _lock_world(name: str) -> int | None:
    """``world`` of a lock file name from ``lock_path`` (None for anything else)."""
    if name == LOCK_NAME:
        return 1
    rest = name[len(LOCK_NAME) + 1:] if name.startswith(LOCK_NAME + ".") else ""
    r, sep, w = rest.partition("of")
    return int(w) if sep and r.isdigit() and w.isdigit() else None


def check_no_other_layout(cache_dir: Location, own_lock: Location, world: int) -> None:
    """Refuse while a live build with a different ``world`` holds a lock here: its shards overlap ours
    (rank r of W owns shards r, r+W, …), and two writers in one shard lose data. Called after taking our
    own lock, so of two such builds starting together at least one sees the other."""
    for lock_name in sorted(n for n in storage.listdir(cache_dir) if n.startswith(LOCK_NAME)):
        w, p = _lock_world(lock_name), storage.join(cache_dir, lock_name)
        if p == own_lock or w is None or w == world:
            continue
        holder = BuildLock.holder_at(p)
        if holder is None:  # being written this instant, or garbage: look once more
            time.sleep(0.05)
            holder = BuildLock.holder_at(p)
            if holder is None:
                continue
        if holder_alive(holder):
            raise CacheError(f"{cache_dir}: cache is being built by pid {holder.get('pid')} on host "
                             f"{holder.get('host')} with {w} writer(s) (lock {p}), this build has {world}: their "
                             f"shards overlap. Wait for it to finish (or use the same --world), or "
                             f"{storage.stale_lock_hint(p)}")


def remove_debris(cache_dir: Location, rank: int, world: int) -> None:
    """Delete temp files a killed writer of our shards left behind: manifest-part temps (``.part-*``),
    zarr's ``*.partial`` chunk/metadata temps and, with a single writer, a ``cache.json`` temp. None of
    them is ever read; removing them keeps a resumed store bitwise equal to an uninterrupted one. (On an
    object store every write is one whole-object put: there are none.)"""
    p = paths(cache_dir)
    for name in storage.listdir(p["manifest"]):
        s = name[len(".part-"):len(".part-") + 5]
        if name.startswith(".part-") and s.isdigit() and int(s) % world == rank:
            storage.remove(storage.join(p["manifest"], name))
    for rel in storage.files(p["features"]):
        if not rel.endswith(".partial"):
            continue
        parts = rel.split("/")  # (array, "c", shard, …) for shard data
        if len(parts) >= 3 and parts[1] == "c" and parts[2].isdigit():
            mine = int(parts[2]) % world == rank
        else:
            mine = world == 1  # metadata: may be in flight from another rank
        if mine:
            storage.remove(storage.join(p["features"], *parts))
    if world == 1:
        for name in storage.listdir(cache_dir):
            if name.startswith(f".{CACHE_JSON}.") and name.endswith(".tmp"):
                storage.remove(storage.join(cache_dir, name))


def shard_samples(cfg, source, shard: ShardRange, ids) -> tuple[list[dict], list[torch.Tensor], float]:
    """Replay every (image, seed) of a shard: manifest rows (no checksums yet) and normalised crops."""
    t0 = time.perf_counter()
    rows, crops = [], []
    for i in range(shard.start, shard.stop):
        image, label = source.load(i)
        h, w = image.shape[-2:]
        for k in range(cfg.cache.K):
            params, img, lab = replay(source, i, k, cfg.augment, image=image, label=label)
            rows.append({"image_id": str(ids[i]), "image_index": i, "aug_seed": k, "image_h": int(h),
                         "image_w": int(w), **params.as_dict(), "image_hash": augment.content_hash(img),
                         "label_hash": augment.content_hash(lab)})
            crops.append(augment.normalize(img))
    return rows, crops, time.perf_counter() - t0



def run_teacher(teacher, crops: Sequence[torch.Tensor], names: Sequence[str], batch_size: int,
                device: torch.device) -> tuple[dict[str, np.ndarray], float]:
    """Teacher targets of ``crops`` in batches of ``batch_size``: float32 numpy (n, C, H, W) per name."""
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    seconds = 0.0
    for b in range(0, len(crops), batch_size):
        x = torch.stack(list(crops[b:b + batch_size])).to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            got = teacher.targets(x, list(names))
        for n in names:
            if n not in got:
                raise CacheError(f"teacher returned no target {n!r} (got {sorted(got)})")
            outs[n].append(got[n].detach().float().cpu().numpy())
        seconds += time.perf_counter() - t0
    return {n: np.concatenate(v) for n, v in outs.items()}, seconds


def build_cache(cfg, teacher: Any, source: Any, *, rank: int = 0, world: int = 1, progress: bool = True,
                lock_wait: float = 0.0, device: torch.device | str | None = None, record: bool = False) -> BuildResult:
    """Build (or resume) the cache of ``cfg`` for ``teacher`` on ``source``; this writer commits shards
    ``range(rank, n_shards, world)`` that are not committed yet. Returns a ``BuildResult``; ``record``: also
    write the run's ``cache_build.json`` (``write_build_record``).

    Raises ``CacheError`` for refused values (non-finite / float16 overflow, naming image, seed and
    target), a held lock (also one of a build with another ``world``), a full disk, or an inconsistent
    existing directory. Interrupted builds (killed, failed, disk full) resume from the committed shards
    and end bitwise identical to an uninterrupted build."""
    if not (0 <= rank < world):
        raise CacheError(f"rank {rank} not in [0, world={world})")
    start_time = time.perf_counter()
    if len(source) == 0:
        raise CacheError("the sample source is empty: nothing to cache")
    fp = cache_fingerprint(cfg, teacher, source)
    cache_dir = cache_dir_for(cfg, fp)
    device = torch.device(device) if device is not None else teacher_device(teacher)
    try:
        storage.makedirs(cache_dir)
        # log.txt only in a local folder: an object store cannot append to an object
        with run_log(cache_dir if storage.is_local(cache_dir) else None):
            get_logger().info(f"cache build {fp[:16]} rank {rank}/{world} in {cache_dir}")
            result = _build_locked(cfg, teacher, source, fp, cache_dir, device, rank=rank, world=world,
                                   progress=progress, lock_wait=lock_wait, start_time=start_time)
    except OSError as e:
        if is_disk_full(e):  # metadata, lock or anything outside a shard commit
            raise disk_full_error(cache_dir, e, "writing the cache") from e
        raise
    if record:
        write_build_record(cfg, result)
    return result


def run_teacher_stored(teacher, crops: Sequence[torch.Tensor], rows: Sequence[dict], names: Sequence[str],
                       cache_cfg, device: torch.device) -> tuple[dict[str, np.ndarray], dict[str, tuple], float]:
    """The teacher on ``crops`` in batches of ``cache.batch_size``, each batch encoded on ``device`` right
    after its forward (``encoding.encode``); only the stored arrays cross to the host. Returns the host
    stored arrays (n, …) per array name (``encoding.stored_arrays`` of each target), the teacher's (C, H, W)
    per target, and the seconds spent. ``rows`` (the manifest rows of ``crops``) name samples in refusals."""
    encoding = cache_cfg.encoding
    copies = HostCopies(device)
    host: dict[str, list[list[torch.Tensor]]] = {n: [] for n in names}
    specs: dict[str, tuple] = {}
    seconds, bs = 0.0, cache_cfg.batch_size
    for b in range(0, len(crops), bs):
        x = torch.stack(list(crops[b:b + bs])).to(device)
        ids = [r["image_id"] for r in rows[b:b + bs]]
        seeds = [r["aug_seed"] for r in rows[b:b + bs]]
        t0 = time.perf_counter()
        with torch.no_grad():
            got = teacher.targets(x, list(names))
            for n in names:
                if n not in got:
                    raise CacheError(f"teacher returned no target {n!r} (got {sorted(got)})")
                specs[n] = tuple(int(v) for v in got[n].shape[1:])
                parts = encode(got[n].detach(), encoding, mantissa_bits=cache_cfg.mantissa_bits,
                               pool=pool_of(cache_cfg.pool, n), target=n, ids=ids, seeds=seeds)
                host[n].append(to_host(parts, copies))
        seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    copies.wait()
    seconds += time.perf_counter() - t0
    out = {}
    for n in names:
        for j, (array, _) in enumerate(enc.stored_arrays(n, encoding)):
            out[array] = np.concatenate([batch[j].numpy() for batch in host[n]])
    return out, specs, seconds


@dataclass
class _TeacherShards:
    """The shards of ``todo`` through the teacher, in order: one shard of images is loaded and augmented
    ahead, in a thread, while the teacher runs on the current one."""

    cfg: Any
    teacher: Any
    source: Any
    names: list[str]
    device: torch.device
    teacher_s: float = 0.0
    load_s: float = 0.0

    def __call__(self, todo: Sequence[ShardRange]):
        loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-loader")

        def prepare(shard: ShardRange):
            return loader.submit(shard_samples, self.cfg, self.source, shard, self.source.ids)

        try:
            pending = prepare(todo[0]) if todo else None
            for j, shard in enumerate(todo):
                rows, crops, dt = pending.result()
                pending = prepare(todo[j + 1]) if j + 1 < len(todo) else None
                self.load_s += dt
                stored, specs, dt = run_teacher_stored(self.teacher, crops, rows, self.names, self.cfg.cache,
                                                       self.device)
                self.teacher_s += dt
                yield shard, rows, (stored, specs)
        finally:
            loader.shutdown(wait=True, cancel_futures=True)


def _target_specs(first: tuple | None, cache_dir: Location, teacher, cfg, names: list[str]) -> dict:
    """(C, H, W) per target: from the first shard's teacher outputs — no dry forward, which at a paper
    crop costs a full teacher forward per build — else from the recorded ``cache.json`` (nothing left to
    build), else from ``teacher.target_specs``."""
    if first is not None:
        return dict(first[2][1])
    if storage.is_file(paths(cache_dir)["info"]):
        recorded = load_info(cache_dir).targets
        if all(n in recorded for n in names):  # the teacher's shapes: before pooling, when pooled
            return {n: recorded[n].teacher_chw for n in names}
    return teacher.target_specs(tuple(cfg.augment.crop_size), names)


def _build_locked(cfg, teacher, source, fp: str, cache_dir: Location, device: torch.device, *, rank: int,
                  world: int, progress: bool, lock_wait: float, start_time: float) -> BuildResult:
    names = cache_target_names(cfg.cache)
    S, K = cfg.cache.shard_size, cfg.cache.K
    n_shards = num_shards(len(source), S)
    own_lock = lock_path(cache_dir, rank, world)
    with BuildLock(own_lock, wait=lock_wait):
        check_no_other_layout(cache_dir, own_lock, world)
        remove_debris(cache_dir, rank, world)
        done = committed_shards(paths(cache_dir)["manifest"], fp)
        todo = [ShardRange(s, *shard_range(s, S, len(source))) for s in range(rank, n_shards, world) if s not in done]
        todo_samples = sum((sh.stop - sh.start) * K for sh in todo)
        shards = _TeacherShards(cfg, teacher, source, names, device)
        stream = shards(todo)
        try:
            writer = _write_all(cfg, teacher, source, cache_dir, stream, names, rank=rank, world=world,
                                samples=todo_samples, progress=progress)
        finally:
            stream.close()
    return BuildResult(cache_dir, fp, n_shards, len(todo), n_shards - len(todo), todo_samples,
                       writer.bytes_written, time.perf_counter() - start_time, shards.teacher_s, shards.load_s,
                       writer.seconds)


def _write_all(cfg, teacher, source, cache_dir: Location, stream, names: list[str], *, rank: int, world: int,
               samples: int, progress: bool) -> ShardWriter:
    """Create the store, then hand every shard of ``stream`` to a background ``ShardWriter``; returns it
    closed (everything committed)."""
    # the first shard runs through the teacher before the store exists: its outputs give the shapes
    first = next(stream, None)
    info = cache_info(cfg, teacher, source, _target_specs(first, cache_dir, teacher, cfg, names))
    create_store(cache_dir, info)
    # the recorded cache.json rules a resumed build: an older cache keeps its checksum algorithm
    info = load_info(cache_dir)
    begin_run_log(cache_dir if storage.is_local(cache_dir) else None)
    fp, K = info.fingerprint, cfg.cache.K
    bar = Progress(samples, desc=f"cache {fp[:8]} rank {rank}/{world}", unit="samples", enabled=progress)

    def on_commit(buf: ShardBuffer, nbytes: int, seconds: float) -> None:
        bar.update(len(buf.rows), counters={"MB": nbytes / 1e6})

    writer = ShardWriter(cache_dir, info, rank=rank, on_commit=on_commit)
    device = teacher_device(teacher).type
    try:
        for (s, start, stop), rows, (stored, specs) in itertools.chain([first] if first else [], stream):
            arrays = _shard_arrays(stored, specs, info, names, stop - start, K)
            writer.submit(ShardBuffer(s, start, stop, arrays, rows, encoded_on=device))
    finally:
        try:
            writer.close()
        finally:
            bar.close()
    return writer


def _shard_arrays(stored: dict[str, np.ndarray], specs: dict[str, tuple], info: CacheInfo, names: list[str],
                  n_images: int, K: int) -> dict[str, np.ndarray]:
    """Stored arrays (n·K, …) → (n, K, …) per array, the teacher's shapes checked against the store's."""
    arrays = {}
    for n in names:
        want = info.targets[n].teacher_chw  # before pooling, when pooled
        if tuple(specs[n]) != tuple(want):
            raise CacheError(f"teacher target {n!r} has shape {tuple(specs[n])}, expected "
                             f"{tuple(want)} (the store's, from the first shard)")
        for array, _ in enc.stored_arrays(n, info.encoding):
            arrays[array] = stored[array].reshape(n_images, K, *stored[array].shape[1:])
    return arrays
