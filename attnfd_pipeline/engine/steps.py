"""Per-step metrics of a run: ``steps.parquet`` beside ``metrics.parquet``, and optional TensorBoard scalars.

Every ``train.log_every`` steps one row: ``step`` (optimizer steps done, 1-based), ``epoch`` (1-based), the
mean over those steps of the loss and each of its parts (``ce``, each method's term and sub-terms, as the
task's ``train_step`` returns them), ``lr`` after the step, ``samples_per_s`` (this rank's samples over the
window's wall time, times the world size), ``data_wait_s`` (mean seconds per step spent waiting for the
loader and the copy to the device) and ``peak_mem_bytes`` (CUDA: max allocated on the device since the
run started; CPU: the process's peak RSS, which cannot be reset: a process that ran an earlier run reports
at least that run's peak). Only rank 0 writes; its losses are its own batches' (the epoch means in
``metrics.parquet`` are over every rank).

The file is rewritten atomically at every epoch end and at most every ``FLUSH_SECONDS`` within an epoch. A
resumed run keeps only rows with ``step`` ≤ the checkpoint's step (rows of the interrupted epoch are written
again), so no step appears twice.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from attnfd_pipeline.engine import distributed
from attnfd_pipeline.utils import atomic_write_bytes
from attnfd_pipeline.errors import UserError

STEPS_FILE = "steps.parquet"
TB_DIR = "tb"
TENSORBOARD_EXTRA = "tensorboard"
FLUSH_SECONDS = 60.0
EPOCH_SCALARS = ("miou", "pixel_acc", "class_acc", "fwiou")


def peak_memory_bytes(device: torch.device) -> int | None:
    """CUDA: the most the caching allocator held on ``device``; CPU: this process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; ValueError naming the extra when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UserError(f"train.tensorboard = true needs the tensorboard package, which is not installed ({e}): "
                         f"pip install -e '.[{TENSORBOARD_EXTRA}]', or set train.tensorboard = false") from None
    return SummaryWriter


def write_table(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))  # some columns exist only in some rows
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


class StepLog:
    """Collects the steps of one run (``fit``) into rows; ``start_step``: the checkpoint's step (0: a new run)."""

    def __init__(self, run_dir: Path, *, every: int, device: torch.device, start_step: int, tensorboard: bool,
                 enabled: bool = True):
        self.path, self.every, self.device, self.enabled = run_dir / STEPS_FILE, every, device, enabled
        self.world = distributed.world_size()
        self.rows: list[dict] = []
        self.dropped = 0
        self.writer = None
        if not enabled:
            return
        writer_cls = summary_writer_class() if tensorboard else None
        if device.type == "cuda":  # this run's peak, not an earlier run's in the same process (a sweep worker)
            torch.cuda.reset_peak_memory_stats(device)
        if self.path.is_file():
            old = pq.read_table(self.path).to_pylist()
            self.rows = [r for r in old if r["step"] <= start_step]
            self.dropped = len(old) - len(self.rows)
        if start_step == 0:
            self.path.unlink(missing_ok=True)
            shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)  # a new run's curves start empty
        if writer_cls is not None:
            # purge_step drops events a killed run wrote after its checkpoint, as the rows are dropped above
            self.writer = writer_cls(str(run_dir / TB_DIR), purge_step=start_step + 1 if start_step else None)
        self._window_start = time.perf_counter()
        self._sums: dict[str, float] = {}
        self._n = self._samples = 0
        self._wait = 0.0
        self._last_flush = time.perf_counter()

    def step(self, step: int, epoch: int, logs: dict[str, float], lr: float, *, samples: int,
             data_wait: float) -> None:
        if not self.enabled:
            return
        for k, v in logs.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._n += 1
        self._samples += samples
        self._wait += data_wait
        if step % self.every == 0:
            self._emit(step, epoch, lr)

    def _emit(self, step: int, epoch: int, lr: float) -> None:
        from attnfd_pipeline.engine.logging import get_logger

        seconds = max(time.perf_counter() - self._window_start, 1e-9)
        row = {"step": step, "epoch": epoch, **{k: v / self._n for k, v in self._sums.items()}, "lr": lr,
               "samples_per_s": self._samples * self.world / seconds, "data_wait_s": self._wait / self._n,
               "peak_mem_bytes": peak_memory_bytes(self.device)}
        self.rows.append(row)
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and v is not None:
                    self.writer.add_scalar(f"train/{k}", v, step)
        get_logger().debug("step " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in row.items()))
        self._window_start = time.perf_counter()
        self._sums, self._n, self._samples, self._wait = {}, 0, 0, 0.0
        if time.perf_counter() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def epoch_end(self, row: dict) -> None:
        """The epoch's row of metrics.parquet: its scalars to TensorBoard, and the step rows to disk."""
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.writer.add_scalar(f"{'val' if k in EPOCH_SCALARS else 'epoch'}/{k}", v, row["step"])
            self.writer.flush()
        self.flush()

    def flush(self) -> None:
        if self.enabled and self.rows:
            write_table(self.path, self.rows)
        self._last_flush = time.perf_counter()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
