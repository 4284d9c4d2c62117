"""Stage 2: train the student with L = CE + α Σ_points L_Attn against cached teacher targets (SPEC §5).

Each epoch ``e`` shows image ``i`` with cached augmentation seed ``k = f(run_seed, e, i) mod K``; the
crop is rebuilt from the manifest's parameters and its hash checked before the targets are used.
``mode = "online"`` runs the same schedule on the same crops with the frozen teacher computing the
targets every step (the reference for correctness and speed). α = 0 is exactly the plain student:
same crops, same order, same initialisation, no targets read.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnfd_pipeline.cache import CacheError, CacheReader, check_compatible, find_cache, list_caches
from attnfd_pipeline.config import Config, write_resolved
from attnfd_pipeline.data.loaders import AugmentedDataset, CachedSeeds, EpochSampler, ValDataset, make_loader
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.distill import Distiller, match_size
from attnfd_pipeline.engine.optim import param_groups
from attnfd_pipeline.engine.train import fit
from attnfd_pipeline.losses import attnfd_loss
from attnfd_pipeline.models import build_model
from attnfd_pipeline.teacher import bundle_path, load_teacher, load_teacher_info
from attnfd_pipeline.utils import atomic_write_json, resolve_device, seed_everything


class StudentDataset(AugmentedDataset):
    """Training crops at the cached seeds; with a ``reader``, the crop is the replay of the stored
    parameters (hash-checked against the manifest) and the sample carries its cached targets."""

    def __init__(self, source, cfg, seeds: CachedSeeds, reader: CacheReader | None = None, names=()):
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
    def __init__(self, distiller: Distiller, *, alpha: float, norm: str, warmup_epochs: int = 0, teacher=None):
        self.distiller = self.modules = distiller
        self.alpha, self.norm, self.warmup_epochs, self.teacher = alpha, norm, warmup_epochs, teacher

    def param_groups(self, cfg):
        return param_groups(self.distiller.backbone_parameters(), self.distiller.head_parameters(), cfg)

    def _targets(self, batch) -> dict[str, torch.Tensor]:
        if self.teacher is not None:
            return self.teacher.targets(batch["image"], self.distiller.points)
        return batch["targets"]

    def distill_loss(self, feats, targets) -> torch.Tensor:
        refined = self.distiller.refine(feats)
        return sum(attnfd_loss(match_size(refined[p], targets[p]), targets[p], self.norm) for p in self.distiller.points)

    def train_step(self, batch, epoch):
        if self.alpha > 0 and epoch < self.warmup_epochs:
            # connector warm-up (reference): only the connectors learn, from frozen student features
            with torch.no_grad():
                feats = self.distiller(batch["image"])
                feats = {p: self.distiller.attention[p](feats[p]) for p in self.distiller.points}
            targets = self._targets(batch)
            loss = sum(attnfd_loss(match_size(self.distiller.connectors[p](feats[p]), targets[p]), targets[p], self.norm)
                       for p in self.distiller.points)
            return self.alpha * loss, {"distill": float(loss.detach())}
        out = self.distiller(batch["image"])
        ce = F.cross_entropy(out["out"].float(), batch["label"], ignore_index=255)
        if self.alpha == 0:
            return ce, {"ce": float(ce.detach())}
        dl = self.distill_loss(out, self._targets(batch))
        return ce + self.alpha * dl, {"ce": float(ce.detach()), "distill": float(dl.detach())}

    def predict(self, images):
        return self.distiller(images)["out"]

    def on_epoch_start(self, epoch):
        pass


def run_name(cfg: Config) -> str:
    s = cfg.student
    tag = f"{s.model.name}_{s.method}_a{s.alpha:g}_{s.norm}_{'-'.join(s.points)}_{s.mode}_s{s.train.seed}"
    if s.alpha == 0:
        tag = f"{s.model.name}_baseline_s{s.train.seed}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", tag)


def student_dir(cfg: Config) -> Path:
    return cfg.run_root / "student" / run_name(cfg)


def open_cache(cfg: Config, teacher_info: dict, source: ImageSource) -> CacheReader:
    """The cache this config and teacher produce; if there is none, name how existing caches differ."""
    try:
        path = find_cache(cfg, teacher_info, source, require_complete=True)
    except CacheError as missing:
        for other in list_caches(cfg.cache.root)[::-1]:
            try:
                check_compatible(cfg, other, teacher=teacher_info, source=source)
            except CacheError as diff:
                raise CacheError(f"{missing}\nclosest existing cache {other}: {diff}") from None
        raise
    reader = CacheReader(path)
    missing_points = [p for p in cfg.student.points if p not in reader.targets]
    if missing_points:
        raise CacheError(f"{path}: student.points {missing_points} are not cached (cache has {list(reader.targets)})")
    return reader


def run_student(cfg: Config, *, resume: bool = False, progress: bool = True) -> dict:
    """Train one student run; returns its result dict (also written to ``result.json``)."""
    s = cfg.student
    device = resolve_device(s.train.device)
    train_src = ImageSource.from_config(cfg, cfg.data.train_split)
    val_src = ImageSource.from_config(cfg, cfg.data.val_split)
    nc = train_src.info.num_classes
    out_dir = student_dir(cfg)
    reader, teacher, teacher_channels = None, None, {}
    if s.alpha > 0:
        teacher_info = load_teacher_info(bundle_path(cfg))
        if teacher_info["num_classes"] != nc:
            raise ValueError(f"{bundle_path(cfg)}: teacher has {teacher_info['num_classes']} classes, dataset "
                             f"{train_src.info.name!r} has {nc}")
        if s.mode == "cached":
            reader = open_cache(cfg, teacher_info, train_src)
            teacher_channels = {p: reader.info["targets"][p]["chw"][0] for p in s.points}
        else:
            teacher = load_teacher(bundle_path(cfg), device)
            specs = teacher.target_specs(cfg.augment.crop_size, s.points)
            teacher_channels = {p: specs[p][0] for p in s.points}
    write_resolved(cfg, out_dir)
    seed_everything(s.train.seed)
    student = build_model(s.model.name, nc, output_stride=s.model.output_stride,
                          backbone_weights=s.model.backbone_weights or None)
    # Distillation modules draw their init from a forked RNG: the student's init and its dropout
    # stream are the plain student's, so α = 0 is exactly the baseline run.
    channels = teacher_channels or {p: student.taps[p].channels for p in s.points}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.train.seed + 1)
        distiller = Distiller(student, s.points, channels)
    distiller = distiller.to(device)
    task = StudentTask(distiller, alpha=s.alpha, norm=s.norm, warmup_epochs=s.connector_warmup_epochs, teacher=teacher)
    seeds = CachedSeeds(s.train.seed, cfg.cache.K)
    train_ds = StudentDataset(train_src, cfg.augment, seeds, reader, s.points if reader is not None else ())
    sampler = EpochSampler(len(train_ds), seed=s.train.seed, shuffle=True)
    train_loader = make_loader(train_ds, batch_size=s.train.batch_size, workers=cfg.data.num_workers,
                               sampler=sampler, drop_last=len(train_ds) > s.train.batch_size, device=device)

    def train_loader_for(epoch):
        sampler.set_epoch(epoch)
        return train_loader

    val_loader = make_loader(ValDataset(val_src, cfg.augment.crop_size), batch_size=s.train.val_batch_size,
                             workers=min(cfg.data.num_workers, 1), device=device)
    t0 = time.perf_counter()
    result = fit(task, train_loader_for=train_loader_for, val_loader=val_loader, cfg=s.train, run_dir=out_dir,
                 num_classes=nc, device=device, config_dict=cfg.to_dict(), class_names=train_src.info.class_names,
                 resume=resume, progress=progress, desc=f"student a={s.alpha:g}")
    summary = {
        "run": run_name(cfg), "model": s.model.name, "method": s.method if s.alpha > 0 else "none",
        "alpha": s.alpha, "norm": s.norm, "points": list(s.points), "mode": s.mode, "seed": s.train.seed,
        "epochs": result.epochs_done, "best_miou": result.best_miou,
        "final_miou": result.last_metrics.get("miou"), "final_pixel_acc": result.last_metrics.get("pixel_acc"),
        "train_seconds": time.perf_counter() - t0, "cache": str(reader.path) if reader is not None else None,
    }
    atomic_write_json(out_dir / "result.json", summary)
    return summary
