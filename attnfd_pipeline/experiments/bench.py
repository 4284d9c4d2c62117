"""`attnfd bench` / `make bench`: what caching buys — step time, memory, cache build and
read throughput, storage — measured side by side in one run.

Timings on a shared machine are noisy, so every headline figure is a ratio of two things measured in
the same run, interleaved (plain, cached, online, then the reverse order on the next repeat, …), with
the median over repeats; the raw samples are kept in ``results.json["samples"]``.

Everything is the library's own code path: a demo-style dataset generated at the workload size, a
teacher bundle with random weights (BatchNorm statistics calibrated on a few crops so activations stay
in float16 range; speed does not depend on the weights), ``cache.build_cache`` for the cache, and the
three training setups composed from the same pieces as ``student.run_student`` (``StudentDataset`` +
``CachedSeeds`` + ``make_loader``, ``Distiller``, ``StudentTask``; the step mirrors
``engine.train.train_one_epoch``). Peak memory is measured with each setup in its own process.
torch runs with the intra-op threads the loader workers leave free (``auto_threads``): on 2 shared cores
a 2-thread team stalls at every barrier and identical steps then vary several-fold.

Public API: ``Workload`` (sizes; ``DEFAULT``, ``QUICK``), ``run_bench(out_dir, …)`` → results dict
(also written to ``results.json`` + ``results.md``), ``TOP_KEYS``, ``GOALS``, ``format_markdown``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

VARIANTS = ("plain", "cached", "online")
SWEEP_N = (1, 4, 12)

# results.json: exactly these keys at top level
METRIC_KEYS = (
    "step_ratio_cached_over_plain",
    "step_ratio_online_over_cached",
    "saving_efficiency",
    "peak_mem_ratio_cached_over_plain",
    "peak_mem_ratio_online_over_plain",
    "cache_build_over_teacher_inference",
    "reader_over_consumer",
    "storage",
    "sweep_economics",
)
TOP_KEYS = METRIC_KEYS + ("device", "torch_version", "config", "samples")

# goal per metric: (comparison, threshold)
GOALS: dict[str, tuple[str, float]] = {
    "step_ratio_cached_over_plain": ("<=", 1.10),
    "saving_efficiency": (">=", 0.9),
    "peak_mem_ratio_cached_over_plain": ("<=", 1.15),
    "cache_build_over_teacher_inference": (">=", 0.9),
    "reader_over_consumer": (">=", 3.0),
    "storage": (">=", 3.0),  # compression vs float32 overall, at rel_error <= STORAGE_MAX_REL_ERROR
}
STORAGE_MAX_REL_ERROR = 1e-3


@dataclass(frozen=True)
class Workload:
    """Sizes of one bench run. Defaults: a paper-scale teacher/student pair at a reduced crop, sized to finish
    in < 15 min on 2 cores."""

    teacher: str = "deeplabv3plus_resnet101"
    student: str = "deeplabv3plus_resnet18"
    num_classes: int = 21
    crop: int = 257
    batch_size: int = 4
    points: tuple[str, ...] = ("B", "E", "D")
    workers: int = 2
    n_train: int = 12  # generated training images (each cached at K seeds)
    K: int = 1
    shard_size: int = 4  # images per cache shard
    image_scale: tuple[float, float] = (1.0, 1.25)  # generated image sides, × crop
    repeats: int = 4  # interleaved repeats of every timed block
    warmup_steps: int = 1  # steps skipped at the start of each block (loader refill after the reset)
    timed_steps: int = 4  # timed training steps per variant per repeat
    reader_batches: int = 12  # batches timed per reader block
    memory_steps: int = 2  # training steps in each peak-memory process
    memory_mode: str = "each"  # "each" | "parallel" | "one" (see measure_memory)
    threads: int = 0  # torch intra-op threads (0 = auto: the cores the loader workers leave, at least 1)
    calib_batches: int = 2  # teacher BatchNorm calibration batches (random weights)
    mantissa_options: tuple[int, ...] = (9, 8)  # storage options with the mantissa rounded
    profile: bool = True  # torch.profiler on one step of each variant
    profile_rows: int = 12

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


DEFAULT = Workload()
# --quick: seconds, to keep the harness from rotting (no workers, one memory process: figures mean nothing)
QUICK = Workload(teacher="deeplabv3plus_resnet18", crop=48, batch_size=2, workers=0, n_train=4, K=1, shard_size=2,
                 repeats=1, warmup_steps=1, timed_steps=2, reader_batches=2, memory_steps=1, memory_mode="one",
                 threads=1, calib_batches=1, mantissa_options=(9,), profile_rows=6)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs: Sequence[float]) -> float:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return float(statistics.median(xs)) if xs else float("nan")


def goal_met(key: str, value: float) -> bool | None:
    if key not in GOALS or value is None or not math.isfinite(value):
        return None
    op, thr = GOALS[key]
    return bool(value <= thr) if op == "<=" else bool(value >= thr)


def _metric(key: str, value: float, **extra) -> dict:
    out: dict[str, Any] = {"value": _num(value)}
    if key in GOALS:
        op, thr = GOALS[key]
        out["goal"] = f"{op} {thr:g}"
        out["met"] = goal_met(key, value)
    out.update(extra)
    return out


def _num(x):
    """JSON-safe float (NaN/inf → None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# workload: config, data, teacher bundle


def workload_config(w: Workload, data_root: Path, work: Path, recipe: str | Path | None = None,
                    overrides: Sequence[str] = ()):
    """The recipe (augmentation, codec, norm, lr …) at the workload's sizes, pointing into ``work``."""
    from attnfd_pipeline.config import load_config

    pts = "[" + ", ".join(f'"{p}"' for p in w.points) + "]"
    o = [
        'name="bench"', f'runs_root="{work / "runs"}"', 'data.dataset="demo"', f'data.root="{data_root}"',
        f"data.num_workers={w.workers}", f"augment.crop_size=[{w.crop}, {w.crop}]", f"augment.base_size={w.crop}",
        f'teacher.model.name="{w.teacher}"', 'teacher.model.backbone_weights=""', f"teacher.points={pts}",
        f'cache.root="{work / "cache"}"', f"cache.K={w.K}", f"cache.points={pts}", "cache.extra=[]",
        f"cache.shard_size={w.shard_size}", f"cache.batch_size={w.batch_size}",
        f'student.model.name="{w.student}"', 'student.model.backbone_weights=""', f"student.points={pts}",
        'student.method="attnfd"',
        f"student.train.batch_size={w.batch_size}", "student.connector_warmup_epochs=0",
    ]
    cfg = load_config(recipe, list(o) + list(overrides))
    if cfg.student.alpha <= 0:  # the distilled variants need α > 0 (the plain one sets α = 0 itself)
        cfg = load_config(recipe, list(o) + list(overrides) + ["student.alpha=2.0"])
    return cfg


def make_dataset(w: Workload, root: Path) -> Path:
    from attnfd_pipeline.data.demo import generate_demo

    lo, hi = (max(8, int(round(w.crop * s))) for s in w.image_scale)
    return generate_demo(root, seed=0, n_train=w.n_train, n_val=0, min_size=lo, max_size=max(lo, hi),
                         workers=min(2, os.cpu_count() or 1))


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Running BatchNorm statistics = the exact average over ``batches`` (random weights otherwise give
    activations that grow block after block and overflow float16)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for x in batches:
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def make_teacher_bundle(cfg, num_classes: int, source, calib_batches: int, batch_size: int) -> Path:
    """A teacher bundle with random weights (calibrated BatchNorm), written where the config expects it."""
    from attnfd_pipeline.data.loaders import AugmentedDataset, FreshSeeds
    from attnfd_pipeline.teacher import build_side_attention, build_teacher_model, bundle_path, save_bundle
    from attnfd_pipeline.utils import seed_everything

    seed_everything(cfg.teacher.train.seed)
    model = build_teacher_model(cfg, num_classes)
    ds = AugmentedDataset(source, cfg.augment, FreshSeeds())
    n = len(source)
    per = max(2, batch_size)  # BatchNorm in train mode needs more than one value per channel (image pool)
    batches = [torch.stack([ds[(0, (b * per + j) % n)]["image"] for j in range(per)])
               for b in range(max(1, calib_batches))]
    calibrate_batchnorm(model, batches)
    attention = build_side_attention(cfg, model)  # non-inpath CBAM modes: seeded side branches
    return save_bundle(bundle_path(cfg), cfg, model.eval(), attention, num_classes)


# ---------------------------------------------------------------------------------------------
# the three training setups (same pieces as student.run_student) and the timed step


class KeySampler(Sampler):
    """Yields the ``(epoch, index)`` keys set before each block (same keys for every variant)."""

    def __init__(self, keys: Sequence[tuple[int, int]] = ()):
        self.keys = [tuple(k) for k in keys]

    def __iter__(self):
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


def block_keys(cfg, n_images: int, n_keys: int, first_epoch: int) -> list[tuple[int, int]]:
    """``n_keys`` keys in the training order of ``EpochSampler`` from ``first_epoch`` on."""
    from attnfd_pipeline.data.loaders import EpochSampler

    sampler = EpochSampler(n_images, seed=cfg.student.train.seed, shuffle=True)
    keys: list[tuple[int, int]] = []
    epoch = first_epoch
    while len(keys) < n_keys:
        sampler.set_epoch(epoch)
        keys += list(iter(sampler))
        epoch += 1
    return keys[:n_keys]


@dataclass
class Setup:
    name: str
    task: Any
    dataset: Any
    loader: Any
    sampler: KeySampler
    optimizer: Any
    scheduler: Any
    scaler: Any
    device: torch.device
    amp: bool


def build_setup(cfg, variant: str, *, num_classes: int, bundle: str | Path | None, cache_dir: str | Path | None,
                device: torch.device, total_iters: int = 1000) -> Setup:
    """``plain`` (α = 0, no targets), ``cached`` (α > 0, targets from the cache) or ``online`` (α > 0,
    the frozen teacher every step), composed as ``student.run_student`` composes its run (its
    ``build_distiller`` / ``method_targets`` / ``method_weights`` where the student module has them)."""
    from attnfd_pipeline import student as student_mod
    from attnfd_pipeline.cache import CacheReader
    from attnfd_pipeline.data.loaders import CachedSeeds, make_loader
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.distill import Distiller
    from attnfd_pipeline.engine.optim import build_optimizer, build_scheduler
    from attnfd_pipeline.models import build_model
    from attnfd_pipeline.student import StudentDataset, StudentTask
    from attnfd_pipeline.teacher import load_teacher
    from attnfd_pipeline.utils import seed_everything

    if variant not in VARIANTS:
        raise ValueError(f"unknown bench variant {variant!r}; known: {', '.join(VARIANTS)}")
    s = cfg.student
    alpha = 0.0 if variant == "plain" else s.alpha
    method_targets = getattr(student_mod, "method_targets", None)
    build_distiller = getattr(student_mod, "build_distiller", None)
    method_weights = getattr(student_mod, "method_weights", None)
    names = list(method_targets(s)) if method_targets else list(s.points)
    train_src = ImageSource.from_config(cfg, cfg.data.train_split)
    reader, teacher, shapes = None, None, {}
    if variant == "cached":
        reader = CacheReader(cache_dir)
        shapes = {n: tuple(reader.info["targets"][n]["chw"]) for n in names}
    elif variant == "online":
        teacher = load_teacher(bundle, device)
        shapes = dict(teacher.target_specs(cfg.augment.crop_size, names))
    seed_everything(s.train.seed)
    student = build_model(s.model.name, num_classes, output_stride=s.model.output_stride,
                          backbone_weights=s.model.backbone_weights or None)
    with torch.random.fork_rng(devices=[]):  # distillation modules do not shift the student's RNG stream
        torch.manual_seed(s.train.seed + 1)
        if build_distiller is not None:
            distiller = build_distiller(student, s, shapes, num_classes, distill=alpha > 0)
        else:
            channels = {p: shapes[p][0] for p in s.points} if shapes else {p: student.taps[p].channels
                                                                          for p in s.points}
            distiller = Distiller(student, s.points, channels)
    distiller = distiller.to(device)
    kwargs = {"weights": method_weights(s) if alpha > 0 else None} if method_weights else {}
    task = StudentTask(distiller, alpha=alpha, norm=s.norm, warmup_epochs=0, teacher=teacher, **kwargs)
    seeds = CachedSeeds(s.train.seed, cfg.cache.K, s.seed_order)
    read_names = getattr(task, "target_names", names) if reader is not None else ()
    ds = StudentDataset(train_src, cfg.augment, seeds, reader, read_names)
    sampler = KeySampler()
    loader = make_loader(ds, batch_size=s.train.batch_size, workers=cfg.data.num_workers, sampler=sampler,
                         drop_last=True, device=device)
    optimizer = build_optimizer(task.param_groups(s.train), s.train)
    scheduler = build_scheduler(optimizer, s.train, total_iters)
    scaler = torch.amp.GradScaler("cuda") if (s.train.amp and device.type == "cuda") else None
    return Setup(variant, task, ds, loader, sampler, optimizer, scheduler, scaler, device, s.train.amp)


def train_block(setup: Setup, keys: Sequence[tuple[int, int]], warmup: int, profiler_factory: Callable | None = None
                ) -> tuple[list[dict[str, float]], Any]:
    """Run one block of training steps over ``keys`` (a fresh pass of the persistent loader); returns
    per-step times (data wait, forward+loss, backward, optimizer, total) after ``warmup`` steps, and
    the profiler of the last step when ``profiler_factory`` is given. The step is
    ``engine.train.train_one_epoch``'s, with clocks between its phases."""
    from attnfd_pipeline.engine.train import autocast_for, to_device

    task, device = setup.task, setup.device
    setup.sampler.keys = list(keys)
    task.modules.train()
    n = len(setup.loader)
    records, prof = [], None
    it = iter(setup.loader)
    pids = worker_pids(setup)
    wcpu0 = sum(_proc_cpu_s(p) for p in pids)
    for j in range(n):
        last = j == n - 1
        ctx = profiler_factory() if (profiler_factory is not None and last) else None
        if ctx is not None:
            ctx.__enter__()
        _sync(device)
        t0 = time.perf_counter()
        c0 = time.process_time()
        batch = next(it)
        batch = to_device(batch, device)
        _sync(device)
        t1 = time.perf_counter()
        with autocast_for(device, setup.amp):
            loss, logs = task.train_step(batch, 0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"bench {setup.name}: loss is {loss.item()} (not finite)")
        _sync(device)
        t2 = time.perf_counter()
        setup.optimizer.zero_grad(set_to_none=True)
        if setup.scaler is not None:
            setup.scaler.scale(loss).backward()
        else:
            loss.backward()
        _sync(device)
        t3 = time.perf_counter()
        if setup.scaler is not None:
            setup.scaler.step(setup.optimizer)
            setup.scaler.update()
        else:
            setup.optimizer.step()
        setup.scheduler.step()
        _ = {"loss": float(loss.detach()), **logs}
        _sync(device)
        t4 = time.perf_counter()
        c4 = time.process_time()
        if ctx is not None:
            ctx.__exit__(None, None, None)
            prof = ctx
        if j >= warmup:
            records.append({"wait": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3,
                            "total": t4 - t0, "cpu_main": c4 - c0})
    for _ in it:  # the sampler holds exactly n batches; this only closes the pass
        pass
    # loader workers' CPU seconds per batch over the whole block (every batch of it was loaded in it)
    wcpu = (sum(_proc_cpu_s(p) for p in pids) - wcpu0) / max(n, 1) if pids else 0.0
    for r in records:
        r["cpu_workers"] = wcpu
    return records, prof


def reader_block(setup: Setup, keys: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Samples/s the setup's DataLoader delivers with nothing consuming: the first batch (pipeline
    fill after the reset) is not timed."""
    setup.sampler.keys = list(keys)
    it = iter(setup.loader)
    first = next(it)
    bs = len(first["index"])
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        n += len(batch["index"])
    dt = time.perf_counter() - t0
    return {"samples": n, "seconds": dt, "samples_per_s": n / dt if dt > 0 else float("nan"), "batch_size": bs}


def shutdown(setup: Setup) -> None:
    it = getattr(setup.loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    setup.loader._iterator = None


def worker_pids(setup: Setup) -> list[int]:
    it = getattr(setup.loader, "_iterator", None)
    return [w.pid for w in getattr(it, "_workers", []) if w.pid is not None]


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0 elsewhere)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _proc_kb(pid: int | str, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak RSS of this process. Linux: ``VmHWM`` — ``ru_maxrss`` is preserved across ``execve`` and so
    reports the launching parent's peak in a freshly started child; elsewhere ``ru_maxrss``."""
    kb = _proc_kb("self", "VmHWM")
    if kb is not None:
        return kb * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def topk_memory(prof, n: int, device: torch.device) -> list[dict]:
    """Ops that allocated the most memory (self, net of what they freed) in the profiled step."""
    key = "self_device_memory_usage" if device.type == "cuda" else "self_cpu_memory_usage"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    events.sort(key=lambda e: getattr(e, key, 0), reverse=True)
    return [{"op": e.key, "calls": int(e.count), "self_mib": getattr(e, key, 0) / 2**20} for e in events[:n]]


def topk_ops(prof, n: int, device: torch.device) -> list[dict]:
    rows = []
    events = list(prof.key_averages())
    key = "self_cpu_time_total"
    if device.type == "cuda":
        key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    events.sort(key=lambda e: getattr(e, key, 0.0), reverse=True)
    for e in events[:n]:
        row = {"op": e.key, "calls": int(e.count), "self_cpu_ms": e.self_cpu_time_total / 1e3,
               "cpu_total_ms": e.cpu_time_total / 1e3}
        if device.type == "cuda":
            row["self_device_ms"] = getattr(e, key, 0.0) / 1e3
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# peak memory: one process per setup


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(spec_path: str) -> None:
    """Entry point of a peak-memory process: for each variant of the spec, build its setup, train
    ``len(keys) / batch`` steps, report the peaks. One variant per process is the measurement; several
    (``--quick``) reset the peak between variants, so later ones also count what earlier ones left."""
    import gc

    from attnfd_pipeline.config import load_config

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    cfg = load_config(spec["config"])
    keys = [tuple(k) for k in spec["keys"]]
    results = {}
    for i, variant in enumerate(spec["variants"]):
        if i > 0:
            gc.collect()
            reset_peak_rss()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        hwm0 = peak_rss_bytes()
        setup = build_setup(cfg, variant, num_classes=spec["num_classes"], bundle=spec["bundle"],
                            cache_dir=spec["cache_dir"], device=device)
        hwm_setup = peak_rss_bytes()
        setup_alloc = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        records, _ = train_block(setup, keys, warmup=0)
        pids = worker_pids(setup)
        worker_hwm = [_proc_kb(p, "VmHWM") for p in pids]
        worker_hwm = [k * 1024 for k in worker_hwm if k is not None]
        out = {
            "variant": variant,
            "process": "own" if len(spec["variants"]) == 1 else f"shared ({i + 1}/{len(spec['variants'])})",
            "steps": len(records),
            "rss_peak_bytes": peak_rss_bytes(),
            "rss_peak_source": "VmHWM" if _proc_kb("self", "VmHWM") is not None else "ru_maxrss",
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before_setup_bytes": hwm0,
            "rss_after_setup_bytes": hwm_setup,
            "workers": len(pids),
            "workers_rss_peak_bytes": worker_hwm,
            "workers_rss_peak_sum_bytes": sum(worker_hwm) if worker_hwm else None,
            "step_s": [r["total"] for r in records],
        }
        if device.type == "cuda":
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            out["cuda_setup_allocated_bytes"] = setup_alloc
        shutdown(setup)
        del setup, records
        results[variant] = out
    Path(spec["out"]).write_text(json.dumps(results))


def measure_memory(cfg, variants: Sequence[str], *, num_classes: int, bundle: Path, cache_dir: Path,
                   device: torch.device, keys: Sequence[tuple[int, int]], work: Path, mode: str = "each"
                   ) -> dict[str, dict]:
    """Peak memory of each variant's training process in a fresh interpreter: ``each`` (one process per
    variant, one after the other: the measurement), ``parallel`` (one per variant, all at once: same
    peaks, less wall time, more load) or ``one`` (a single process for all, peak reset between them:
    only keeps the harness working in ``--quick``)."""
    from attnfd_pipeline.config import dump_toml

    if mode not in ("each", "parallel", "one"):
        raise ValueError(f"memory mode {mode!r}: expected each, parallel or one")
    cfg_path = work / "mem.toml"
    cfg_path.write_text(dump_toml(cfg))

    def start(group: Sequence[str]):
        tag = "-".join(group)
        out = work / f"mem-{tag}.json"
        spec = {"config": str(cfg_path), "variants": list(group), "num_classes": num_classes, "bundle": str(bundle),
                "cache_dir": str(cache_dir), "device": str(device), "threads": torch.get_num_threads(),
                "keys": [list(k) for k in keys], "out": str(out)}
        spec_path = work / f"mem-{tag}.spec.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-c",
               "import sys; from attnfd_pipeline.experiments.bench import memory_child; memory_child(sys.argv[1])", str(spec_path)]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out

    def finish(group, proc, out):
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"peak-memory process for {'/'.join(group)} failed (exit {proc.returncode}):\n"
                               f"{err[-4000:]}")
        res = json.loads(out.read_text())
        for v, r in res.items():
            log(f"memory {v}: peak RSS {r['rss_peak_bytes'] / 2**20:.0f} MiB"
                + (f", workers {r['workers_rss_peak_sum_bytes'] / 2**20:.0f} MiB"
                   if r.get("workers_rss_peak_sum_bytes") else ""))
        return res

    groups = [list(variants)] if mode == "one" else [[v] for v in variants]
    results: dict[str, dict] = {}
    if mode == "parallel":
        running = [(g, *start(g)) for g in groups]
        for g, proc, out in running:
            results.update(finish(g, proc, out))
    else:
        for g in groups:
            results.update(finish(g, *start(g)))
    return results


