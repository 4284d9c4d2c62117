"""Stage 2: train the student with L = CE + α Σ_points L_Attn against cached teacher targets
(docs/method.md "Loss").

Other distillation methods (``student.method``: ``kd``, ``lad``, ``aicsd``, ``afdcd``, ``cirkd``, or
combinations such as ``attnfd+kd``) read other cached targets through the same path; the loss is then
``ce_weight(epoch) · CE + α · Σ_m w_m L_m`` (``attnfd_pipeline.losses``).

Each epoch ``e`` shows image ``i`` with cached augmentation seed ``k = f(run_seed, e, i)`` in [0, K)
(``student.seed_order``: ``cycle`` shows each of the K seeds once per K epochs, ``random`` draws with
replacement); the crop is rebuilt from the manifest's parameters and its hash checked before the targets are used.
``mode = "online"`` runs the same schedule on the same crops with the frozen teacher computing the
targets every step (the reference for correctness and speed). With ``online_fresh = true`` the online
student instead sees a fresh augmentation draw every epoch (``FreshSeeds``, as the teacher trained): the
reference the K cached seeds approximate (run name ``…_online-fresh_…``, ``"augment": "fresh"`` in
result.json). α = 0 is exactly the plain student: same crops, same order, same initialisation, no
targets read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnfd_pipeline.cache import CacheError, CacheReader, check_compatible, find_cache, list_caches
from attnfd_pipeline.cache.schema import extra_for, target_point
from attnfd_pipeline.cache.encoding import target_pools
from attnfd_pipeline.cache.schema import target_names as cache_target_names
from attnfd_pipeline.config import (LEGACY_SEED_ORDER, METHOD_SECTIONS, Config, ConfigError, StudentConfig, load_config,
                                    write_resolved)
from attnfd_pipeline.data.loaders import (AugmentedDataset, CachedSeeds, EpochSampler, FreshSeeds, make_loader,
                                          make_val_loader)
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.distill import Distiller
from attnfd_pipeline.engine import distributed
from attnfd_pipeline.engine.checkpoint import check_resume
from attnfd_pipeline.engine.protocol import EvalProtocol
from attnfd_pipeline.engine.logging import begin as begin_run_log
from attnfd_pipeline.engine.logging import get_logger, run_log
from attnfd_pipeline.engine.optim import param_groups
from attnfd_pipeline.engine.train import RESUMABLE_CHANGES, fit
from attnfd_pipeline.losses import MethodContext, build_methods, parse_methods, required_targets
from attnfd_pipeline.models import build_model
from attnfd_pipeline.records import RESULT_JSON, RunRecord
from attnfd_pipeline.teacher import bundle_path, load_teacher, load_teacher_info
from attnfd_pipeline.utils import atomic_write_json, seed_everything


class StudentDataset(AugmentedDataset):
    """Training crops at the cached seeds (or fresh ones, ``FreshSeeds``, for an online run with
    ``student.online_fresh``); with a ``reader``, the crop is the replay of the stored parameters
    (hash-checked against the manifest) and the sample carries its cached targets."""

    def __init__(self, source, cfg, seeds: CachedSeeds | FreshSeeds, reader: CacheReader | None = None, names=()):
        super().__init__(source, cfg, seeds)
        self.reader, self.names = reader, tuple(names)

    def __getitem__(self, key):
        epoch, index = key
        if self.reader is None:
            return super().__getitem__(key)
        from attnfd_pipeline import augment

        k = self.seed_fn(epoch, index)
        image, label = self.reader.replay(self.source, index, k, check=True)
        targets = {n: torch.from_numpy(a) for n, a in self.reader.read(index, k, self.names).items()}
        return {"image": augment.normalize(image), "label": label.long(), "index": index, "aug_seed": k,
                "targets": targets}


class StudentTask:
    """L = ce_weight(epoch) · CE + α · Σ_m w_m · L_m over the distiller's methods (AttnFD by default).

    ``norm`` (when given) is set on the methods that normalise features (attnfd, lad); ``weights`` maps
    method names to w_m (default 1). With ``teacher`` the targets are computed online every step."""

    def __init__(self, distiller: Distiller, *, alpha: float, norm: str | None = None, warmup_epochs: int = 0,
                 teacher=None, weights: dict[str, float] | None = None):
        self.distiller = self.modules = distiller
        self.deploy_model = distiller.student  # best.pt also stores it alone (what evaluate / export load)
        self.alpha, self.warmup_epochs, self.teacher = alpha, warmup_epochs, teacher
        self.norm = norm
        if norm is not None:
            for m in distiller.methods.values():
                if hasattr(m, "norm"):
                    m.norm = norm
        unknown = sorted(set(weights or {}) - set(distiller.methods))
        if unknown:
            raise ValueError(f"weights for methods {unknown} that are not in use ({list(distiller.methods)})")
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in distiller.methods}
        self.target_names = distiller.required_targets()

    def param_groups(self, cfg):
        return param_groups(self.distiller.backbone_parameters(), self.distiller.head_parameters(), cfg)

    def _targets(self, batch) -> dict[str, torch.Tensor]:
        if self.teacher is not None:
            return self.teacher.targets(batch["image"], self.target_names)
        return batch["targets"]

    def distill_terms(self, out, targets, epoch: int = 0, batch=None, *, warmup: bool = False):
        """Σ_m w_m L_m and the logs (each method's loss and its own sub-terms)."""
        total, logs = None, {}
        for name, method in self.distiller.methods.items():
            if warmup and not method.has_parameters():
                continue  # nothing of this method learns while the student is frozen
            fn = method.warmup_loss if warmup else method
            loss, sub = fn(out, targets, epoch, batch)
            w = self.weights[name]
            total = w * loss if total is None else total + w * loss
            logs[name] = float(loss.detach())
            logs.update({f"{name}_{k}": v for k, v in sub.items()})
        return total, logs

    def distill_loss(self, feats, targets, epoch: int = 0, batch=None) -> torch.Tensor:
        """The weighted distillation loss Σ_m w_m L_m (a tensor)."""
        loss, _ = self.distill_terms(feats, targets, epoch, batch)
        return loss if loss is not None else torch.zeros((), device=feats["out"].device)

    def train_step(self, batch, epoch):
        learnable = any(m.has_parameters() for m in self.distiller.methods.values())
        if self.alpha > 0 and epoch < self.warmup_epochs and learnable:
            # connector warm-up (reference): only the methods' modules learn, from frozen student features
            with torch.no_grad():
                out = self.distiller(batch["image"])
            loss, logs = self.distill_terms(out, self._targets(batch), epoch, batch, warmup=True)
            return self.alpha * loss, {"distill": float(loss.detach()), **logs}
        out = self.distiller(batch["image"])
        ce = F.cross_entropy(out["out"].float(), batch["label"], ignore_index=255)
        if self.alpha == 0 or not self.distiller.methods:
            return ce, {"ce": float(ce.detach())}
        dl, logs = self.distill_terms(out, self._targets(batch), epoch, batch)
        cw = self.distiller.ce_weight(epoch)
        loss = ce if cw == 1.0 else cw * ce
        return loss + self.alpha * dl, {"ce": float(ce.detach()), "distill": float(dl.detach()), **logs}

    def predict(self, images):
        return self.distiller(images)["out"]

    def on_epoch_start(self, epoch):
        pass


def method_weights(s: StudentConfig) -> dict[str, float]:
    """w_m (the factor on α) of every method of ``student.method``: ``StudentConfig.method_weight``."""
    return {n: s.method_weight(n) for n in parse_methods(s.method)}


def method_settings(s: StudentConfig) -> dict[str, dict]:
    """The config sections of the methods in use (what a run's result records)."""
    out = {}
    for n in parse_methods(s.method):
        params = s.method_params(n)
        out[n] = dataclasses.asdict(params) if params is not None else {}
    return out


def model_spec(cfg: Config, num_classes: int, dataset: str) -> dict:
    """What rebuilds the plain student from ``best.pt``'s ``model_state`` (``attnfd_pipeline.inference``)."""
    m = cfg.student.model
    return {"name": m.name, "num_classes": num_classes, "output_stride": m.output_stride, "dataset": dataset}


def method_targets(s: StudentConfig) -> list[str]:
    """Teacher targets the configured methods read at ``student.points``."""
    return required_targets(s.method, s.points)


def build_distiller(student: torch.nn.Module, s: StudentConfig, target_shapes: dict[str, tuple[int, int, int]],
                    num_classes: int, *, distill: bool = True,
                    target_pool: dict[str, tuple[int, int, int]] | None = None) -> Distiller:
    """The student wrapped with the modules of the methods of ``student.method`` (none when ``distill``
    is false: the plain student). ``target_shapes``: (C, H, W) of each teacher target they read;
    ``target_pool``: (factor, full H, full W) of the targets the cache stores pooled."""
    if not distill:
        return Distiller(student, s.points, methods={})

    def context(name: str) -> MethodContext:
        return MethodContext(points=tuple(s.points), student_channels={p: t.channels for p, t in student.taps.items()},
                             target_shapes=target_shapes, num_classes=num_classes, epochs=s.train.epochs,
                             norm=s.norm, params=s.method_params(name), target_pool=dict(target_pool or {}))

    return Distiller(student, s.points, methods=build_methods(s.method, context))


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


def fresh_augmentation(s: StudentConfig) -> bool:
    """Whether the training crops are fresh draws every epoch (online mode with ``online_fresh``) rather
    than replays of the K cached augmentation seeds."""
    return s.mode == "online" and s.online_fresh


def augment_kind(s: StudentConfig) -> str:
    """``"fresh"`` or ``"replay"`` (what result.json records as ``augment``)."""
    return "fresh" if fresh_augmentation(s) else "replay"


def mode_tag(s: StudentConfig) -> str:
    """``cached``, ``online`` (teacher online on the replayed crops) or ``online-fresh``."""
    return "online-fresh" if fresh_augmentation(s) else s.mode


def train_seeds(cfg: Config) -> CachedSeeds | FreshSeeds:
    """The aug seed of image ``index`` in ``epoch``: one of the K cached seeds, or a fresh draw per epoch."""
    if fresh_augmentation(cfg.student):
        return FreshSeeds(run_seed=cfg.student.train.seed)
    return CachedSeeds(cfg.student.train.seed, cfg.cache.K, cfg.student.seed_order)


def run_name(cfg: Config) -> str:
    """Run folder name: everything that makes runs differ (method, α, norm, points, mode — ``online-fresh``
    for fresh augmentation —, K, method settings when not the defaults, seed)."""
    s = cfg.student
    tag = f"{s.model.name}_{s.method}_a{s.alpha:g}_{s.norm}_{'-'.join(s.points)}_{mode_tag(s)}_K{cfg.cache.K}"
    settings = _settings_tag(s)
    if settings:
        tag += f"_p{settings}"
    tag += storage_tag(cfg)
    tag += f"_s{s.train.seed}"
    if s.alpha == 0:  # the plain student: only its crops (cached seeds at K, or fresh) set it apart
        crops = "fresh" if fresh_augmentation(s) else f"K{cfg.cache.K}"
        tag = f"{s.model.name}_baseline_{crops}_s{s.train.seed}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", tag)


