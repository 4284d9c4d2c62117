"""The training engine shared by the teacher and the student: ``train_one_epoch``, ``evaluate``, ``fit``.

A *task* supplies what differs between stages (which modules train, how a batch becomes a loss,
how to predict); the engine owns the loop, the optimiser and schedule, AMP, evaluation,
checkpoints (best + last, atomic), ``--resume`` and the Parquet metrics log.

Under torchrun (``engine.distributed``) the same loop runs on every rank: the training step is wrapped
in DistributedDataParallel, train logs and val confusion matrices are summed over ranks, and only
rank 0 writes files. A single process takes exactly the code path it took before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import pyarrow.parquet as pq
import torch
from torch import nn

from attnfd_pipeline.augment import normalize
from attnfd_pipeline.config import TrainConfig
from attnfd_pipeline.engine import distributed
from attnfd_pipeline.engine.checkpoint import load_checkpoint, load_modules, save_checkpoint
from attnfd_pipeline.safe_load import sidecar_path
from attnfd_pipeline.engine.metrics import confusion_matrix, metrics_from_confusion
from attnfd_pipeline.engine.logging import get_logger
from attnfd_pipeline.engine.optim import build_optimizer, build_scheduler
from attnfd_pipeline.engine.protocol import EvalProtocol
from attnfd_pipeline.engine.steps import StepLog, summary_writer_class, write_table
from attnfd_pipeline.progress import Progress
from attnfd_pipeline.utils import atomic_write_json, rng_state, set_rng_state
from attnfd_pipeline.errors import UserError


class Task(Protocol):
    modules: nn.Module  # every trainable module; its state_dict is what checkpoints hold

    def param_groups(self, cfg: TrainConfig) -> list[dict]: ...

    def train_step(self, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, float]]: ...

    def predict(self, images: torch.Tensor) -> torch.Tensor: ...

    def on_epoch_start(self, epoch: int) -> None: ...


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``fit``: where the run was (1-based epoch of ``epochs``, global step). ``last.pt`` holds
    the last finished epoch (a save under way completes first), so ``--resume`` continues from there."""

    def __init__(self, run_dir: Path, epoch: int, epochs: int, step: int):
        super().__init__(f"interrupted at epoch {epoch}/{epochs}, step {step}")
        self.run_dir, self.epoch, self.epochs, self.step = run_dir, epoch, epochs, step


@dataclass
class FitResult:
    run_dir: Path
    epochs_done: int
    best_miou: float
    last_metrics: dict
    seconds: float  # this call
    train_seconds: float = 0.0  # every epoch of the run, evaluations included, across resumed calls (from the log)