# ---------------------------------------------------------------------------------------------
# cache build vs bare teacher inference; storage options


def prepare_crops(cfg, source) -> list[tuple[Any, list[dict], list[torch.Tensor]]]:
    """Per shard: (range, manifest rows, normalised crops), as ``build_cache`` prepares them."""
    from attnfd_pipeline.cache.build import _shard_samples
    from attnfd_pipeline.cache.schema import ShardRange, num_shards, shard_range

    out = []
    for s in range(num_shards(len(source), cfg.cache.shard_size)):
        start, stop = shard_range(s, cfg.cache.shard_size, len(source))
        rows, crops, _ = _shard_samples(cfg, source, ShardRange(s, start, stop), source.ids)
        out.append((ShardRange(s, start, stop), rows, crops))
    return out


def bare_inference(teacher, shards, names: Sequence[str], batch_size: int, device: torch.device,
                   keep: bool = False) -> tuple[dict, dict[str, np.ndarray] | None]:
    """The teacher alone on the build's batches (same batching: per shard, ``batch_size`` crops)."""
    from attnfd_pipeline.cache.build import run_teacher

    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    n = 0
    _sync(device)
    t0 = time.perf_counter()
    for _, _, crops in shards:
        got, _ = run_teacher(teacher, crops, names, batch_size, device)
        n += len(crops)
        if keep:
            for k in names:
                outs[k].append(got[k])
    _sync(device)
    dt = time.perf_counter() - t0
    res = {"samples": n, "seconds": dt, "samples_per_s": n / dt if dt > 0 else float("nan")}
    return res, ({k: np.concatenate(v) for k, v in outs.items()} if keep else None)