def storage_tag(cfg: Config) -> str:
    """``_int8``, ``_poolD2`` … for a cached run on a cache that is not float16 at full resolution (its
    targets, and with pooling its loss, differ); "" otherwise, so the names of earlier runs are kept."""
    c = cfg.cache
    if cfg.student.mode != "cached" or cfg.student.alpha == 0:
        return ""
    tag = "" if c.encoding == "float16" else f"_{c.encoding}"
    return tag + "".join(f"_pool{p}{f}" for p, f in c.pool)


def student_dir(cfg: Config) -> Path:
    return cfg.run_root / "student" / run_name(cfg)


def finished_run_differences(cfg: Config) -> str | None:
    """Why the finished run in ``student_dir(cfg)`` is not the run ``cfg`` describes (None when it is): it
    was distilled from another teacher bundle, or its resolved config trains differently (student and
    augmentation settings, K). The run name does not encode everything (lr, epochs, crop …), so a sweep or
    a bench must not let such a run silently stand in. Where it ran and how often it evaluated may differ
    (``engine.train.RESUMABLE_CHANGES``)."""
    run_dir = student_dir(cfg)
    result = json.loads((run_dir / "result.json").read_text())
    recorded = (result.get("teacher") or {}).get("sha256")
    if cfg.student.alpha > 0 and recorded and bundle_path(cfg).is_file():
        current = load_teacher_info(bundle_path(cfg)).get("sha256")
        if current and recorded != current:
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
    old_student = dataclasses.replace(old.student, seed_order=result.get("seed_order", LEGACY_SEED_ORDER))
    diff = _differences("student", _recipe(old_student), _recipe(cfg.student))
    diff += _differences("augment", dataclasses.asdict(old.augment), dataclasses.asdict(cfg.augment))
    diff += [] if old.cache.K == cfg.cache.K else [f"cache.K: {old.cache.K} → {cfg.cache.K}"]
    diff += [f"cache.{k}: {getattr(old.cache, k)!r} → {getattr(cfg.cache, k)!r}" for k in ("encoding", "pool")
             if cfg.student.mode == "cached" and getattr(old.cache, k) != getattr(cfg.cache, k)]
    return "; ".join(diff) or None


