"""Optimiser and per-iteration schedules (docs/method.md "Training recipe"): SGD + Nesterov, backbone at lr,
head at 10×lr."""

from __future__ import annotations

from typing import Iterable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler

from attnfd_pipeline.config import TrainConfig
from attnfd_pipeline.errors import UserError


def param_groups(backbone: Iterable[torch.nn.Parameter], head: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> list[dict]:
    """Two groups: backbone at ``cfg.lr`` and everything else at ``cfg.lr × head_lr_mult``.
    Parameters with ``requires_grad=False`` are left out; a parameter in both lists is an error."""
    backbone = [p for p in backbone if p.requires_grad]
    head = [p for p in head if p.requires_grad]
    seen = {id(p) for p in backbone}
    if any(id(p) in seen for p in head):
        raise UserError("a parameter is in both the backbone and the head group")
    groups = []
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr, "name": "backbone"})
    if head:
        groups.append({"params": head, "lr": cfg.lr * cfg.head_lr_mult, "name": "head"})
    return groups


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_iters: int) -> LRScheduler:
    """Per-iteration schedule over ``total_iters`` steps: poly (1 - t/T)^power or cosine to 0."""
    total_iters = max(1, total_iters)
    if cfg.schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=total_iters, eta_min=0.0)
    power = cfg.poly_power
    return LambdaLR(optimizer, lambda it: max(0.0, 1.0 - min(it, total_iters) / total_iters) ** power)
