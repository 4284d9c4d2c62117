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

from attnfd_pipeline.data.check import check_dataset, format_problems
from attnfd_pipeline.data.datasets import DataError, DatasetInfo, dataset_info, label_identity, list_split
from attnfd_pipeline.data.io import load_pair
from attnfd_pipeline.errors import UserError


class SampleSource:
    """What the stages read from a source: ``ids``, ``len()``, ``load(index)``, ``identity()``, and ``check``."""

    def check(self, teacher) -> None:
        """Refuse, before a cache build writes anything, inputs it could not use; none by default (a source
        generated in memory has no files to check)."""


@dataclass(frozen=True)
class ImageSource(SampleSource):
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

    def check(self, teacher) -> None:
        """Every listed file of the split opens with legal labels (headers only: ``attnfd data check`` decodes
        the images), and ``teacher`` (a ``FrozenTeacher``) was trained for this dataset's classes."""
        problems = check_dataset(self.info, self.root, [self.split], decode_images=False)
        if problems:
            raise DataError(problems[0].path, f"dataset {self.info.name!r} at {self.root} (splits {self.split}): "
                                              f"{format_problems(problems, limit=10)}")
        if teacher.num_classes != self.info.num_classes:
            raise UserError(f"{teacher.path}: teacher bundle has {teacher.num_classes} classes, dataset "
                            f"{self.info.name!r} has {self.info.num_classes}")

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
