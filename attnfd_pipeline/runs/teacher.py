"""Stage 1: train the teacher (or import a trained one), fit or attach its CBAMs, write the bundle."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from attnfd_pipeline.config import Config, write_resolved
from attnfd_pipeline.data.loaders import AugmentedDataset, FreshSeeds
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.engine import distributed
from attnfd_pipeline.engine.checkpoint import check_resume
from attnfd_pipeline.engine.logging import begin as begin_run_log
from attnfd_pipeline.engine.logging import get_logger, run_log
from attnfd_pipeline.engine.protocol import EvalProtocol
from attnfd_pipeline.engine.train import evaluate, fit
from attnfd_pipeline.runs.inputs import check_dataset_inputs, num_classes_of
from attnfd_pipeline.runs.loaders import epoch_loaders
from attnfd_pipeline.teacher import (CBAMFitTask, SegTask, build_side_attention, build_teacher_model, bundle_path,
                                     save_bundle)
from attnfd_pipeline.utils import atomic_write_json, resolve_device, seed_everything
from attnfd_pipeline.errors import UserError


def _teacher_loaders(cfg: Config, train_src: ImageSource, val_src: ImageSource, device, protocol: EvalProtocol,
                     ctx: distributed.DistContext | None = None):
    """The teacher trains (and fits its CBAMs) on a fresh augmentation draw every epoch."""
    dataset = AugmentedDataset(train_src, cfg.augment, FreshSeeds())
    return epoch_loaders(cfg, cfg.teacher.train, dataset, val_src, device, protocol, ctx)


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
    protocol = EvalProtocol.from_config(cfg)
    train_for, val_loader = _teacher_loaders(cfg, train_src, val_src, device, protocol, ctx)
    t0 = time.perf_counter()
    _next_run("teacher")
    seg_task = SegTask(model)
    seg_task.ddp_find_unused_parameters = False  # CE on the full forward: every parameter gets a gradient
    result = fit(seg_task, train_loader_for=train_for, val_loader=val_loader, cfg=t.train,
                 run_dir=out_dir / "train", num_classes=nc, device=device, config_dict=cfg.to_dict(),
                 class_names=train_src.info.class_names, resume=resume, progress=progress, desc="teacher",
                 eval_protocol=protocol)
    _load_best(model, out_dir / "train")
    attention = build_side_attention(cfg, model)
    if attention is not None:
        attention = attention.to(device)
    if t.cbam_mode == "fitted":
        _next_run("teacher CBAM fit")
        _fit_side_cbams(cfg, model, attention, nc, train_for, val_loader, device, resume=resume, progress=progress,
                        protocol=protocol)
    model.eval()
    metrics = evaluate(lambda x: model(x)["out"], val_loader, nc, device, class_names=train_src.info.class_names,
                       amp=t.train.amp, protocol=protocol)
    path = bundle_path(cfg)
    if ctx.is_main:
        save_bundle(path, cfg, model.cpu(), attention.cpu() if attention is not None else None, nc, metrics)
        atomic_write_json(out_dir / "result.json", {"miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"],
                                                    "seconds": result.train_seconds + (time.perf_counter() - t0 - result.seconds),
                                                    "epochs": result.epochs_done,
                                                    "bundle": str(path),
                                                    "eval_protocol": metrics["protocol"],
                                                    **({"world_size": ctx.world} if ctx.distributed else {})})
    distributed.barrier()  # the bundle exists before any rank goes on
    return path


def _fit_side_cbams(cfg: Config, model, attention, nc: int, train_for, val_loader, device, *, resume: bool,
                    progress: bool, protocol: EvalProtocol) -> None:
    """``fitted`` mode: side-branch CBAMs (+ auxiliary classifiers) trained with CE on the frozen teacher."""
    t = cfg.teacher
    fit_cfg = type(t.train)(**{**t.train.__dict__, "epochs": t.fit_epochs, "lr": t.fit_lr})
    task = CBAMFitTask(model, attention, nc)
    task.ddp_find_unused_parameters = False  # every point's CBAM and classifier is in the loss
    fit(task, train_loader_for=train_for, val_loader=val_loader, cfg=fit_cfg, run_dir=cfg.teacher_dir / "fit_cbam",
        num_classes=nc, device=device, config_dict=cfg.to_dict(), resume=resume, progress=progress,
        desc="teacher-cbam", eval_protocol=protocol)
    _load_best(task.modules, cfg.teacher_dir / "fit_cbam")


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
    """Val metrics of a teacher bundle under ``cfg.eval`` (``attnfd_pipeline.inference.evaluate_checkpoint``
    takes any checkpoint kind)."""
    from attnfd_pipeline.inference import evaluate_checkpoint

    return evaluate_checkpoint(cfg, path, split=split)


def _imported_config(cfg: Config, weights, cbam_mode: str | None, path: Path) -> Config:
    """The config the imported bundle records: the chosen CBAM mode (``inpath`` for a network whose CBAMs
    are in its forward path, ``fitted`` by default), the in-path points, and no ImageNet backbone file."""
    import dataclasses

    from attnfd_pipeline.teacher_import import IMPORT_CBAM_MODES, REFERENCE_MODELS

    t = cfg.teacher
    if weights.format == "reference" and t.model.name not in REFERENCE_MODELS:
        raise UserError(f"{path}: the reference layout imports into {', '.join(REFERENCE_MODELS)}, not "
                         f"teacher.model.name = {t.model.name!r}")
    points = t.points
    if weights.inpath_points:
        if cbam_mode not in (None, "inpath"):
            raise UserError(f"{path}: this network has in-path CBAMs at {', '.join(weights.inpath_points)} (keys "
                             f"attention.*): they are part of its forward, so --cbam-mode {cbam_mode} cannot apply; "
                             f"leave --cbam-mode out to import it as it is (inpath)")
        mode, points = "inpath", weights.inpath_points
    else:
        mode = cbam_mode or "fitted"
        if mode not in IMPORT_CBAM_MODES:
            raise UserError(f"--cbam-mode {mode!r}: expected one of {', '.join(IMPORT_CBAM_MODES)}")
    model_cfg = dataclasses.replace(t.model, backbone_weights="")
    return dataclasses.replace(cfg, teacher=dataclasses.replace(t, cbam_mode=mode, points=tuple(points),
                                                                model=model_cfg))


def _imported_attention(cfg: Config, model, weights, path: Path):
    """Side-branch attention of an imported teacher; under ``untrained`` the file's own CBAMs where it has
    them (the reference's never-trained side modules), else the seeded initial ones."""
    from attnfd_pipeline.teacher_import import check_state_fits

    attention = build_side_attention(cfg, model)
    if cfg.teacher.cbam_mode == "untrained" and weights.format == "reference" and weights.cbam_state:
        for p, att in attention.items():
            if p not in weights.cbam_state:
                raise UserError(f"{path}: --cbam-mode untrained keeps the file's CBAMs, but it has none at point "
                                 f"{p} (it has {', '.join(sorted(weights.cbam_state))}); set teacher.points")
            att.load_state_dict(check_state_fits(att, weights.cbam_state[p], path, f"a CBAM at point {p}",
                                                 lambda k, p=p: weights.shown_key(f"attention.{p}.{k}")))
    return attention


def run_teacher_import(cfg: Config, path: str | Path, *, fmt: str = "auto", cbam_mode: str | None = None,
                       force: bool = False, progress: bool = True) -> Path:
    """``attnfd teacher import``: read a trained teacher from ``path`` (weights-only), map it onto the
    config's teacher model, attach CBAMs per ``cbam_mode``, evaluate it and write the same
    ``teacher_bundle.{pt,json}`` as ``run_teacher`` (recording the file's SHA-256, format and key map).
    The teacher folder's ``log.txt`` gets the lines (from the moment the import writes the folder)."""
    with run_log(cfg.teacher_dir):
        get_logger().info(f"teacher import {path} into {cfg.teacher_dir}")
        return _run_teacher_import(cfg, path, fmt=fmt, cbam_mode=cbam_mode, force=force, progress=progress)


def _run_teacher_import(cfg: Config, path: str | Path, *, fmt: str, cbam_mode: str | None, force: bool,
                        progress: bool) -> Path:
    from attnfd_pipeline.teacher_import import check_state_fits, read_teacher_file

    path = Path(path)
    out = bundle_path(cfg)
    if out.exists() and not force:
        raise UserError(f"{out}: a teacher bundle is already there; pass --force to replace it with {path}")
    weights = read_teacher_file(path, fmt)
    check_dataset_inputs(cfg)
    train_src = ImageSource.from_config(cfg, cfg.data.train_split)
    val_src = ImageSource.from_config(cfg, cfg.data.val_split)
    nc = num_classes_of(cfg, train_src)
    head = weights.model_state.get("classifier.weight")
    if head is not None and head.shape[0] != nc:
        raise UserError(f"{path}: the teacher predicts {head.shape[0]} classes, dataset {train_src.info.name!r} "
                         f"has {nc}")
    cfg = _imported_config(cfg, weights, cbam_mode, path)
    device = resolve_device(cfg.teacher.train.device)
    seed_everything(cfg.teacher.train.seed)
    model = build_teacher_model(cfg, nc)
    state = dict(weights.model_state)
    state.update({f"attention.{p}.{k}": v for p, s in weights.cbam_state.items() if weights.inpath_points
                  for k, v in s.items()})
    model.load_state_dict(check_state_fits(model, state, path, f"{cfg.teacher.model.name} ({nc} classes, "
                                                               f"{weights.format} layout)", weights.shown_key))
    model = model.to(device)
    attention = _imported_attention(cfg, model, weights, path)
    attention = attention.to(device) if attention is not None else None
    write_resolved(cfg, cfg.teacher_dir)
    begin_run_log(cfg.teacher_dir)
    t0 = time.perf_counter()
    protocol = EvalProtocol.from_config(cfg)
    train_for, val_loader = _teacher_loaders(cfg, train_src, val_src, device, protocol)
    if cfg.teacher.cbam_mode == "fitted":
        _fit_side_cbams(cfg, model, attention, nc, train_for, val_loader, device, resume=False, progress=progress,
                        protocol=protocol)
    model.eval()
    metrics = evaluate(lambda x: model(x)["out"], val_loader, nc, device, class_names=train_src.info.class_names,
                       amp=cfg.teacher.train.amp, protocol=protocol)
    save_bundle(out, cfg, model.cpu(), attention.cpu() if attention is not None else None, nc, metrics,
                source=weights.source(path))
    atomic_write_json(cfg.teacher_dir / "result.json", {"miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"],
                                                        "seconds": time.perf_counter() - t0, "epochs": 0,
                                                        "bundle": str(out), "imported_from": str(path),
                                                        "eval_protocol": metrics["protocol"]})
    return out
