"""Sample sources: one dataset split as numpy arrays of paths, loaded one image at a time.

A source is what every stage iterates over: teacher training, cache building and student training
all address an image by its index in the split listing, so (index, aug seed) names one sample.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from attnfd_pipeline.data.datasets import DatasetInfo, dataset_info, label_identity, list_split
from attnfd_pipeline.data.io import load_pair


@dataclass(frozen=True)
class ImageSource:
    """A dataset split: ids and file paths held as numpy arrays (cheap to fork into workers)."""

    info: DatasetInfo
    root: str
    split: str
    ids: np.ndarray
    images: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_config(cls, cfg, split: str | None = None) -> "ImageSource":
        info = dataset_info(cfg)
        split = split or cfg.data.train_split
        files = list_split(info, cfg.data.root, split)
        return cls(info, str(cfg.data.root), split, files.ids, files.images, files.labels)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 image (3,H,W) and uint8 train-id label (H,W) of sample ``index``."""
        return load_pair(self.info, self, index)

    def identity(self) -> dict:
        """Dataset identity for cache fingerprints: the split listing and every file's size.
        (Sizes, not content hashes: hashing 10k images on every run would cost minutes; the
        per-sample image/label hashes in the cache manifest catch content changes on replay.)"""
        h = hashlib.sha256()
        for i, img, lab in zip(self.ids, self.images, self.labels):
            h.update(f"{i}\0{os.path.getsize(img)}\0{os.path.getsize(lab)}\n".encode())
        return {
            "dataset": self.info.name,
            "num_classes": self.info.num_classes,
            "split": self.split,
            "count": len(self),
            "listing_sha256": h.hexdigest(),
            **label_identity(self.info),  # a declared dataset's classes and label table
        }
