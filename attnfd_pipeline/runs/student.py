"""Stage 2: train the student with L = CE + α Σ_points L_Attn against the teacher's targets
(docs/method.md "Loss").

Other distillation methods (``student.method``: ``kd``, ``lad``, ``aicsd``, ``afdcd``, ``cirkd``, or
combinations such as ``attnfd+kd``) read other teacher targets through the same path; the loss is then
``ce_weight(epoch) · CE + α · Σ_m w_m L_m`` (``attnfd_pipeline.distill``).

Where the targets come from is ``student.targets`` (``TargetSource``):
- ``cached``: each epoch ``e`` shows image ``i`` with cached augmentation seed ``k = f(run_seed, e, i)`` in
  [0, K) (``student.seed_order``: ``cycle`` shows each of the K seeds once per K epochs, ``random`` draws with
  replacement); the crop is rebuilt from the manifest's parameters and its hash checked before the targets
  are used.
- ``online-replay``: the same schedule on the same crops with the frozen teacher computing the targets every
  step (the reference for correctness and speed; run name ``…_online_…``).
- ``online-fresh``: the online student sees a fresh augmentation draw every epoch (``FreshSeeds``, as the
  teacher trained): the reference the K cached seeds approximate (run name ``…_online-fresh_…``,
  ``"augment": "fresh"`` in result.json).
α = 0 is exactly the plain student: same crops, same order, same initialisation, no targets read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from attnfd_pipeline.cache import CacheError, CacheReader, check_compatible, find_cache, list_caches
from attnfd_pipeline.cache.encoding import target_pools
from attnfd_pipeline.cache.schema import extra_for, target_point
from attnfd_pipeline.cache.schema import target_names as cache_target_names
from attnfd_pipeline.config import Config, StudentConfig, TargetSource, write_resolved
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.distill import StudentTask, build_task, method_settings, method_targets, method_weights
from attnfd_pipeline.engine import distributed
from attnfd_pipeline.engine.checkpoint import check_resume
from attnfd_pipeline.engine.logging import begin as begin_run_log
from attnfd_pipeline.engine.logging import get_logger, run_log
from attnfd_pipeline.engine.protocol import EvalProtocol
from attnfd_pipeline.engine.train import FitResult, fit
from attnfd_pipeline.losses import parse_methods
from attnfd_pipeline.records import RESULT_JSON, RunRecord
from attnfd_pipeline.runs.loaders import epoch_loaders, student_dataset
from attnfd_pipeline.runs.naming import run_name, seed_order, student_dir
from attnfd_pipeline.teacher import bundle_path, load_teacher, load_teacher_info
from attnfd_pipeline.utils import atomic_write_json
from attnfd_pipeline.errors import UserError


def model_spec(cfg: Config, num_classes: int, dataset: str) -> dict:
    """What rebuilds the plain student from ``best.pt``'s ``model_state`` (``attnfd_pipeline.inference``)."""
    m = cfg.student.model
    return {"name": m.name, "num_classes": num_classes, "output_stride": m.output_stride, "dataset": dataset}


def open_cache(cfg: Config, teacher_info: dict, source: ImageSource, names=None) -> CacheReader:
    """The cache this config and teacher produce; if there is none, name how existing caches differ.
    ``names``: the targets Stage 2 will read (default: what ``student.method`` needs); a cache (or a
    cache config) without one of them is refused with the fix."""
    s = cfg.student
    names = list(names) if names is not None else method_targets(s)
    configured = cache_target_names(cfg.cache.points, cfg.cache.extra)
    missing = [n for n in names if n not in configured]
    if missing:
        raise CacheError(f"student.method {s.method!r} at points {list(s.points)} needs cached target(s) {missing}, "
                         f"but the cache config (cache.points = {list(cfg.cache.points)}, cache.extra = "
                         f"{list(cfg.cache.extra)}) does not produce them: {_cache_fix(missing, cfg)}")
    try:
        path = find_cache(cfg, teacher_info, source, require_complete=True)
    except CacheError as missing_cache:
        for other in list_caches(cfg.cache.root)[::-1]:
            try:
                check_compatible(cfg, other, teacher=teacher_info, source=source)
            except CacheError as diff:
                raise CacheError(f"{missing_cache}\nclosest existing cache {other}: {diff}") from None
        raise
    reader = CacheReader(path)
    missing = [n for n in names if n not in reader.targets]
    if missing:
        raise CacheError(f"{path}: student.method {s.method!r} needs target(s) {missing}, not in this cache "
                         f"(it has {list(reader.targets)}): {_cache_fix(missing, cfg)}")
    return reader


def _cache_fix(missing: list[str], cfg: Config) -> str:
    extra = list(extra_for(missing, cfg.cache.extra))
    points = list(dict.fromkeys([*cfg.cache.points, *(target_point(n) for n in missing if n != "logits")]))
    return (f"set cache.extra = {json.dumps(extra)}" + (f" and cache.points = {json.dumps(points)}"
                                                          if points != list(cfg.cache.points) else "")
            + " and run `attnfd cache build`")


def _check_resume_seed_order(state: dict | None, path: Path, s: StudentConfig) -> None:
    """A resumed run must keep the crop schedule its first epochs had: ``last.pt`` (``state``) records the
    seed order (``engine.checkpoint.CHECKPOINT.migrate`` fills it for one written before it was recorded)."""
    if state is None or s.targets.fresh:
        return
    recorded = state["extra"]["seed_order"]
    if recorded != s.seed_order:
        raise UserError(f"{path}: this run's first epochs showed the cached seeds in order {recorded!r}, the config "
                         f"says student.seed_order = {s.seed_order!r}; resume with --set "
                         f"'student.seed_order=\"{recorded}\"' or delete the run folder to start over")