def _recipe(s: StudentConfig) -> dict:
    """``s`` as a dict without the sections of methods it does not train with (``student.cirkd`` does not
    change an AttnFD run: adding or tuning it in a config must not orphan finished runs)."""
    used = set(parse_methods(s.method)) if s.alpha > 0 else set()
    unused = {"seed_order"} if fresh_augmentation(s) else set()  # fresh crops never read the cached seeds
    return {k: (s.method_recipe(k) if k in METHOD_SECTIONS else v) for k, v in dataclasses.asdict(s).items()
            if (k not in METHOD_SECTIONS or k in used) and k not in unused}


def _differences(prefix: str, old: dict, new: dict) -> list[str]:
    out = []
    for k in new:
        if isinstance(new[k], dict) and isinstance(old.get(k), dict):
            out += _differences(f"{prefix}.{k}", old[k], new[k])
        elif k not in RESUMABLE_CHANGES and old.get(k) != new[k]:
            out.append(f"{prefix}.{k}: {old.get(k)!r} → {new[k]!r}")
    return out


def finished_result(cfg: Config) -> dict:
    """The result.json of the finished run of ``cfg``; ``ValueError`` naming the folder and what differs
    when it was trained under another config (``finished_run_differences``)."""
    reason = finished_run_differences(cfg)
    if reason:
        raise ValueError(f"{student_dir(cfg)}: a finished run with another config ({reason}); move or delete "
                         f"that folder to retrain it")
    return json.loads((student_dir(cfg) / "result.json").read_text())


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


