"""The Stage 2 training dataset: the student's crops, with the teacher targets cached for them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from attnfd_pipeline.data.loaders import AugmentedDataset, CachedSeeds, FreshSeeds

if TYPE_CHECKING:
    from attnfd_pipeline.cache.reader import CacheReader


class StudentDataset(AugmentedDataset):
    """Training crops at the cached seeds (or fresh ones, ``FreshSeeds``, when the targets are computed
    online on fresh draws); with a ``reader``, the crop is the replay of the stored parameters
    (hash-checked against the manifest) and the sample carries its cached targets ``names``."""

    def __init__(self, source, cfg, seeds: CachedSeeds | FreshSeeds, reader: CacheReader | None = None, names=()):
        super().__init__(source, cfg, seeds)
        self.reader, self.names = reader, tuple(names)

    def __getitem__(self, key):
        epoch, index = key
        if self.reader is None:
            return super().__getitem__(key)
        k = self.seed_fn(epoch, index)
        image, label = self.reader.replay(self.source, index, k, check=True)
        targets = {n: torch.from_numpy(a) for n, a in self.reader.read(index, k, self.names).items()}
        return {"image": image, "label": label.long(), "index": index, "aug_seed": k,  # uint8, as AugmentedDataset
                "targets": targets}
