"""The loaders of a training run — the teacher's, the student's and the bench's are built here, so they
batch, shard and pin memory the same way."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from attnfd_pipeline.config import Config, TrainConfig
from attnfd_pipeline.data.loaders import CachedSeeds, EpochSampler, FreshSeeds, make_loader, make_val_loader
from attnfd_pipeline.data.source import ImageSource
from attnfd_pipeline.data.stage2 import StudentDataset
from attnfd_pipeline.engine import distributed
from attnfd_pipeline.engine.protocol import EvalProtocol


def train_seeds(cfg: Config) -> CachedSeeds | FreshSeeds:
    """The student's aug seed of image ``index`` in ``epoch``: one of the K cached seeds, or a fresh draw
    per epoch (``student.targets = "online-fresh"``)."""
    if cfg.student.targets.fresh:
        return FreshSeeds(run_seed=cfg.student.train.seed)
    return CachedSeeds(cfg.student.train.seed, cfg.cache.K, cfg.student.seed_order)


def student_dataset(cfg: Config, source: ImageSource, reader=None, names=()) -> StudentDataset:
    """The student's training crops (``train_seeds``); with a cache ``reader``, carrying targets ``names``."""
    return StudentDataset(source, cfg.augment, train_seeds(cfg), reader, names if reader is not None else ())


def train_loader(cfg: Config, train: TrainConfig, dataset: Dataset, device: torch.device | None, *, sampler,
                 drop_last: bool) -> DataLoader:
    """The training DataLoader of ``dataset``: ``train.batch_size``, ``data.num_workers`` workers."""
    return make_loader(dataset, batch_size=train.batch_size, workers=cfg.data.num_workers, sampler=sampler,
                       drop_last=drop_last, device=device)


def epoch_loaders(cfg: Config, train: TrainConfig, dataset: Dataset, val_source: ImageSource,
                  device: torch.device, protocol: EvalProtocol,
                  ctx: distributed.DistContext | None = None) -> tuple[Callable[[int], DataLoader], DataLoader]:
    """(train loader of an epoch, val loader scored under ``protocol``); with a distributed ``ctx``, this
    rank's share of both. Partial batches are dropped unless the split is no larger than one batch."""
    ctx = ctx or distributed.DistContext(device=device)
    sampler = EpochSampler(len(dataset), seed=train.seed, shuffle=True, rank=ctx.rank, world=ctx.world)
    loader = train_loader(cfg, train, dataset, device, sampler=sampler, drop_last=len(sampler) > train.batch_size)

    def train_loader_for(epoch: int) -> DataLoader:
        sampler.set_epoch(epoch)
        return loader

    val_loader = make_val_loader(val_source, protocol, batch_size=train.val_batch_size,
                                 workers=min(cfg.data.num_workers, 1),
                                 sampler=distributed.eval_sampler(len(val_source), ctx), device=device)
    return train_loader_for, val_loader