def storage_options(codec: str, level: int, mantissa_options: Sequence[int]) -> list[dict]:
    """The storage options the cache offers: float16 with each lossless codec, then float16 with the
    mantissa rounded (with the recipe's codec, zstd when the recipe stores raw)."""
    lossy_codec = codec if codec != "none" else "zstd"
    opts = [{"name": f"float16+{c}", "codec": c, "level": level if c != "none" else 0, "mantissa_bits": 10}
            for c in dict.fromkeys([codec, "zstd", "blosc", "none"])]
    opts += [{"name": f"float16-m{b}+{lossy_codec}", "codec": lossy_codec, "level": level, "mantissa_bits": b}
             for b in mantissa_options]
    return opts


def storage_analysis(outs: dict[str, np.ndarray], options: Sequence[dict]) -> dict:
    """Bytes per sample, compression vs float32 and rel. L2 error (channel-normalised) per option and
    target, with the cache's own lossy step (``schema.to_float16``) and per-sample compression
    (``plan.compression_ratio``, each sample compressed alone as in the store)."""
    from attnfd_pipeline.cache.plan import _CHUNK_OVERHEAD, compression_ratio, precision_stats
    from attnfd_pipeline.cache.schema import to_float16

    result: dict[str, Any] = {"options": {}, "rel_error_limit": STORAGE_MAX_REL_ERROR}
    for opt in options:
        per_target, f32_total, stored_total, worst = {}, 0, 0.0, 0.0
        for name, x32 in outs.items():
            n = x32.shape[0]
            x16 = to_float16(x32, opt["mantissa_bits"], target=name, ids=[str(i) for i in range(n)],
                             seeds=[0] * n)
            ratio16 = compression_ratio(x16, opt["codec"], opt["level"])
            raw16 = int(np.prod(x32.shape[1:])) * 2
            stored = raw16 / ratio16 + _CHUNK_OVERHEAD
            prec = precision_stats(x32, x16)
            per_target[name] = {"chw": list(x32.shape[1:]), "float32_bytes_per_sample": raw16 * 2,
                                "bytes_per_sample": stored, "compression_vs_float32": raw16 * 2 / stored,
                                "rel_error": prec["rel_error"], "tiny_channels": prec["tiny_channels"],
                                "zero_fraction": float((x16 == 0).mean())}
            f32_total += raw16 * 2
            stored_total += stored
            worst = max(worst, prec["rel_error"])
        result["options"][opt["name"]] = {
            **{k: opt[k] for k in ("codec", "level", "mantissa_bits")},
            "targets": per_target, "bytes_per_sample": stored_total, "float32_bytes_per_sample": f32_total,
            "compression_vs_float32": f32_total / stored_total, "rel_error": worst}
    ok = {k: v for k, v in result["options"].items() if v["rel_error"] <= STORAGE_MAX_REL_ERROR}
    best = max(ok, key=lambda k: ok[k]["compression_vs_float32"]) if ok else None
    default = next(iter(result["options"]))
    result["recipe_option"] = default
    result["best_option"] = best
    result["value"] = _num(ok[best]["compression_vs_float32"]) if best else None
    result["goal"] = f">= {GOALS['storage'][1]:g} at rel_error <= {STORAGE_MAX_REL_ERROR:g}"
    result["met"] = goal_met("storage", result["value"]) if best else False
    # bytes per sample of each target, for the recipe's option: what a user sizes a cache by
    rec = result["options"][default]
    result["bytes_per_sample"] = {k: v["bytes_per_sample"] for k, v in rec["targets"].items()}
    result["compression_vs_float32"] = rec["compression_vs_float32"]
    result["rel_error"] = {k: v["rel_error"] for k, v in result["options"].items()}
    return result