def run_student(cfg: Config, *, resume: bool = False, progress: bool = True) -> dict:
    """Train one student run; returns its result dict (also written to ``result.json``). Its log lines go to
    ``<run>/log.txt`` as well (also on a dask worker of ``attnfd sweep``)."""
    with run_log(student_dir(cfg) if distributed.rank() == 0 else None):
        get_logger().info(f"student {run_name(cfg)} ({cfg.student.model.name}, method "
                          f"{cfg.student.method if cfg.student.alpha > 0 else 'none'}, α {cfg.student.alpha:g}) "
                          f"in {student_dir(cfg)}")
        return _run_student(cfg, resume=resume, progress=progress)


class _Targets:
    """Where a run's teacher targets come from: the cache ``reader`` or the online ``teacher`` (neither for
    the plain student), their (C, H, W), the pooling of cached ones, and the teacher's bundle info."""

    def __init__(self, cfg: Config, train_src: ImageSource, device):
        s = cfg.student
        self.reader, self.teacher, self.shapes, self.info, self.pool = None, None, {}, None, {}
        if s.alpha == 0:
            return
        names = method_targets(s)
        nc = train_src.info.num_classes
        self.info = load_teacher_info(bundle_path(cfg))
        if self.info["num_classes"] != nc:
            raise UserError(f"{bundle_path(cfg)}: teacher has {self.info['num_classes']} classes, dataset "
                             f"{train_src.info.name!r} has {nc}")
        if s.targets is TargetSource.CACHED:
            self.reader = open_cache(cfg, self.info, train_src, names)
            self.shapes = {n: self.reader.info.targets[n].chw for n in names}
            self.pool = target_pools(self.reader.info)
        else:
            self.teacher = load_teacher(bundle_path(cfg), device)
            self.shapes = self.teacher.target_specs(cfg.augment.crop_size, names)


def _run_student(cfg: Config, *, resume: bool, progress: bool) -> dict:
    s = cfg.student
    ctx = distributed.setup(s.train.device)  # torchrun: process group from the env (engine.distributed)
    device = ctx.device
    train_src = ImageSource.from_config(cfg, cfg.data.train_split)
    val_src = ImageSource.from_config(cfg, cfg.data.val_split)
    nc = train_src.info.num_classes
    out_dir = student_dir(cfg)
    targets = _Targets(cfg, train_src, device)
    task = build_task(s, nc, targets.shapes, teacher=targets.teacher, target_pool=targets.pool, device=device)
    if resume:  # before anything is written: the checkpoint must fit these modules and this crop schedule
        _check_resume_seed_order(check_resume(out_dir / "last.pt", task.distiller), out_dir / "last.pt", s)
    if ctx.is_main:
        begin_run_log(out_dir)
        write_resolved(cfg, out_dir)
    protocol = EvalProtocol.from_config(cfg)
    train_ds = student_dataset(cfg, train_src, targets.reader, task.target_names)
    train_loader_for, val_loader = epoch_loaders(cfg, s.train, train_ds, val_src, device, protocol, ctx)
    t0 = time.perf_counter()
    result = fit(task, train_loader_for=train_loader_for, val_loader=val_loader, cfg=s.train, run_dir=out_dir,
                 num_classes=nc, device=device, config_dict=cfg.to_dict(), class_names=train_src.info.class_names,
                 resume=resume, progress=progress, desc=f"student a={s.alpha:g}",
                 extra_state={"seed_order": seed_order(s), "model_spec": model_spec(cfg, nc, train_src.info.name)},
                 eval_protocol=protocol)
    seconds = result.train_seconds + (time.perf_counter() - t0 - result.seconds)  # resumes included
    summary = _record(cfg, task, result, targets, train_src, protocol.name, seconds).to_dict()
    if ctx.is_main:
        atomic_write_json(out_dir / RESULT_JSON, summary)
    return summary


def _record(cfg: Config, task: StudentTask, result: FitResult, targets: _Targets, train_src: ImageSource,
            protocol: str, seconds: float) -> RunRecord:
    """What the finished run records in result.json."""
    s = cfg.student
    last = result.last_metrics
    distilled = s.alpha > 0
    info = targets.info
    return RunRecord(
        run=run_name(cfg), model=s.model.name, method=s.method if distilled else "none",
        methods=tuple(parse_methods(s.method)) if distilled else (),
        weights=method_weights(s) if distilled else {}, method_settings=method_settings(s) if distilled else {},
        alpha=s.alpha, norm=s.norm, points=tuple(s.points), mode=s.targets.mode, augment=s.targets.augment,
        seed_order=seed_order(s), seed=s.train.seed, K=cfg.cache.K,
        targets=tuple(task.target_names) if distilled else (),
        teacher=({k: info.get(k) for k in ("model", "cbam_mode", "sha256", "points")} if info is not None else None),
        dataset=train_src.info.name, eval_protocol=protocol, epochs=result.epochs_done,
        best_miou=result.best_miou, final_miou=last.get("miou"), final_pixel_acc=last.get("pixel_acc"),
        final_class_acc=last.get("class_acc"), final_fwiou=last.get("fwiou"),
        per_class_iou=tuple(last["per_class_iou"]) if last.get("per_class_iou") is not None else None,
        class_names=tuple(train_src.info.class_names or ()),
        train_seconds=seconds, cache=str(targets.reader.path) if targets.reader is not None else None,
    )
