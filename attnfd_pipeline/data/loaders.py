"""torch Datasets and DataLoaders over a sample source.

Samplers yield ``(epoch, index)`` pairs, so the augmentation of a sample is a pure function of the
pair (and the config) even with persistent workers: nothing about the epoch lives in worker state.
Datasets hold only a source (numpy arrays of paths) and small frozen configs, so they fork cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from attnfd_pipeline import augment
from attnfd_pipeline.config import AugmentConfig
from attnfd_pipeline.data.replay import replay
from attnfd_pipeline.engine.protocol import EvalProtocol


class EpochSampler(Sampler):
    """Yields ``(epoch, index)``; order = permutation keyed by (seed, epoch). With ``world > 1`` each
    rank takes every world-th index of the (padded) permutation, like DistributedSampler."""

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1,
                 drop_last: bool = False):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, 0x5A3]))
            order = rng.permutation(self.n)
        else:
            order = np.arange(self.n)
        if self.world > 1:
            if self.drop_last:
                order = order[: len(order) - len(order) % self.world]
            else:
                pad = (-len(order)) % self.world
                order = np.concatenate([order, order[:pad]])
            order = order[self.rank :: self.world]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, int(i)) for i in self._order()])

    def __len__(self) -> int:
        return len(self._order())


@dataclass(frozen=True)
class FreshSeeds:
    """Teacher training / online distillation with fresh augmentation: one new replayable draw per
    epoch (aug seed = offset + run_seed × FRESH_SEED_STRIDE + epoch, outside the cached range [0, K)),
    so runs with different seeds see different crops, and run seed 0 keeps ``offset + epoch``."""

    run_seed: int = 0
    offset: int = augment.ONLINE_AUG_OFFSET

    def __call__(self, epoch: int, index: int) -> int:
        return self.offset + self.run_seed * FRESH_SEED_STRIDE + epoch


FRESH_SEED_STRIDE = 100_000  # epochs per run seed before two runs' fresh draws could meet


@dataclass(frozen=True)
class CachedSeeds:
    """Stage 2: image ``index`` in ``epoch`` is shown with cached aug seed f(run_seed, epoch, index) in [0, K)
    (``augment.choose_aug_seed``: ``cycle`` shows every seed once per K epochs, ``random`` draws with
    replacement)."""

    run_seed: int
    K: int
    order: str = "cycle"

    def __call__(self, epoch: int, index: int) -> int:
        return augment.choose_aug_seed(self.run_seed, epoch, index, self.K, self.order)


class AugmentedDataset(Dataset):
    """Training crops: ``replay`` of (index, ``seed_fn(epoch, index)``) on the source image."""

    def __init__(self, source, cfg: AugmentConfig, seed_fn):
        self.source, self.cfg, self.seed_fn = source, cfg, seed_fn

    def __len__(self) -> int:
        return len(self.source)

    def crop(self, epoch: int, index: int):
        k = self.seed_fn(epoch, index)
        _, image, label = replay(self.source, index, k, self.cfg)
        return image, label, k

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        image, label, k = self.crop(epoch, index)
        # uint8 image and label: a quarter of float32's and an eighth of int64's bytes through worker shared
        # memory and the host-to-device copy; the training loop normalises and widens on the device
        # (engine.train.to_device)
        return {"image": image, "label": label, "index": index, "aug_seed": k}


class ValDataset(Dataset):
    """Validation images as ``protocol`` scores them (``engine.protocol``), no randomness; without a
    protocol, the short side resized to the crop and centre-cropped."""

    def __init__(self, source, crop_size: Sequence[int], protocol: EvalProtocol | None = None):
        self.source, self.crop_size = source, tuple(crop_size)
        self.protocol = protocol

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        image, label = self.source.load(index)
        if self.protocol is None:
            image, label = augment.val_transform(image, label, self.crop_size)
        else:
            image, label = self.protocol.transform(image, label)
        return {"image": augment.normalize(image), "label": label.long(), "index": index}


def make_val_loader(source, protocol: EvalProtocol, *, batch_size: int, workers: int, sampler=None,
                    device: torch.device | None = None) -> DataLoader:
    """The val loader of ``protocol`` (one image per batch when images keep their own sizes)."""
    return make_loader(ValDataset(source, protocol.crop, protocol), batch_size=protocol.val_batch_size(batch_size),
                       workers=workers, sampler=sampler, device=device)


def make_loader(dataset: Dataset, *, batch_size: int, workers: int, sampler=None, shuffle: bool = False,
                drop_last: bool = False, device: torch.device | None = None) -> DataLoader:
    """DataLoader with the settings docs/method.md "Reading in DataLoader workers" explains: persistent
    workers, forkserver context
    (zarr/torch threads in the parent make plain fork fragile), pinned memory on CUDA."""
    kwargs = {}
    if workers > 0:
        kwargs = {"persistent_workers": True, "multiprocessing_context": "forkserver", "prefetch_factor": 2}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
                      num_workers=workers, drop_last=drop_last,
                      pin_memory=bool(device is not None and device.type == "cuda"), **kwargs)