# ---------------------------------------------------------------------------------------------
# the run


def run_bench(out_dir: str | Path = "bench", *, quick: bool = False, repeats: int | None = None,
              recipe: str | Path | None = "configs/demo.toml", workload: Workload | None = None,
              overrides: Sequence[str] = (), work_dir: str | Path | None = None, threads: int | None = None) -> dict:
    """Measure everything, write ``results.json`` and ``results.md`` into ``out_dir``, return the dict.

    ``workload`` (default ``QUICK`` or ``DEFAULT``) sets the sizes; ``repeats`` and ``threads`` override
    it; ``recipe`` + ``overrides`` give the augmentation, codec, loss norm, optimiser and the sweep's
    epochs and K; the dataset, teacher bundle and caches live in a temp dir under ``work_dir``."""
    from attnfd_pipeline.config import load_config
    from attnfd_pipeline.utils import atomic_write_json, atomic_write_text

    w = workload or (QUICK if quick else DEFAULT)
    if repeats is not None:
        if repeats < 1:
            raise ValueError("repeats must be >= 1")
        w = dataclasses.replace(w, repeats=repeats)
    if threads is not None:
        if threads < 0:
            raise ValueError("threads must be >= 0 (0 = auto)")
        w = dataclasses.replace(w, threads=threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe_cfg = load_config(recipe, list(overrides))
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="attnfd-bench-", dir=work_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(w.threads or auto_threads(w.workers))
    try:
        results = _measure(w, Path(tmp.name), recipe, recipe_cfg, overrides, quick)
    finally:
        torch.set_num_threads(threads)
        tmp.cleanup()
    results["samples"]["wall_s"] = time.perf_counter() - t_start
    missing = set(TOP_KEYS) ^ set(results)
    assert not missing, f"results keys differ from TOP_KEYS: {missing}"
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", format_markdown(results))
    log(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'} "
        f"({results['samples']['wall_s']:.0f} s)")
    return results


def auto_threads(workers: int) -> int:
    """Intra-op threads that leave one core per loader worker: on a small CPU machine a 2-thread team
    sharing 2 cores with 2 workers (or other load) stalls at every barrier, and step times then vary
    several-fold between identical steps (measured here: 2 threads 4–10 s, 1 thread 2.3–3 s per teacher
    batch under load)."""
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - max(0, workers)))


