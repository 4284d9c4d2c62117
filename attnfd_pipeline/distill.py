"""Student side of AttnFD (SPEC §3, §5): a trainable CBAM at each distillation point, then a
connector (1×1 conv student → teacher channels + BN), then bilinear resizing to the teacher's map.

``Distiller`` wraps the student so that one module holds everything Stage 2 trains (and checkpoints).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attnfd_pipeline.layers import CBAM


def connector(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, points: Sequence[str], teacher_channels: Mapping[str, int]):
        super().__init__()
        self.student = student
        self.points = tuple(points)
        self.attention = nn.ModuleDict({p: CBAM(student.taps[p].channels) for p in self.points})
        self.connectors = nn.ModuleDict({p: connector(student.taps[p].channels, teacher_channels[p])
                                         for p in self.points})

    def backbone_parameters(self):
        return self.student.backbone_parameters()

    def head_parameters(self):
        """Student head + every student CBAM (MLP included) + connectors: all trainable, none left out."""
        yield from self.student.head_parameters()
        yield from self.attention.parameters()
        yield from self.connectors.parameters()

    def refine(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Student F'' at each point, passed through its connector (teacher channels)."""
        return {p: self.connectors[p](self.attention[p](feats[p])) for p in self.points}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.student(x)


def match_size(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` to ``like``'s spatial size (no-op when equal)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)