def _seed_order(s: StudentConfig) -> str | None:
    """The cached-seed order a run's crops follow (None: fresh crops, which never read the cached seeds)."""
    return None if fresh_augmentation(s) else s.seed_order


def _check_resume_seed_order(state: dict | None, path: Path, s: StudentConfig) -> None:
    """A resumed run must keep the crop schedule its first epochs had: ``last.pt`` (``state``) records the
    seed order (one that does not record it followed ``LEGACY_SEED_ORDER``)."""
    if state is None or fresh_augmentation(s):
        return
    recorded = (state.get("extra") or {}).get("seed_order", LEGACY_SEED_ORDER)
    if recorded != s.seed_order:
        raise ValueError(f"{path}: this run's first epochs showed the cached seeds in order {recorded!r}, the config "
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


def _run_student(cfg: Config, *, resume: bool, progress: bool) -> dict:
    s = cfg.student
    ctx = distributed.setup(s.train.device)  # torchrun: process group from the env (engine.distributed)
    device = ctx.device
    train_src = ImageSource.from_config(cfg, cfg.data.train_split)
    val_src = ImageSource.from_config(cfg, cfg.data.val_split)
    nc = train_src.info.num_classes
    out_dir = student_dir(cfg)
    reader, teacher, target_shapes, teacher_info, target_pool = None, None, {}, None, {}
    names = method_targets(s)
    if s.alpha > 0:
        teacher_info = load_teacher_info(bundle_path(cfg))
        if teacher_info["num_classes"] != nc:
            raise ValueError(f"{bundle_path(cfg)}: teacher has {teacher_info['num_classes']} classes, dataset "
                             f"{train_src.info.name!r} has {nc}")
        if s.mode == "cached":
            reader = open_cache(cfg, teacher_info, train_src, names)
            target_shapes = {n: reader.info.targets[n].chw for n in names}
            target_pool = target_pools(reader.info)
        else:
            teacher = load_teacher(bundle_path(cfg), device)
            target_shapes = teacher.target_specs(cfg.augment.crop_size, names)
    seed_everything(s.train.seed)
    student = build_model(s.model.name, nc, output_stride=s.model.output_stride,
                          backbone_weights=s.model.backbone_weights or None)
    # Distillation modules draw their init from a forked RNG: the student's init and its dropout
    # stream are the plain student's, so α = 0 is exactly the baseline run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.train.seed + 1)
        distiller = build_distiller(student, s, target_shapes, nc, distill=s.alpha > 0, target_pool=target_pool)
    distiller = distiller.to(device)
    if resume:  # before anything is written: the checkpoint must fit these modules and this crop schedule
        _check_resume_seed_order(check_resume(out_dir / "last.pt", distiller), out_dir / "last.pt", s)
    if ctx.is_main:
        begin_run_log(out_dir)
        write_resolved(cfg, out_dir)
    task = StudentTask(distiller, alpha=s.alpha, norm=s.norm, warmup_epochs=s.connector_warmup_epochs, teacher=teacher,
                       weights=method_weights(s) if s.alpha > 0 else None)
    seeds = train_seeds(cfg)
    train_ds = StudentDataset(train_src, cfg.augment, seeds, reader, task.target_names if reader is not None else ())
    sampler = EpochSampler(len(train_ds), seed=s.train.seed, shuffle=True, rank=ctx.rank, world=ctx.world)
    train_loader = make_loader(train_ds, batch_size=s.train.batch_size, workers=cfg.data.num_workers,
                               sampler=sampler, drop_last=len(sampler) > s.train.batch_size, device=device)

    def train_loader_for(epoch):
        sampler.set_epoch(epoch)
        return train_loader

    protocol = EvalProtocol.from_config(cfg)
    val_loader = make_val_loader(val_src, protocol, batch_size=s.train.val_batch_size,
                                 workers=min(cfg.data.num_workers, 1),
                                 sampler=distributed.eval_sampler(len(val_src), ctx), device=device)
    t0 = time.perf_counter()
    result = fit(task, train_loader_for=train_loader_for, val_loader=val_loader, cfg=s.train, run_dir=out_dir,
                 num_classes=nc, device=device, config_dict=cfg.to_dict(), class_names=train_src.info.class_names,
                 resume=resume, progress=progress, desc=f"student a={s.alpha:g}",
                 extra_state={"seed_order": _seed_order(s), "model_spec": model_spec(cfg, nc, train_src.info.name)},
                 eval_protocol=protocol)
    last = result.last_metrics
    distilled = s.alpha > 0
    record = RunRecord(
        run=run_name(cfg), model=s.model.name, method=s.method if distilled else "none",
        methods=tuple(parse_methods(s.method)) if distilled else (),
        weights=method_weights(s) if distilled else {}, method_settings=method_settings(s) if distilled else {},
        alpha=s.alpha, norm=s.norm, points=tuple(s.points), mode=s.mode, augment=augment_kind(s),
        seed_order=_seed_order(s), seed=s.train.seed, K=cfg.cache.K,
        targets=tuple(task.target_names) if distilled else (),
        teacher=({k: teacher_info.get(k) for k in ("model", "cbam_mode", "sha256", "points")}
                 if teacher_info is not None else None),
        dataset=train_src.info.name, eval_protocol=protocol.name, epochs=result.epochs_done,
        best_miou=result.best_miou, final_miou=last.get("miou"), final_pixel_acc=last.get("pixel_acc"),
        final_class_acc=last.get("class_acc"), final_fwiou=last.get("fwiou"),
        per_class_iou=tuple(last["per_class_iou"]) if last.get("per_class_iou") is not None else None,
        class_names=tuple(train_src.info.class_names or ()),
        train_seconds=result.train_seconds + (time.perf_counter() - t0 - result.seconds),  # resumes included
        cache=str(reader.path) if reader is not None else None,
    )
    summary = record.to_dict()
    if ctx.is_main:
        atomic_write_json(out_dir / RESULT_JSON, summary)
    return summary