def _device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    info["load_average_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return info


def _measure(w: Workload, work: Path, recipe, recipe_cfg, overrides, quick: bool) -> dict:
    from attnfd_pipeline.cache import build_cache, describe_cache
    from attnfd_pipeline.cache.schema import cache_target_names
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.teacher import load_teacher
    from attnfd_pipeline.utils import resolve_device

    data_root = make_dataset(w, work / "data")
    cfg = workload_config(w, data_root, work, recipe, overrides)
    device = resolve_device(cfg.student.train.device)
    device_info = _device_info(device)
    source = ImageSource.from_config(cfg, cfg.data.train_split)
    log(f"workload: teacher {w.teacher}, student {w.student}, {w.num_classes} classes, crop {w.crop}, "
        f"batch {w.batch_size}, points {'+'.join(w.points)}, {w.workers} workers, {len(source)} images × K={w.K}, "
        f"{w.repeats} repeats on {device}")
    bundle = make_teacher_bundle(cfg, w.num_classes, source, w.calib_batches, w.batch_size)
    names = cache_target_names(cfg.cache)
    samples: dict[str, Any] = {}

    # -- 4. cache build vs bare teacher inference (interleaved), 6. storage -----------------------------
    teacher = load_teacher(bundle, device)
    shards = prepare_crops(cfg, source)
    build_rows, cache_dir, outs32 = [], None, None
    for r in range(w.repeats):
        order = ("build", "bare") if r % 2 == 0 else ("bare", "build")
        row: dict[str, Any] = {"repeat": r, "order": list(order)}
        for what in order:
            if what == "build":
                _sync(device)
                t0 = time.perf_counter()
                teacher.target_specs(tuple(cfg.augment.crop_size), names)  # what build_cache does first
                _sync(device)
                row["target_specs_seconds"] = time.perf_counter() - t0
                root = work / "cache" if r == 0 else work / f"cache-r{r}"
                cfg_r = cfg if r == 0 else dataclasses.replace(
                    cfg, cache=dataclasses.replace(cfg.cache, root=str(root)))
                res = build_cache(cfg_r, teacher, source, progress=False)
                row.update({"build_samples_per_s": res.samples_per_s, "build_seconds": res.seconds,
                            "build_samples": res.samples_written, "teacher_seconds": res.teacher_seconds,
                            "teacher_samples_per_s_in_build": res.teacher_samples_per_s,
                            "load_seconds": res.load_seconds, "writer_seconds": res.writer_seconds,
                            "bytes_written": res.bytes_written})
                if r == 0:
                    cache_dir = res.path
                else:
                    shutil.rmtree(root, ignore_errors=True)
            else:
                res_b, got = bare_inference(teacher, shards, names, cfg.cache.batch_size, device, keep=outs32 is None)
                outs32 = outs32 if got is None else got
                row.update({"bare_samples_per_s": res_b["samples_per_s"], "bare_seconds": res_b["seconds"],
                            "bare_samples": res_b["samples"]})
        row["ratio"] = row["build_samples_per_s"] / row["bare_samples_per_s"]
        build_rows.append(row)
        log(f"cache build repeat {r + 1}/{w.repeats}: build {row['build_samples_per_s']:.2f} samples/s, "
            f"bare teacher {row['bare_samples_per_s']:.2f} samples/s (ratio {row['ratio']:.3f})")
    samples["cache_build"] = build_rows
    del teacher
    storage = storage_analysis(outs32, storage_options(cfg.cache.codec, cfg.cache.level, w.mantissa_options))
    disk = describe_cache(cache_dir)
    storage["on_disk"] = {"codec": disk["codec"], "mantissa_bits": disk["mantissa_bits"],
                          "bytes_per_sample": {k: v["bytes_on_disk"] / max(1, len(source) * w.K)
                                               for k, v in disk["targets"].items()},
                          "size_bytes": disk["size_bytes"], "samples": len(source) * w.K}
    storage["weights"] = "random (BatchNorm calibrated): compression depends on the value distribution"
    del outs32
    log(f"storage: {storage['best_option']} ×{storage['value'] or float('nan'):.2f} vs float32")

    # -- 1./2./5. interleaved step timing + reader throughput -------------------------------------------
    setups = {v: build_setup(cfg, v, num_classes=w.num_classes, bundle=bundle, cache_dir=cache_dir, device=device)
              for v in VARIANTS}
    bs = w.batch_size
    step_n = w.warmup_steps + w.timed_steps
    steps: dict[str, list[list[dict]]] = {v: [] for v in VARIANTS}
    reader_rows = []
    for v in VARIANTS:  # start the workers and run every code path once before anything is timed
        train_block(setups[v], block_keys(cfg, len(source), bs, first_epoch=999_999), warmup=1)
    log("setups primed")
    for r in range(w.repeats):
        keys = block_keys(cfg, len(source), step_n * bs, first_epoch=1000 * r)
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for v in order:
            recs, _ = train_block(setups[v], keys, w.warmup_steps)
            steps[v].append(recs)
        rkeys = block_keys(cfg, len(source), (w.reader_batches + 1) * bs, first_epoch=1000 * r + 500)
        rd = reader_block(setups["cached"], rkeys)
        rd["repeat"] = r
        reader_rows.append(rd)
        log(f"steps repeat {r + 1}/{w.repeats}: " + ", ".join(
            f"{v} {median([x['total'] for x in steps[v][-1]]):.3f} s" for v in VARIANTS)
            + f"; reader {rd['samples_per_s']:.1f} samples/s")

    # reader breakdown (main process, one sample at a time): replay + hash vs target read
    reader_breakdown = _reader_breakdown(setups["cached"], setups["plain"], source, n=min(len(source), 2 * bs))

    # profile one step of each variant
    profiles: dict[str, list[dict]] = {}
    profiles_mem: dict[str, list[dict]] = {}
    if w.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for v in VARIANTS:
            keys = block_keys(cfg, len(source), 2 * bs, first_epoch=99_000)
            keys = keys[:bs]
            _, prof = train_block(setups[v], keys, warmup=1,
                                  profiler_factory=lambda: profile(activities=acts, profile_memory=True))
            profiles[v] = topk_ops(prof, w.profile_rows, device)
            profiles_mem[v] = topk_memory(prof, w.profile_rows, device)
        log("profiled one step of each variant")
    extra_params = _param_counts(setups)
    for s in setups.values():
        shutdown(s)
    del setups

    # -- 3. peak memory, one process per variant ------------------------------------------------------
    mem_keys = block_keys(cfg, len(source), max(1, w.memory_steps) * bs, first_epoch=77_000)
    memory = measure_memory(cfg, VARIANTS, num_classes=w.num_classes, bundle=bundle, cache_dir=cache_dir,
                            device=device, keys=mem_keys, work=work, mode=w.memory_mode)

    # -- derived figures ------------------------------------------------------------------------------
    per_rep = {v: [median([x["total"] for x in recs]) for recs in steps[v]] for v in VARIANTS}
    med = {v: median(per_rep[v]) for v in VARIANTS}
    phases = ("wait", "forward", "backward", "optimizer", "total", "cpu_main", "cpu_workers")
    breakdown = {v: {p: median([x[p] for recs in steps[v] for x in recs]) for p in phases} for v in VARIANTS}
    cpu_rep = {v: [median([x["cpu_main"] + x["cpu_workers"] for x in recs]) for recs in steps[v]] for v in VARIANTS}
    cpu_med = {v: median(cpu_rep[v]) for v in VARIANTS}
    r_cp = [c / p for c, p in zip(per_rep["cached"], per_rep["plain"])]
    r_oc = [o / c for o, c in zip(per_rep["online"], per_rep["cached"])]
    eff = [(o - c) / (o - p) if o != p else float("nan")
           for p, c, o in zip(per_rep["plain"], per_rep["cached"], per_rep["online"])]
    eff_cpu = [(o - c) / (o - p) if o != p else float("nan")
               for p, c, o in zip(cpu_rep["plain"], cpu_rep["cached"], cpu_rep["online"])]
    consumer = [bs / c for c in per_rep["cached"]]
    rd_ratio = [rd["samples_per_s"] / cons for rd, cons in zip(reader_rows, consumer)]
    build_ratio = [row["ratio"] for row in build_rows]

    def mem_of(v):
        m = memory[v]
        return m["cuda_max_allocated_bytes"] if device.type == "cuda" else m["rss_peak_bytes"]

    def mem_with_workers(v):
        m = memory[v]
        return m["rss_peak_bytes"] + (m.get("workers_rss_peak_sum_bytes") or 0)

    mem_kind = "cuda_max_memory_allocated" if device.type == "cuda" else "peak RSS of the training process (main)"
    step_abs = {f"{v}_s_per_step": _num(med[v]) for v in VARIANTS}
    results: dict[str, Any] = {
        "step_ratio_cached_over_plain": _metric(
            "step_ratio_cached_over_plain", median(r_cp), per_repeat=r_cp, **step_abs,
            cpu_s_per_step={v: _num(cpu_med[v]) for v in VARIANTS},
            cpu_ratio=_num(median([c / p for c, p in zip(cpu_rep["cached"], cpu_rep["plain"])])),
            breakdown_s={v: {p: _num(x) for p, x in breakdown[v].items()} for v in VARIANTS}),
        "step_ratio_online_over_cached": _metric(
            "step_ratio_online_over_cached", median(r_oc), per_repeat=r_oc, **step_abs,
            cpu_ratio=_num(median([o / c for o, c in zip(cpu_rep["online"], cpu_rep["cached"])]))),
        "saving_efficiency": _metric("saving_efficiency", median(eff), per_repeat=eff,
                                     formula="(online - cached) / (online - plain)",
                                     cpu_value=_num(median(eff_cpu)), cpu_per_repeat=eff_cpu),
        "peak_mem_ratio_cached_over_plain": _metric(
            "peak_mem_ratio_cached_over_plain", mem_of("cached") / mem_of("plain"), measure=mem_kind,
            bytes={v: mem_of(v) for v in VARIANTS},
            with_workers_ratio=_num(mem_with_workers("cached") / mem_with_workers("plain"))),
        "peak_mem_ratio_online_over_plain": _metric(
            "peak_mem_ratio_online_over_plain", mem_of("online") / mem_of("plain"), measure=mem_kind,
            bytes={v: mem_of(v) for v in VARIANTS},
            with_workers_ratio=_num(mem_with_workers("online") / mem_with_workers("plain"))),
        "cache_build_over_teacher_inference": _metric(
            "cache_build_over_teacher_inference", median(build_ratio), per_repeat=build_ratio,
            build_samples_per_s=_num(median([r["build_samples_per_s"] for r in build_rows])),
            teacher_samples_per_s=_num(median([r["bare_samples_per_s"] for r in build_rows])),
            # same-run diagnostics: the build's own teacher time vs its wall time, and vs the bare teacher
            teacher_share_in_build=_num(median([r["teacher_seconds"] / r["build_seconds"] for r in build_rows])),
            teacher_in_build_over_bare=_num(median([r["teacher_samples_per_s_in_build"] / r["bare_samples_per_s"]
                                                    for r in build_rows]))),
        "reader_over_consumer": _metric(
            "reader_over_consumer", median(rd_ratio), per_repeat=rd_ratio,
            reader_samples_per_s=_num(median([r["samples_per_s"] for r in reader_rows])),
            consumer_samples_per_s=_num(median(consumer)), workers=w.workers),
        "storage": storage,
        "sweep_economics": _sweep(med, median([r["build_samples_per_s"] for r in build_rows]), bs,
                                  recipe_cfg.student.train.epochs, recipe_cfg.cache.K),
        "device": device_info,
        "torch_version": torch.__version__,
        "config": {"workload": w.to_dict(), "quick": quick, "recipe": str(recipe) if recipe else None,
                   "overrides": list(overrides), "resolved": cfg.to_dict()},
    }
    samples.update({
        "counts": {"train_images": len(source), "K": w.K, "cache_samples": len(source) * w.K,
                   "batch_size": bs, "repeats": w.repeats, "warmup_steps_per_block": w.warmup_steps,
                   "timed_steps_per_block": w.timed_steps, "timed_steps_per_variant": w.repeats * w.timed_steps,
                   "reader_batches_per_block": w.reader_batches, "memory_steps": max(1, w.memory_steps),
                   "storage_samples": len(source) * w.K},
        "step_s": {v: [[x["total"] for x in recs] for recs in steps[v]] for v in VARIANTS},
        "step_phases_s": {v: [[{p: x[p] for p in phases if p != "total"} for x in recs] for recs in steps[v]]
                          for v in VARIANTS},
        "reader": reader_rows,
        "reader_breakdown_ms": reader_breakdown,
        "memory": memory,
        "params": extra_params,
        "profile": profiles,
        "profile_memory": profiles_mem,
        "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    })
    results["samples"] = samples
    return results


def _param_counts(setups: dict[str, Setup]) -> dict:
    out = {}
    for v, s in setups.items():
        d = s.task.distiller
        out[v] = {"student": sum(p.numel() for p in d.student.parameters()),
                  "trainable": sum(p.numel() for p in d.parameters() if p.requires_grad)}
        if s.task.teacher is not None:
            out[v]["teacher"] = sum(p.numel() for p in s.task.teacher.parameters())
    return out


def _reader_breakdown(cached: Setup, plain: Setup, source, n: int) -> dict:
    """Per-sample ms in one process: the plain crop (load + augment), the cached replay (load + augment +
    hash check) and the target read (decode + checksum), so a slow reader can be attributed."""
    from attnfd_pipeline import augment

    reader = cached.dataset.reader
    names = cached.dataset.names
    t_plain, t_replay, t_read = [], [], []
    for i in range(n):
        k = cached.dataset.seed_fn(0, i)
        t0 = time.perf_counter()
        plain.dataset.crop(0, i)
        t1 = time.perf_counter()
        img, _ = reader.replay(source, i, k, check=True)
        augment.normalize(img)
        t2 = time.perf_counter()
        reader.read(i, k, names)
        t3 = time.perf_counter()
        t_plain.append(t1 - t0)
        t_replay.append(t2 - t1)
        t_read.append(t3 - t2)
    return {"samples": n, "plain_crop_ms": median(t_plain) * 1e3, "cached_replay_ms": median(t_replay) * 1e3,
            "target_read_ms": median(t_read) * 1e3}


def _sweep(med: dict[str, float], build_rate: float, bs: int, epochs: int, K: int) -> dict:
    """Projected cost of an α sweep of N runs: cache (K seeds per image, once) + N cached runs vs N
    online runs, per training image, from the measured step times and build rate."""
    per = {v: med[v] / bs for v in VARIANTS}  # seconds per sample-step
    build = 1.0 / build_rate if build_rate and build_rate > 0 else float("nan")
    rows = {}
    for n in SWEEP_N:
        cached = K * build + n * epochs * per["cached"]
        online = n * epochs * per["online"]
        plain = n * epochs * per["plain"]
        rows[str(n)] = {"cached_s_per_image": _num(cached), "online_s_per_image": _num(online),
                        "plain_s_per_image": _num(plain), "online_over_cached": _num(online / cached),
                        "saved_fraction": _num(1 - cached / online)}
    gain = epochs * (per["online"] - per["cached"])
    break_even = math.ceil(K * build / gain) if gain > 0 and math.isfinite(build) else None
    return {"assumptions": {"epochs_per_run": epochs, "K": K, "basis": "seconds per training image",
                            "cache_build_s_per_sample": _num(build),
                            "step_s_per_sample": {v: _num(x) for v, x in per.items()}},
            "N": rows, "break_even_N": break_even}


# ---------------------------------------------------------------------------------------------
# results.md


def _fmt(x, spec=".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, spec)


def _met(m) -> str:
    return {True: "yes", False: "**no**", None: "–"}[m]


def format_markdown(res: dict) -> str:
    w = res["config"]["workload"]
    s = res["samples"]
    c = s["counts"]
    dev = res["device"]
    dev_s = dev.get("name") or dev.get("cpu") or dev["type"]
    L: list[str] = []
    repro = ("`attnfd bench --quick --out DIR` (tiny sizes: the figures mean nothing)" if res["config"].get("quick")
             else "`make bench` (= `attnfd bench --out bench`)")
    L += ["# `make bench` results", "",
          f"Reproduce: {repro}. Device: {dev['type']} ({dev_s}, "
          f"{dev.get('torch_threads')} torch threads, {dev.get('cpu_count')} CPUs), torch {res['torch_version']}; "
          f"wall time {_fmt(s.get('wall_s'), '.0f')} s.", "",
          f"Workload: teacher `{w['teacher']}`, student `{w['student']}`, {w['num_classes']} classes, "
          f"crop {w['crop']}, "
          f"batch {w['batch_size']}, targets {'+'.join(w['points'])}, {w['workers']} DataLoader workers; "
          f"{c['train_images']} generated images × K={c['K']} cached; random weights. Every ratio is of two figures "
          f"measured in this run, interleaved (plain/cached/online, reversed on odd repeats), median over "
          f"{c['repeats']} repeats of {c['timed_steps_per_block']} timed steps after {c['warmup_steps_per_block']} "
          f"warm-up step(s); raw samples in `results.json` → `samples`.", ""]
    L += ["| figure | value | goal | met | per repeat |", "| --- | --- | --- | --- | --- |"]
    for key in METRIC_KEYS[:7]:
        m = res[key]
        reps = ", ".join(_fmt(x, ".2f") for x in m.get("per_repeat", [])) or "–"
        L.append(f"| `{key}` | {_fmt(m['value'])} | {m.get('goal', '–')} | {_met(m.get('met'))} | {reps} |")
    st = res["storage"]
    L.append(f"| storage: compression vs float32 (best option at rel_error ≤ {STORAGE_MAX_REL_ERROR:g}: "
             f"`{st['best_option']}`) | ×{_fmt(st['value'], '.2f')} | {st['goal']} | {_met(st['met'])} | – |")
    L.append("")
    L += noise_notes(res)

    sc = res["step_ratio_cached_over_plain"]
    cpu = sc.get("cpu_s_per_step") or {}
    L += ["## Step time (data loading included), median s/step", "",
          "| variant | total (wall) | data wait | forward + loss | backward | optimizer | CPU s (main + workers) |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in VARIANTS:
        b = sc["breakdown_s"][v]
        L.append(f"| {v} | {_fmt(sc[f'{v}_s_per_step'])} | {_fmt(b['wait'])} | {_fmt(b['forward'])} | "
                 f"{_fmt(b['backward'])} | {_fmt(b['optimizer'])} | {_fmt(cpu.get(v))} |")
    L += ["", "Phase columns are medians over all timed steps (they need not add up to the total, a median of "
          "per-repeat medians). CPU seconds per step (training process + its loader workers) barely depend on "
          "what else runs on the machine: their ratios, cached/plain "
          f"{_fmt(sc.get('cpu_ratio'))} and online/cached "
          f"{_fmt(res['step_ratio_online_over_cached'].get('cpu_ratio'))}, "
          "cross-check the wall-clock ratios above on a shared machine. Load average at start "
          f"{_fmt((res['device'].get('load_average_start') or [None])[0], '.1f')}, at end "
          f"{_fmt((s.get('load_average_end') or [None])[0], '.1f')}.", ""]

    mem = s["memory"]
    L += ["## Peak memory (each setup in its own process)", "",
          f"Measure: {res['peak_mem_ratio_cached_over_plain']['measure']}.", "",
          "| variant | main process peak RSS | after setup | workers (sum of peaks) | cuda max allocated |",
          "| --- | --- | --- | --- | --- |"]
    for v in VARIANTS:
        m = mem[v]
        wk = m.get("workers_rss_peak_sum_bytes")
        wk_s = f"{wk / 2**20:.0f} MiB ({m['workers']})" if wk else "n/a"
        cu = m.get("cuda_max_allocated_bytes")
        cu_s = f"{cu / 2**20:.0f} MiB" if cu is not None else "–"
        L.append(f"| {v} | {m['rss_peak_bytes'] / 2**20:.0f} MiB | {m['rss_after_setup_bytes'] / 2**20:.0f} MiB | "
                 f"{wk_s} | {cu_s} |")
    if any(str(mem[v].get("process", "own")) != "own" for v in VARIANTS):
        L += ["", "(The three setups shared one process here, peak reset between them: the figures only keep the "
              "harness working; `make bench` runs each setup in its own process.)"]
    L += ["", f"Ratios with the workers' peaks added: cached/plain "
          f"{_fmt(res['peak_mem_ratio_cached_over_plain']['with_workers_ratio'])}, online/plain "
          f"{_fmt(res['peak_mem_ratio_online_over_plain']['with_workers_ratio'])} (RSS counts shared library pages "
          f"once per process).", ""]

    cb = res["cache_build_over_teacher_inference"]
    rb = s["reader_breakdown_ms"]
    ro = res["reader_over_consumer"]
    L += ["## Cache build and read throughput", "",
          f"- cache build {_fmt(cb['build_samples_per_s'], '.2f')} samples/s vs bare teacher inference "
          f"{_fmt(cb['teacher_samples_per_s'], '.2f')} samples/s on the same batches; inside the build the "
          f"teacher ran {_fmt(cb.get('teacher_share_in_build'), '.2f')} of the build's wall time, at "
          f"{_fmt(cb.get('teacher_in_build_over_bare'), '.2f')}× the bare teacher's speed."
          + (" A build faster than the bare teacher is above the physical limit of 1: other load on the machine "
             "changed the speed of the same computation between the two measurements; the teacher's share of "
             "the build's own wall time is then the cleaner figure." if (cb.get("value") or 0) > 1 else ""),
          f"- cached DataLoader ({ro['workers']} workers, nothing consuming) {_fmt(ro['reader_samples_per_s'], '.1f')} "
          f"samples/s vs {_fmt(ro['consumer_samples_per_s'], '.2f')} samples/s consumed by the cached step.",
          f"- per sample in one process: plain crop {_fmt(rb['plain_crop_ms'], '.1f')} ms, cached replay + hash check "
          f"{_fmt(rb['cached_replay_ms'], '.1f')} ms, target read (decode + checksum) "
          f"{_fmt(rb['target_read_ms'], '.1f')} ms.",
          ""]

    L += ["## Storage per sample (teacher outputs of this run)", "",
          "| option | " + " | ".join(f"{t} bytes" for t in st["options"][st["recipe_option"]]["targets"])
          + " | total bytes | × vs float32 | max rel_error |",
          "| --- | " + " | ".join("---" for _ in st["options"][st["recipe_option"]]["targets"])
          + " | --- | --- | --- |"]
    for name, o in st["options"].items():
        L.append(f"| `{name}` | " + " | ".join(f"{t['bytes_per_sample'] / 1e3:,.1f} kB" for t in o["targets"].values())
                 + f" | {o['bytes_per_sample'] / 1e3:,.1f} kB | {o['compression_vs_float32']:.2f} | "
                   f"{o['rel_error']:.1e} |")
    od = st["on_disk"]
    L += ["", f"On disk (the built cache, `{od['codec']}`, mantissa bits {od['mantissa_bits']}): "
          + ", ".join(f"{k} {v / 1e3:,.1f} kB" for k, v in od["bytes_per_sample"].items())
          + f" per sample. Weights are random (BatchNorm calibrated): lossless ratios depend on the value "
            f"distribution (zeros), so re-measure on a trained teacher with `attnfd cache plan`.", ""]

    sw = res["sweep_economics"]
    a = sw["assumptions"]
    L += [f"## Sweep economics (α sweep of N runs, {a['epochs_per_run']} epochs each, cache K={a['K']}; "
          f"seconds per training image)", "",
          "| N | cache + N cached runs | N online runs | online / cached | N plain runs |",
          "| --- | --- | --- | --- | --- |"]
    for n, r in sw["N"].items():
        L.append(f"| {n} | {_fmt(r['cached_s_per_image'], '.2f')} | {_fmt(r['online_s_per_image'], '.2f')} | "
                 f"{_fmt(r['online_over_cached'], '.2f')} | {_fmt(r['plain_s_per_image'], '.2f')} |")
    L += ["", f"Break-even: the cache pays for itself from N = {sw['break_even_N']} run(s).", ""]

    notes = where_it_goes(res)
    if notes:
        L += ["## Where the time and memory go (goals missed)", ""] + notes
    return "\n".join(L).rstrip() + "\n"


def _profile_table(rows: list[dict], device_type: str) -> list[str]:
    if not rows:
        return []
    out = ["| op | calls | self CPU ms | CPU total ms |" + (" self device ms |" if device_type == "cuda" else ""),
           "| --- | --- | --- | --- |" + (" --- |" if device_type == "cuda" else "")]
    for r in rows:
        op = r["op"].replace("|", "\\|")
        out.append(f"| `{op}` | {r['calls']} | {r['self_cpu_ms']:.1f} | {r['cpu_total_ms']:.1f} |"
                   + (f" {r.get('self_device_ms', 0):.1f} |" if device_type == "cuda" else ""))
    return out


def noise_notes(res: dict) -> list[str]:
    """Where per-repeat values leave the physically possible range, other load moved the measurement
    more than the effect: say so, and name the figure that is steadier here (CPU seconds per step)."""
    notes = []
    sc, oc = res["step_ratio_cached_over_plain"], res["step_ratio_online_over_cached"]
    se, cb = res["saving_efficiency"], res["cache_build_over_teacher_inference"]
    low = [x for x in sc.get("per_repeat", []) if x is not None and x < 1.0]
    if low:
        notes.append(f"- `step_ratio_cached_over_plain`: {len(low)} of {len(sc['per_repeat'])} repeats are below "
                     f"1.0, the physical limit (the cached step does the plain step's work and more): other load "
                     f"on the machine moved step times more than the effect. CPU seconds per step are steadier "
                     f"here: cached/plain {_fmt(sc.get('cpu_ratio'))}, online/cached {_fmt(oc.get('cpu_ratio'))}.")
    out = [x for x in se.get("per_repeat", []) if x is not None and not (0.0 <= x <= 1.0)]
    if out:
        notes.append(f"- `saving_efficiency`: {len(out)} of {len(se['per_repeat'])} repeats fall outside [0, 1], "
                     f"where it must lie; from CPU seconds per step it is {_fmt(se.get('cpu_value'))}.")
    high = [x for x in cb.get("per_repeat", []) if x is not None and x > 1.0]
    if high:
        notes.append(f"- `cache_build_over_teacher_inference`: {len(high)} of {len(cb['per_repeat'])} repeats are "
                     f"above 1.0, the physical limit; the teacher's share of the build's own wall time "
                     f"({_fmt(cb.get('teacher_share_in_build'), '.2f')}) does not depend on a second measurement.")
    if notes:
        notes = ["Noise check:", ""] + notes + [""]
    return notes


def _cpu_delta(b: dict, v: str) -> float:
    tot = {u: (b[u].get("cpu_main") or 0) + (b[u].get("cpu_workers") or 0) for u in (v, "plain")}
    return tot[v] - tot["plain"] if b[v].get("cpu_main") is not None else float("nan")


def _sub(x, y) -> float:
    return float(x) - float(y) if x is not None and y is not None else float("nan")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def where_it_goes(res: dict) -> list[str]:
    """Notes for each missed goal: where the time or memory goes (measured) and what would close it."""
    s = res["samples"]
    dev = res["device"]["type"]
    L: list[str] = []
    sc = res["step_ratio_cached_over_plain"]
    b = sc["breakdown_s"]
    prof = s.get("profile", {})
    st = res["storage"]
    targets = st["options"][st["recipe_option"]]["targets"]
    shapes = ", ".join(f"{k} {'×'.join(str(d) for d in t['chw'])}" for k, t in targets.items())

    def deltas(v, u):
        out = {}
        for p in ("wait", "forward", "backward", "optimizer"):
            x, y = b[v][p], b[u][p]
            out[p] = (x - y) if (x is not None and y is not None) else float("nan")
        return out

    def delta_line(v, u, d):
        tot = (sc[f"{v}_s_per_step"] or 0) - (sc[f"{u}_s_per_step"] or 0)
        return (f"{v} − {u} = {tot * 1e3:+.0f} ms/step: data wait {d['wait'] * 1e3:+.0f} ms, "
                f"forward + loss {d['forward'] * 1e3:+.0f} ms, backward {d['backward'] * 1e3:+.0f} ms, optimizer "
                f"{d['optimizer'] * 1e3:+.0f} ms (phase medians).")

    cpu_miss = (sc.get("cpu_ratio") or 0) > GOALS["step_ratio_cached_over_plain"][1]
    if sc.get("met") is False or cpu_miss:
        d = deltas("cached", "plain")
        big = max(d, key=lambda k: d[k] if math.isfinite(d[k]) else -1e9)
        head = (f"### Step: cached / plain = {_fmt(sc['value'])} wall clock, {_fmt(sc.get('cpu_ratio'))} in CPU "
                f"seconds (goal ≤ 1.10" + (", missed on CPU time)" if sc.get("met") else ")"))
        cm = _sub(b["cached"].get("cpu_main"), b["plain"].get("cpu_main"))
        cw = _sub(b["cached"].get("cpu_workers"), b["plain"].get("cpu_workers"))
        L += [head, "", f"CPU seconds per step, cached − plain: training process {_fmt(cm, '+.3f')} s "
              f"({_fmt(cm / b['plain']['cpu_main'] * 100 if b['plain'].get('cpu_main') else None, '+.0f')} %), "
              f"loader workers {_fmt(cw, '+.3f')} s. Wall clock: " + delta_line("cached", "plain", d), ""]
        reading = (cw if math.isfinite(cw) else 0) > (cm if math.isfinite(cm) else 0) or (
            not math.isfinite(cm) and big == "wait")
        if reading:
            L.append("Most of it is reading: each cached sample costs the crop replay and hash check plus the "
                     "target read (decode + checksum) in the workers, on the cores the step also uses. Would "
                     "close it: a cheaper codec for the large maps (`cache.codec = \"none\"` or blosc: ~1 ms vs "
                     "~16 ms zstd decode per 8.5 MB chunk), fewer cached points, skipping the per-read "
                     "checksum after a `cache verify`.")
        else:
            L.append(f"Most of it is compute in the training process, not reading (the loader keeps up: data wait "
                     f"is {_fmt(b['cached']['wait'] * 1e3 if b['cached'].get('wait') is not None else None, '.0f')} "
                     f"ms per step): the distillation head — a student CBAM at every point, 1×1 connectors + "
                     f"BatchNorm up to the teacher's maps ({shapes}), the bilinear resize and the AttnFD loss, "
                     f"forward and backward. The online run pays the same, so the cache cannot remove it; the "
                     f"1.0 limit holds for the read path only. Where it goes: the 1×1 connectors (up to 2048 "
                     f"channels at B; every position of the stride-4 map D) and the elementwise gating "
                     f"and normalisation at every point (profile below). Would close it: fewer or coarser points, "
                     f"a fused loss, or a GPU where these ops are a negligible share of the step.")
        if prof.get("cached"):
            L += ["", "Top ops of one cached step (torch.profiler, self time):", ""]
            L += _profile_table(prof["cached"], dev)
        if prof.get("plain"):
            L += ["", "Top ops of one plain step:", ""] + _profile_table(prof["plain"], dev)
        L.append("")
    se = res["saving_efficiency"]
    cpu_eff = se.get("cpu_value")
    if se.get("met") is False or (cpu_eff is not None and cpu_eff < GOALS["saving_efficiency"][1]):
        L += [f"### Saving efficiency = {_fmt(se['value'])} wall clock, {_fmt(cpu_eff)} in CPU seconds (goal ≥ 0.9"
              + (", missed on CPU time)" if se.get("met") else ")"), "",
              "(online − cached) / (online − plain): the part of the online run's extra cost that the cache "
              f"removes. CPU seconds per step (process + workers) over plain: online "
              f"{_fmt(_cpu_delta(b, 'online'), '+.3f')} s, cached {_fmt(_cpu_delta(b, 'cached'), '+.3f')} s. "
              "Wall clock: " + delta_line("online", "plain", deltas("online", "plain")) + " "
              + delta_line("cached", "plain", deltas("cached", "plain"))
              + " What the cached run still pays is the distillation head and the target read (previous "
                "section); the same measures would close it."]
        if prof.get("online"):
            L += ["", "Top ops of one online step:", ""] + _profile_table(prof["online"], dev)
        L.append("")
    pm = res["peak_mem_ratio_cached_over_plain"]
    if pm.get("met") is False:
        mem = s["memory"]
        par = s.get("params", {})
        extra_p = (par.get("cached", {}).get("trainable", 0) - par.get("plain", {}).get("trainable", 0))
        bs = s["counts"]["batch_size"]
        tgt = sum(t["float32_bytes_per_sample"] for t in targets.values()) * bs
        key = "cuda_max_allocated_bytes" if dev == "cuda" else "rss_peak_bytes"
        L += [f"### Peak memory: cached / plain = {_fmt(pm['value'])} (goal ≤ 1.15)", "",
              f"Peak plain {mem['plain'][key] / 2**20:.0f} MiB vs cached {mem['cached'][key] / 2**20:.0f} MiB "
              f"(after setup: {mem['plain']['rss_after_setup_bytes'] / 2**20:.0f} vs "
              f"{mem['cached']['rss_after_setup_bytes'] / 2**20:.0f} MiB RSS). Accounted for: {extra_p / 1e6:.2f} M "
              f"extra trainable parameters (CBAMs + connectors) = {extra_p * 12 / 2**20:.0f} MiB with gradients "
              f"and momentum; one batch of targets as float32 = {tgt / 2**20:.0f} MiB (float16 in the batch, "
              f"float32 in the loss, plus the normalised copies); the connector outputs and loss activations "
              f"kept for backward at every point (D at stride 4 is the largest). Would close it: keep targets "
              f"float16 into the loss, recompute the distillation head in backward (activation checkpointing "
              f"of CBAM + connector + loss), compute and backpropagate the loss point by point, or "
              f"drop/downsample D."]
        pmem = s.get("profile_memory", {})
        for v in ("cached", "plain"):
            if pmem.get(v):
                L += ["", f"Ops allocating the most memory in one {v} step (torch.profiler, self, net):", "",
                      "| op | calls | MiB |", "| --- | --- | --- |"]
                L += [f"| `{r['op']}` | {r['calls']} | {r['self_mib']:.1f} |" for r in pmem[v]]
        L.append("")
    cb = res["cache_build_over_teacher_inference"]
    if cb.get("met") is False:
        rows = s["cache_build"]
        tsec = median([r["teacher_seconds"] for r in rows])
        wsec = median([r["writer_seconds"] for r in rows])
        lsec = median([r["load_seconds"] for r in rows])
        bsec = median([r["build_seconds"] for r in rows])
        bare = median([r["bare_seconds"] for r in rows])
        specs = median([r.get("target_specs_seconds") for r in rows])
        why = []
        if tsec > 1.05 * bare:
            why.append(f"the teacher itself ran {tsec / bare:.2f}× slower inside the build than alone: the "
                       f"loader and writer threads compete with it for the CPU cores (here shared with the machine's "
                       f"other load too)" + (" — on a GPU they would not" if dev == "cpu" else ""))
        rest = bsec - tsec
        if rest > 0.05 * bsec:
            why.append(f"{rest:.1f} s of the build is outside the teacher's batches: fixed per-build costs — a dry "
                       f"teacher forward for the target shapes (`target_specs`, {_fmt(specs, '.1f')} s alone), store "
                       f"creation, lock, fsync — and the first shard's load and the last shard's write, which "
                       f"nothing overlaps; with {rows[0]['build_samples']} samples per build they weigh far more "
                       f"than in a real build of thousands")
        L += [f"### Cache build / teacher inference = {_fmt(cb['value'])} (goal ≥ 0.9)", "",
              f"Build {bsec:.1f} s vs bare teacher {bare:.1f} s on the same batches. Inside the build: teacher "
              f"{tsec:.1f} s (main thread), loader thread {lsec:.1f} s (crop replay), writer thread {wsec:.1f} s "
              f"(float16 step, checksums, compression, I/O). " + (_cap("; ".join(why)) + ". " if why else "")
              + "Would close it: a teacher on a GPU (the CPU threads then overlap for free); on CPU, cheaper "
                "writer work (blosc or no codec, vectorised checksums); taking the target shapes from the model "
                "definition instead of a dry forward; and, for this measurement, more samples per build."]
        L.append("")
    ro = res["reader_over_consumer"]
    if ro.get("met") is False:
        rb = s["reader_breakdown_ms"]
        L += [f"### Reader / consumer = {_fmt(ro['value'])} (goal ≥ 3)", "",
              f"Per sample in one process: crop replay + hash check {rb['cached_replay_ms']:.1f} ms (the plain "
              f"crop alone {rb['plain_crop_ms']:.1f} ms), target read {rb['target_read_ms']:.1f} ms. Would close it: "
              f"raw or blosc storage for the large maps, more workers, skipping the per-read checksum after a "
              f"`cache verify`."]
        L.append("")
    if st.get("met") is False:
        opts = st["options"]
        lossless = opts[st["recipe_option"]]
        tiny = {k: t["tiny_channels"] for k, t in lossless["targets"].items() if t["tiny_channels"] > 0}
        zeros = ", ".join(f"{k} {t.get('zero_fraction', 0) * 100:.0f} %" for k, t in lossless["targets"].items())
        L += [f"### Storage: best ×{_fmt(st['value'], '.2f')} vs float32 at rel_error ≤ {STORAGE_MAX_REL_ERROR:g} "
              f"(goal ≥ 3)", ""]
        if lossless["rel_error"] > STORAGE_MAX_REL_ERROR:
            L.append(f"Even lossless float16 has rel_error {lossless['rel_error']:.1e}: channels whose RMS is below "
                     f"1e-4 ({', '.join(f'{k} {v * 100:.1f} %' for k, v in tiny.items()) or 'none'}) fall into "
                     f"float16's subnormal range and keep few significant bits. With random weights "
                     f"the teacher's CBAM gates saturate and produce such channels. Would close it: a per-channel "
                     f"scale stored beside the array, or checking on a trained teacher "
                     f"with `attnfd cache plan`.")
        else:
            L.append(f"float16 gives ×2; lossless codecs gain almost only from exact zeros (docs/method.md; here "
                     f"{zeros} zeros), and mantissa rounding adds a few percent. Would close it: more mantissa "
                     f"bits dropped where the error budget allows, fewer points or K, or storing post-ReLU maps; "
                     f"trained teachers' maps may compress differently — re-measure with `attnfd cache plan`.")
        L.append("")
    return L
