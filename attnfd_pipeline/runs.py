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
from attnfd_pipeline.engine import distributed
from attnfd_pipeline.engine.checkpoint import check_resume
from attnfd_pipeline.engine.logging import begin as begin_run_log
from attnfd_pipeline.engine.logging import get_logger, run_log
from attnfd_pipeline.engine.train import evaluate, fit
from attnfd_pipeline.teacher import (CBAMFitTask, SegTask, build_side_attention, build_teacher_model, bundle_path,
                                     load_teacher, save_bundle)
from attnfd_pipeline.utils import atomic_write_json, resolve_device, seed_everything


def check_dataset_inputs(cfg: Config, splits=None) -> None:
    """Before a stage writes anything: the splits are listed and not empty, every listed image opens
    (header) with the size of its label, every label decodes with legal values. Raises ``DataError``
    naming the files (``attnfd data check`` decodes the images fully)."""
    from attnfd_pipeline.data.check import check_dataset, format_problems
    from attnfd_pipeline.data.datasets import DataError

    splits = list(splits or (cfg.data.train_split, cfg.data.val_split))
    problems = check_dataset(cfg.data.dataset, cfg.data.root, splits, decode_images=False)
    if problems:
        raise DataError(problems[0].path, f"dataset {cfg.data.dataset!r} at {cfg.data.root} (splits "
                                          f"{', '.join(splits)}): {format_problems(problems, limit=10)}")


def check_student_inputs(cfg: Config) -> None:
    """What Stage 2 can check before it writes anything, beyond what ``run_student`` checks itself:
    the dataset files, and a ``student.model.backbone_weights`` file that exists and fits the model."""
    from attnfd_pipeline.data.datasets import get_dataset_info
    from attnfd_pipeline.models import build_model

    check_dataset_inputs(cfg)
    m = cfg.student.model
    if m.backbone_weights:
        build_model(m.name, get_dataset_info(cfg.data.dataset).num_classes, output_stride=m.output_stride,
                    backbone_weights=m.backbone_weights)


def num_classes_of(cfg: Config, source: ImageSource) -> int:
    if cfg.num_classes and cfg.num_classes != source.info.num_classes:
        raise ValueError(f"num_classes = {cfg.num_classes} but dataset {source.info.name!r} has "
                         f"{source.info.num_classes} classes")
    return source.info.num_classes


def _loaders(cfg: Config, train_cfg, train_source: ImageSource, val_source: ImageSource, device, seed_fn,
             ctx: distributed.DistContext | None = None):
    """Train loader (per epoch) and val loader; with a distributed ``ctx``, this rank's share of both."""
    ctx = ctx or distributed.DistContext(device=device)
    train_ds = AugmentedDataset(train_source, cfg.augment, seed_fn)
    sampler = EpochSampler(len(train_ds), seed=train_cfg.seed, shuffle=True, rank=ctx.rank, world=ctx.world)
    train_loader = make_loader(train_ds, batch_size=train_cfg.batch_size, workers=cfg.data.num_workers,
                               sampler=sampler, drop_last=len(sampler) > train_cfg.batch_size, device=device)

    def train_loader_for(epoch: int):
        sampler.set_epoch(epoch)
        return train_loader

    val_ds = ValDataset(val_source, cfg.augment.crop_size)
    val_loader = make_loader(val_ds, batch_size=train_cfg.val_batch_size, workers=min(cfg.data.num_workers, 1),
                             sampler=distributed.eval_sampler(len(val_ds), ctx), device=device)
    return train_loader_for, val_loader


def run_teacher(cfg: Config, *, resume: bool = False, progress: bool = True) -> Path:
    """Train the teacher (CE), fit/attach its CBAMs per ``teacher.cbam_mode``, freeze, write the bundle.
    Under torchrun every rank runs this (DDP, ``engine.distributed``); rank 0 writes the files, ``log.txt``
    included."""
    check_dataset_inputs(cfg)  # before the first file (log.txt) is written
    with run_log(cfg.teacher_dir if distributed.rank() == 0 else None):
        get_logger().info(f"teacher {cfg.teacher.model.name} ({cfg.teacher.cbam_mode} CBAM) in {cfg.teacher_dir}")
        runs = 2 if cfg.teacher.cbam_mode == "fitted" else 1  # the CBAM fit is a second training
        with _job_or_current("teacher", runs):
            return _run_teacher(cfg, resume=resume, progress=progress)


def _job_or_current(desc: str, runs: int):
    """A progress job of ``runs`` trainings, unless this call is part of a larger job already (studies)."""
    import contextlib

    from attnfd_pipeline.progress import current_job, job

    return contextlib.nullcontext() if current_job() is not None or runs == 1 else job(desc, runs)


