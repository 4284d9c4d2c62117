"""One training sample, replayed: load image ``index``, draw its augmentation for ``aug_seed`` (or take
parameters already drawn, e.g. those a cache stored), apply them.

The cache build (which records the parameters and content hashes), the plain training loader and the
Stage 2 dataset (which re-applies the stored parameters and checks the hashes: ``data.stage2.replay_cached``) all go through ``replay``,
so the crop the teacher saw and the crop the student sees come from the same code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attnfd_pipeline import augment
from attnfd_pipeline.augment import AugmentParams
from attnfd_pipeline.errors import UserError


class Replayed(NamedTuple):
    params: AugmentParams  # what was applied
    image: torch.Tensor  # augmented uint8 (3, H, W)
    label: torch.Tensor  # augmented uint8 (H, W)


def replay(source, index: int, aug_seed: int, aug_cfg=None, *, params: AugmentParams | None = None,
           image: torch.Tensor | None = None, label: torch.Tensor | None = None, impl: int | None = None) -> Replayed:
    """Sample (``index``, ``aug_seed``) of ``source``: parameters drawn from (``aug_cfg``, index, aug_seed)
    unless ``params`` are given; ``image`` / ``label`` spare a reload when the caller already holds them.
    ``impl``: the augmentation implementation (default ``aug_cfg.impl``, else 1 — a cache passes its own)."""
    if image is None:
        image, label = source.load(index)
    if params is None:
        if aug_cfg is None:
            raise UserError("replay needs the augmentation config (aug_cfg) or the parameters (params)")
        params = augment.draw(aug_cfg, index, aug_seed, tuple(image.shape[-2:]))
    if impl is None:
        impl = getattr(aug_cfg, "impl", 1) if aug_cfg is not None else 1
    img, lab = augment.apply(params, image, label, impl=impl)
    return Replayed(params, img, lab)
