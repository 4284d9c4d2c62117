"""Stage runners: compose config, data, models, engine and cache into one call per stage.

``stages/`` (the CLI) only parses arguments and calls these.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from attnfd_pipeline.config import Config, write_resolved
from attnfd_pipeline.data.loaders import AugmentedDataset, EpochSampler, FreshSeeds, ValDataset, make_loader
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.engine.train import evaluate, fit
from attnfd_pipeline.teacher import (CBAMFitTask, SegTask, build_side_attention, build_teacher_model, bundle_path,
                                     load_teacher, save_bundle)
from attnfd_pipeline.utils import atomic_write_json, resolve_device, seed_everything


def num_classes_of(cfg: Config, source: ImageSource) -> int:
    if cfg.num_classes and cfg.num_classes != source.info.num_classes:
        raise ValueError(f"num_classes = {cfg.num_classes} but dataset {source.info.name!r} has "
                         f"{source.info.num_classes} classes")
    return source.info.num_classes


def _loaders(cfg: Config, train_cfg, train_source: ImageSource, val_source: ImageSource, device, seed_fn):
    train_ds = AugmentedDataset(train_source, cfg.augment, seed_fn)
    sampler = EpochSampler(len(train_ds), seed=train_cfg.seed, shuffle=True)
    train_loader = make_loader(train_ds, batch_size=train_cfg.batch_size, workers=cfg.data.num_workers,
                               sampler=sampler, drop_last=len(train_ds) > train_cfg.batch_size, device=device)

    def train_loader_for(epoch: int):
        sampler.set_epoch(epoch)
        return train_loader

    val_loader = make_loader(ValDataset(val_source, cfg.augment.crop_size), batch_size=train_cfg.val_batch_size,
                             workers=min(cfg.data.num_workers, 1), device=device)
    return train_loader_for, val_loader


def run_teacher(cfg: Config, *, resume: bool = False, progress: bool = True) -> Path:
    """Train the teacher (CE), fit/attach its CBAMs per ``teacher.cbam_mode``, freeze, write the bundle."""
    t = cfg.teacher
    device = resolve_device(t.train.device)
    train_src = ImageSource.from_config(cfg, cfg.data.train_split)
    val_src = ImageSource.from_config(cfg, cfg.data.val_split)
    nc = num_classes_of(cfg, train_src)
    out_dir = cfg.teacher_dir
    write_resolved(cfg, out_dir)
    seed_everything(t.train.seed)
    model = build_teacher_model(cfg, nc).to(device)
    train_for, val_loader = _loaders(cfg, t.train, train_src, val_src, device, FreshSeeds())
    t0 = time.perf_counter()
    result = fit(SegTask(model), train_loader_for=train_for, val_loader=val_loader, cfg=t.train,
                 run_dir=out_dir / "train", num_classes=nc, device=device, config_dict=cfg.to_dict(),
                 class_names=train_src.info.class_names, resume=resume, progress=progress, desc="teacher")
    _load_best(model, out_dir / "train")
    attention = build_side_attention(cfg, model)
    if attention is not None:
        attention = attention.to(device)
    if t.cbam_mode == "fitted":
        fit_cfg = type(t.train)(**{**t.train.__dict__, "epochs": t.fit_epochs, "lr": t.fit_lr})
        task = CBAMFitTask(model, attention, nc)
        fit(task, train_loader_for=train_for, val_loader=val_loader, cfg=fit_cfg, run_dir=out_dir / "fit_cbam",
            num_classes=nc, device=device, config_dict=cfg.to_dict(), resume=resume, progress=progress,
            desc="teacher-cbam")
        _load_best(task.modules, out_dir / "fit_cbam")
    model.eval()
    metrics = evaluate(lambda x: model(x)["out"], val_loader, nc, device, class_names=train_src.info.class_names,
                       amp=t.train.amp)
    path = save_bundle(bundle_path(cfg), cfg, model.cpu(), attention.cpu() if attention is not None else None, nc,
                       metrics)
    atomic_write_json(out_dir / "result.json", {"miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"],
                                                "seconds": time.perf_counter() - t0, "epochs": result.epochs_done,
                                                "bundle": str(path)})
    return path


def _load_best(modules: torch.nn.Module, run_dir: Path) -> None:
    from attnfd_pipeline.engine.checkpoint import load_checkpoint

    best = run_dir / "best.pt"
    if best.is_file():
        modules.load_state_dict(load_checkpoint(best)["modules"])


def evaluate_bundle(cfg: Config, path: str | Path, *, split: str | None = None) -> dict:
    """Val metrics of a teacher bundle (``attnfd evaluate``)."""
    device = resolve_device(cfg.teacher.train.device)
    teacher = load_teacher(path, device)
    src = ImageSource.from_config(cfg, split or cfg.data.val_split)
    loader = make_loader(ValDataset(src, cfg.augment.crop_size), batch_size=cfg.teacher.train.val_batch_size,
                         workers=min(cfg.data.num_workers, 1), device=device)
    return evaluate(lambda x: teacher(x)["out"], loader, teacher.num_classes, device,
                    class_names=src.info.class_names, amp=cfg.teacher.train.amp)
