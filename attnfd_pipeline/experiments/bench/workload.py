"""The bench's workload: its sizes, the recipe at those sizes, a generated dataset, a teacher bundle
with random weights, and the four training setups built by the same pieces as ``runs.run_student``
(``distill.build_task``, ``runs.student_dataset``, ``runs.train_loader``)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Sampler, default_collate

from attnfd_pipeline.experiments.bench.common import VARIANTS
from attnfd_pipeline.errors import UserError


@dataclass(frozen=True)
class Workload:
    """Sizes of one bench run. Defaults: the paper's points and teacher at a 257-px crop, sized to finish
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
    memory_mode: str = "each"  # "each" | "one" | "inline" (see memory.measure_memory)
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


def workload_config(w: Workload, work: Path, data_root: Path, recipe: str | Path | None = None,
                    overrides: Sequence[str] = ()):
    """The recipe (augmentation, codec, norm, lr …) at the workload's sizes, pointing into ``work``, over the
    dataset at ``data_root`` (``make_dataset``)."""
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
        # the steady-state step with every module training: no warm-up epoch (and so connectors always on)
        f"student.train.batch_size={w.batch_size}", "student.connector_warmup_epochs=0",
        'student.connector_schedule="always"',
    ]
    cfg = load_config(recipe, list(o) + list(overrides))
    if cfg.student.alpha <= 0:  # the distilled variants need α > 0 (the plain one sets α = 0 itself)
        cfg = load_config(recipe, list(o) + list(overrides) + ["student.alpha=2.0"])
    return cfg


def make_dataset(w: Workload, root: Path) -> Path:
    """The workload's generated training images (sides ``w.image_scale`` × the crop) under ``root``."""
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


def make_teacher_bundle(cfg, w: Workload, source) -> Path:
    """A teacher bundle with random weights (BatchNorm calibrated on ``w.calib_batches`` batches), written where
    the config expects it."""
    from attnfd_pipeline.augment import normalize
    from attnfd_pipeline.data.loaders import AugmentedDataset, FreshSeeds
    from attnfd_pipeline.teacher import build_side_attention, build_teacher_model, bundle_path, save_bundle
    from attnfd_pipeline.utils import seed_everything

    seed_everything(cfg.teacher.train.seed)
    model = build_teacher_model(cfg, w.num_classes)
    ds = AugmentedDataset(source, cfg.augment, FreshSeeds())
    n = len(source)
    per = max(2, w.batch_size)  # BatchNorm in train mode needs more than one value per channel (image pool)
    batches = [normalize(torch.stack([ds[(0, (b * per + j) % n)]["image"] for j in range(per)]))
               for b in range(max(1, w.calib_batches))]
    calibrate_batchnorm(model, batches)
    attention = build_side_attention(cfg, model)  # non-inpath CBAM modes: seeded side branches
    return save_bundle(bundle_path(cfg), cfg, model.eval(), attention, w.num_classes)


class KeySampler(Sampler):
    """Yields the ``(epoch, index)`` keys set before each block (same keys for every variant)."""

    def __init__(self):
        self.keys: list[tuple[int, int]] = []

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


class InMemoryLoader:
    """The cached variant's batches, read and collated when a pass starts — before any step is timed —
    so the steps that follow pay no DataLoader read: the physical limit of a cache. Holds only the
    current block's batches, as a prefetching DataLoader holds a few."""

    num_workers = 0

    def __init__(self, dataset, sampler: KeySampler, batch_size: int):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size  # drop_last, as the cached loader

    def __iter__(self):
        keys, bs = list(self.sampler), self.batch_size
        return iter([default_collate([self.dataset[k] for k in keys[b * bs:(b + 1) * bs]]) for b in range(len(self))])


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


def _targets_side(cfg, variant: str, names: Sequence[str], bundle, cache_dir, device: torch.device):
    """(cache reader, online teacher, target shapes) of a variant: the cache for ``cached`` and
    ``inmemory``, the frozen teacher for ``online``, neither for ``plain``."""
    from attnfd_pipeline.cache import CacheReader
    from attnfd_pipeline.teacher import load_teacher

    if variant in ("cached", "inmemory"):
        reader = CacheReader(cache_dir)
        return reader, None, {n: reader.info.targets[n].chw for n in names}
    if variant == "online":
        teacher = load_teacher(bundle, device)
        return None, teacher, dict(teacher.target_specs(cfg.augment.crop_size, names))
    return None, None, {}


def build_setup(cfg, variant: str, *, num_classes: int, bundle: str | Path | None, cache_dir: str | Path | None,
                device: torch.device) -> Setup:
    """One of ``VARIANTS``, built by the pieces ``runs.run_student`` is built from (``distill.build_task``,
    ``runs.student_dataset``, ``runs.train_loader``)."""
    from attnfd_pipeline.data.source import ImageSource
    from attnfd_pipeline.distill import build_task, method_targets
    from attnfd_pipeline.engine.optim import build_optimizer, build_scheduler
    from attnfd_pipeline.runs import student_dataset, train_loader

    if variant not in VARIANTS:
        raise UserError(f"unknown bench variant {variant!r}; known: {', '.join(VARIANTS)}")
    s = cfg.student
    alpha = 0.0 if variant == "plain" else s.alpha
    reader, teacher, shapes = _targets_side(cfg, variant, method_targets(s), bundle, cache_dir, device)
    task = build_task(s, num_classes, shapes, alpha=alpha, teacher=teacher, device=device, warmup_epochs=0)
    ds = student_dataset(cfg, ImageSource.from_config(cfg, cfg.data.train_split), reader, task.target_names)
    sampler = KeySampler()
    if variant == "inmemory":
        loader = InMemoryLoader(ds, sampler, s.train.batch_size)
    else:
        loader = train_loader(cfg, s.train, ds, device, sampler=sampler, drop_last=True)
    optimizer = build_optimizer(task.param_groups(s.train), s.train)
    scheduler = build_scheduler(optimizer, s.train, 1000)  # a horizon no bench block reaches
    scaler = torch.amp.GradScaler("cuda") if (s.train.amp and device.type == "cuda") else None
    return Setup(variant, task, ds, loader, sampler, optimizer, scheduler, scaler, device, s.train.amp)


def param_counts(setups: dict[str, Setup]) -> dict:
    def count(params) -> int:
        return sum(p.numel() for p in params)

    return {v: {"student": count(s.task.distiller.student.parameters()),
                "trainable": count(p for p in s.task.distiller.parameters() if p.requires_grad)}
            | ({"teacher": count(s.task.teacher.parameters())} if s.task.teacher is not None else {})
            for v, s in setups.items()}