def _run_teacher(cfg: Config, *, resume: bool, progress: bool) -> Path:
    t = cfg.teacher
    ctx = distributed.setup(t.train.device)
    device = ctx.device
    train_src = ImageSource.from_config(cfg, cfg.data.train_split)
    val_src = ImageSource.from_config(cfg, cfg.data.val_split)
    nc = num_classes_of(cfg, train_src)
    out_dir = cfg.teacher_dir
    seed_everything(t.train.seed)
    model = build_teacher_model(cfg, nc).to(device)  # backbone_weights: missing file / keys raise here
    if resume:
        check_resume(out_dir / "train" / "last.pt", model)  # e.g. a checkpoint for another num_classes
    if ctx.is_main:
        begin_run_log(out_dir)
        write_resolved(cfg, out_dir)
    train_for, val_loader = _loaders(cfg, t.train, train_src, val_src, device, FreshSeeds(), ctx)
    t0 = time.perf_counter()
    _next_run("teacher")
    seg_task = SegTask(model)
    seg_task.ddp_find_unused_parameters = False  # CE on the full forward: every parameter gets a gradient
    result = fit(seg_task, train_loader_for=train_for, val_loader=val_loader, cfg=t.train,
                 run_dir=out_dir / "train", num_classes=nc, device=device, config_dict=cfg.to_dict(),
                 class_names=train_src.info.class_names, resume=resume, progress=progress, desc="teacher")
    _load_best(model, out_dir / "train")
    attention = build_side_attention(cfg, model)
    if attention is not None:
        attention = attention.to(device)
    if t.cbam_mode == "fitted":
        fit_cfg = type(t.train)(**{**t.train.__dict__, "epochs": t.fit_epochs, "lr": t.fit_lr})
        task = CBAMFitTask(model, attention, nc)
        task.ddp_find_unused_parameters = False  # every point's CBAM and classifier is in the loss
        _next_run("teacher CBAM fit")
        fit(task, train_loader_for=train_for, val_loader=val_loader, cfg=fit_cfg, run_dir=out_dir / "fit_cbam",
            num_classes=nc, device=device, config_dict=cfg.to_dict(), resume=resume, progress=progress,
            desc="teacher-cbam")
        _load_best(task.modules, out_dir / "fit_cbam")
    model.eval()
    metrics = evaluate(lambda x: model(x)["out"], val_loader, nc, device, class_names=train_src.info.class_names,
                       amp=t.train.amp)
    path = bundle_path(cfg)
    if ctx.is_main:
        save_bundle(path, cfg, model.cpu(), attention.cpu() if attention is not None else None, nc, metrics)
        atomic_write_json(out_dir / "result.json", {"miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"],
                                                    "seconds": result.train_seconds + (time.perf_counter() - t0 - result.seconds),
                                                    "epochs": result.epochs_done,
                                                    "bundle": str(path),
                                                    **({"world_size": ctx.world} if ctx.distributed else {})})
    distributed.barrier()  # the bundle exists before any rank goes on
    return path


def _next_run(label: str) -> None:
    from attnfd_pipeline.progress import current_job

    j = current_job()
    if j is not None and j.desc == "teacher":  # a larger job (studies) counts the teacher as one of its runs
        j.next(label)


def _load_best(modules: torch.nn.Module, run_dir: Path) -> None:
    from attnfd_pipeline.engine.checkpoint import load_checkpoint, load_modules

    best = run_dir / "best.pt"
    if best.is_file():
        load_modules(modules, load_checkpoint(best)["modules"], best)


def evaluate_bundle(cfg: Config, path: str | Path, *, split: str | None = None) -> dict:
    """Val metrics of a teacher bundle (``attnfd evaluate``)."""
    device = resolve_device(cfg.teacher.train.device)
    teacher = load_teacher(path, device)
    src = ImageSource.from_config(cfg, split or cfg.data.val_split)
    if teacher.num_classes != src.info.num_classes:
        raise ValueError(f"{path}: teacher bundle has {teacher.num_classes} classes, dataset {src.info.name!r} "
                         f"has {src.info.num_classes}")
    loader = make_loader(ValDataset(src, cfg.augment.crop_size), batch_size=cfg.teacher.train.val_batch_size,
                         workers=min(cfg.data.num_workers, 1), device=device)
    return evaluate(lambda x: teacher(x)["out"], loader, teacher.num_classes, device,
                    class_names=src.info.class_names, amp=cfg.teacher.train.amp)