def autocast_for(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch on ``device``; uint8 training crops (``data.loaders.AugmentedDataset``) are normalised there,
    and their uint8 labels widened to the int64 class indices the losses take."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = to_device(v, device)
        else:
            out[k] = v
    image = out.get("image")
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
        out["image"] = normalize(image)
    label = out.get("label")
    if isinstance(label, torch.Tensor) and label.dtype == torch.uint8:
        out["label"] = label.long()
    return out


def clip_task_gradients(task: Task, optimizer, scaler) -> None:
    """Let a task that clips gradients (``clips_gradients`` / ``clip_gradients()``: a distillation method's
    own modules, e.g. Af-DCD's) do it on the unscaled gradients, before the optimiser step."""
    if not getattr(task, "clips_gradients", False):
        return
    if scaler is not None:
        scaler.unscale_(optimizer)
    task.clip_gradients()


def train_one_epoch(task: Task, loader, optimizer, scheduler, scaler, device, epoch: int, *, amp: bool,
                    desc: str = "train", progress: bool = True, step: Callable | None = None,
                    bar: Progress | None = None, step_log: StepLog | None = None,
                    first_step: int = 0) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each logged value (over all ranks' steps).
    ``step``: what computes ``(loss, logs)`` from a batch (default ``task.train_step``; the DDP wrapper
    of a distributed run). ``bar``: the run's progress (default: one for this epoch); ``step_log`` gets every
    step (``first_step``: steps done before this epoch)."""
    step = step or task.train_step
    task.modules.train()
    task.on_epoch_start(epoch)
    sums: dict[str, float] = {}
    n = 0
    own_bar = bar is None
    bar = bar or Progress(len(loader), f"{desc} epoch {epoch + 1}", "it", enabled=progress)
    batches = iter(loader)
    while True:
        t_wait = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        batch = to_device(batch, device)
        waited = time.perf_counter() - t_wait
        with autocast_for(device, amp):
            loss, logs = step(batch, epoch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch + 1}: loss is {loss.item()} (not finite); lower the lr "
                                     f"or check the inputs")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            clip_task_gradients(task, optimizer, scaler)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            clip_task_gradients(task, optimizer, None)
            optimizer.step()
        scheduler.step()
        logs = {"loss": float(loss.detach()), **logs}
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
        lr = optimizer.param_groups[0]["lr"]
        if step_log is not None:
            step_log.step(first_step + n, epoch + 1, logs, lr, samples=len(batch["image"]), data_wait=waited)
        bar.update(1, epoch=epoch + 1, loss=round(sums["loss"] / n, 4), lr=lr)
    if own_bar:
        bar.close()
    if distributed.world_size() > 1:  # means over every rank's steps (the same keys on every rank)
        keys = sorted(sums)
        total = distributed.all_reduce_sum(torch.tensor([sums[k] for k in keys] + [n], dtype=torch.float64))
        sums, n = dict(zip(keys, total[:-1].tolist())), int(total[-1])
    return {f"train_{k}": v / max(n, 1) for k, v in sums.items()}


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], loader, num_classes: int, device, *,
             class_names=None, amp: bool = True, progress: bool = False,
             protocol: EvalProtocol | None = None) -> dict[str, Any]:
    """Confusion matrix over the whole loader → metrics (``predict`` returns logits at label size).
    ``protocol``: how the logits cover an image (sliding windows for ``whole``); the metrics name it.

    A loader over this rank's part of the split (``distributed.RankPartitionSampler``) contributes its
    matrix to the sum over ranks: every rank returns the metrics of the whole split."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    bar = Progress(len(loader), "eval", "it", enabled=progress)
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        with autocast_for(device, amp):
            logits = protocol.logits(predict, images) if protocol is not None else predict(images)
        cm += confusion_matrix(logits.argmax(1).cpu(), batch["label"], num_classes)
        bar.update(1)
    bar.close()
    if distributed.is_rank_partition(loader):
        cm = distributed.all_reduce_sum(cm)
    out = metrics_from_confusion(cm, class_names)
    if protocol is not None:
        out["protocol"] = protocol.describe()
    out["confusion"] = cm.tolist()
    return out


def _write_log(path: Path, rows: list[dict]) -> None:
    write_table(path, rows)  # evaluation columns exist only on eval epochs


def read_log(path: str | Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


# TrainConfig fields a resumed run may change: where it runs and how often it evaluates. Anything else
# (lr, epochs — the poly schedule's length —, batch size, seed, …) would splice two different runs.
# What it logs (log_every, tensorboard) changes no result either.
RESUMABLE_CHANGES = frozenset({"device", "eval_every", "val_batch_size", "log_every", "tensorboard"})


def check_recipe(state: dict, cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume a checkpoint written under another training recipe, naming the keys that differ."""
    old = (state.get("extra") or {}).get("train_recipe")
    if old is None:  # a checkpoint that does not record its recipe: nothing to compare
        return
    new = dataclasses.asdict(cfg)
    diff = [f"train.{k}: {old.get(k)!r} -> {new[k]!r}" for k in new
            if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if diff:
        raise UserError(f"{path}: cannot resume, the training recipe changed ({'; '.join(diff)}); restore those "
                         f"settings, or rerun without --resume to start this run over")


def _clear_debris(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("last.pt", "best.pt", "metrics.parquet", "summary.json", "steps.parquet"):
        for tmp in run_dir.glob(f".{name}.*.tmp"):  # left by a run killed while writing (never read)
            tmp.unlink(missing_ok=True)


def _restore(last_path: Path, log_path: Path, cfg: TrainConfig, task: Task, optimizer, scheduler, scaler):
    """Load ``last.pt`` into the modules, optimizer, schedule, scaler and RNGs; (epoch, step, best, epoch rows)."""
    state = load_checkpoint(last_path)
    check_recipe(state, cfg, last_path)
    load_modules(task.modules, state["modules"], last_path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    rows = read_log(log_path) if log_path.is_file() else []
    return state["epoch"], state["step"], state["best"], [r for r in rows if r["epoch"] <= state["epoch"]]


def _evaluate_into(row: dict, task: Task, val_loader, num_classes: int, device, class_names, amp: bool,
                   protocol: EvalProtocol | None) -> dict:
    """Evaluate the task's current state; its metrics and the seconds it took go into the epoch's ``row``."""
    te = time.perf_counter()
    task.modules.eval()
    distributed.broadcast_buffers(task.modules)  # every rank evaluates rank 0's (checkpointed) state
    m = evaluate(task.predict, val_loader, num_classes, device, class_names=class_names, amp=amp, protocol=protocol)
    row.update({k: m[k] for k in ("miou", "pixel_acc", "class_acc", "fwiou", "per_class_iou")})
    row["eval_seconds"] = time.perf_counter() - te
    return m


def _wrap_for_ranks(task: Task, cfg: TrainConfig, device):
    """(DDP training step, BatchNorms swapped for SyncBatchNorm) of a distributed run."""
    swapped = distributed.to_sync_batchnorm(task.modules) if cfg.sync_bn else []
    # DDP broadcasts rank 0's weights and buffers here; a task whose every step uses every trainable
    # parameter may say so (``ddp_find_unused_parameters = False``) and save a graph traversal per step
    return distributed.wrap_task(task, device,
                                 find_unused_parameters=getattr(task, "ddp_find_unused_parameters", True)), swapped


def _finish(run_dir: Path, task: Task, summary: dict, swapped) -> None:
    world = distributed.world_size()
    if world > 1:
        distributed.broadcast_buffers(task.modules)  # leave every rank with rank 0's model
        distributed.restore_batchnorm(swapped)
        summary["world_size"] = world
    if distributed.rank() == 0:
        atomic_write_json(run_dir / "summary.json", summary)
    distributed.barrier()  # rank 0's files are complete before any rank reads them (e.g. best.pt)


def _log_epoch(desc: str, cfg: TrainConfig, row: dict) -> None:
    val = f" val mIoU {row['miou'] * 100:.2f} pixel acc {row['pixel_acc'] * 100:.2f}" if "miou" in row else ""
    get_logger().info(f"[{desc}] epoch {row['epoch']}/{cfg.epochs} loss {row['train_loss']:.4f}{val}")


def _preflight(cfg: TrainConfig, world: int, device: torch.device, main: bool) -> None:
    """What stops a run before it writes anything."""
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise UserError("train.sync_bn: SyncBatchNorm needs CUDA devices (PyTorch has no CPU implementation); "
                         "set train.sync_bn=false for a CPU run")
    if cfg.tensorboard and main:
        summary_writer_class()  # a missing extra stops the run before anything is written


def _start_over(last_path: Path, best_path: Path, log_path: Path) -> None:
    """A run started without ``resume`` over an earlier one's files: remove its checkpoints and log."""
    if last_path.is_file() or log_path.is_file():
        for p in (last_path, best_path, log_path, sidecar_path(last_path), sidecar_path(best_path)):
            p.unlink(missing_ok=True)


def _save(path: Path, task: Task, optim_state: tuple, epoch: int, step: int, best: float, config_dict: dict,
          extra: dict, model=None) -> None:
    optimizer, scheduler, scaler = optim_state
    save_checkpoint(path, modules=task.modules, optimizer=optimizer, scheduler=scheduler, scaler=scaler, epoch=epoch,
                    step=step, best=best, rng=rng_state(), config=config_dict, extra=extra, model=model)


def fit(task: Task, *, train_loader_for: Callable[[int], Any], val_loader, cfg: TrainConfig, run_dir: str | Path,
        num_classes: int, device: torch.device, config_dict: dict, class_names=None, resume: bool = False,
        extra_state: dict | None = None, progress: bool = True, desc: str = "train",
        eval_protocol: EvalProtocol | None = None) -> FitResult:
    """Train ``task`` for ``cfg.epochs`` epochs; evaluate every ``cfg.eval_every`` epochs and after the
    last; keep ``last.pt`` (full state, for ``resume``) and ``best.pt`` (weights and metrics of the best val
    mIoU, without optimizer state: half the size).
    ``eval_protocol``: how ``val_loader``'s images are scored (recorded with the metrics).
    A task with a ``deploy_model`` (the plain network inside its modules) has that network's state dict
    stored on its own in ``best.pt``, so evaluation and export need none of the training-only modules.
    In a distributed run every rank calls ``fit``; only rank 0 writes into ``run_dir``."""
    run_dir = Path(run_dir)
    world = distributed.world_size()
    main = distributed.rank() == 0
    progress = progress and main
    _preflight(cfg, world, device, main)
    last_path, best_path, log_path = run_dir / "last.pt", run_dir / "best.pt", run_dir / "metrics.parquet"
    extra = {**(extra_state or {}), "train_recipe": dataclasses.asdict(cfg)}
    if main:
        _clear_debris(run_dir)
    iters_per_epoch = len(train_loader_for(0))
    optimizer = build_optimizer(task.param_groups(cfg), cfg)
    scheduler = build_scheduler(optimizer, cfg, cfg.epochs * iters_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp and device.type == "cuda") else None
    start_epoch, step, best, rows = 0, 0, -math.inf, []
    if resume and last_path.is_file():
        start_epoch, step, best, rows = _restore(last_path, log_path, cfg, task, optimizer, scheduler, scaler)
    elif not resume and main:
        _start_over(last_path, best_path, log_path)
    step_fn, swapped = _wrap_for_ranks(task, cfg, device) if world > 1 else (None, [])
    t0 = time.perf_counter()
    last_metrics: dict = rows[-1] if rows else {}
    epochs_run = 0
    step_log = StepLog(run_dir, every=cfg.log_every, device=device, start_step=step, tensorboard=cfg.tensorboard,
                       enabled=main)
    if start_epoch:
        get_logger().info(f"[{desc}] resumed at epoch {start_epoch}/{cfg.epochs} (step {step})" + (
            f"; dropped {step_log.dropped} step rows written after that checkpoint" if step_log.dropped else ""))
    bar = Progress(cfg.epochs * iters_per_epoch, desc, "it", enabled=progress, done=step, epochs=cfg.epochs)
    try:  # Ctrl-C: the files are those of the last finished epoch; say where the run stopped
        for epoch in range(start_epoch, cfg.epochs):
            te = time.perf_counter()
            train_logs = train_one_epoch(task, train_loader_for(epoch), optimizer, scheduler, scaler, device, epoch,
                                         amp=cfg.amp, desc=desc, progress=progress, step=step_fn, bar=bar,
                                         step_log=step_log, first_step=step)
            step += iters_per_epoch
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                                   "epoch_seconds": time.perf_counter() - te, "eval_seconds": 0.0, **train_logs}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                m = _evaluate_into(row, task, val_loader, num_classes, device, class_names, cfg.amp, eval_protocol)
                if m["miou"] > best:  # the same decision on every rank: the metrics are of the whole split
                    best = m["miou"]
                    if main:  # weights only: evaluation and export need no optimizer state
                        _save(best_path, task, (None, None, None), epoch + 1, step, best, config_dict,
                              {**extra, "metrics": m}, model=getattr(task, "deploy_model", None))
            rows.append(row)
            if main:
                _log_epoch(desc, cfg, row)
                _write_log(log_path, rows)
                step_log.epoch_end(row)
                _save(last_path, task, (optimizer, scheduler, scaler), epoch + 1, step, best, config_dict, extra)
            last_metrics = row
            epochs_run += 1
    except KeyboardInterrupt:
        raise RunInterrupted(run_dir, bar.epoch or start_epoch + epochs_run + 1, cfg.epochs, bar.n) from None
    bar.close()
    step_log.close()
    done = start_epoch + epochs_run
    _finish(run_dir, task, {"epochs_done": done, "best_miou": best, "last": last_metrics,
                            "seconds_this_call": time.perf_counter() - t0}, swapped)
    train_seconds = sum(float(r.get("epoch_seconds") or 0.0) + float(r.get("eval_seconds") or 0.0) for r in rows)
    return FitResult(run_dir, done, best, last_metrics, time.perf_counter() - t0, train_seconds)
