"""The module Stage 2 trains (and checkpoints): the student plus the distillation methods' modules.

``Distiller(student, points, teacher_channels)`` is AttnFD (docs/method.md "CBAM" and "Loss"): a trainable CBAM at each
distillation point, then a connector (1×1 conv student → teacher channels + BN), then bilinear resizing
to the teacher's map. ``Distiller(student, points, methods={...})`` holds any set of registered methods
(``attnfd_pipeline.losses``) — KD, LAD, AICSD, Af-DCD, CIRKD or a combination; ``methods={}`` is the
plain student.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from attnfd_pipeline.losses import AttnFD, DistillMethod, MethodContext
from attnfd_pipeline.losses.base import connector, match_size

__all__ = ["Distiller", "connector", "match_size"]


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, points: Sequence[str], teacher_channels: Mapping[str, int] | None = None,
                 *, methods: Mapping[str, DistillMethod] | None = None):
        super().__init__()
        self.student = student
        self.points = tuple(points)
        if methods is None:  # AttnFD, the default
            if teacher_channels is None:
                raise ValueError("Distiller needs teacher_channels (AttnFD) or methods")
            ctx = MethodContext(self.points, {p: student.taps[p].channels for p in self.points},
                                {p: (int(teacher_channels[p]), 0, 0) for p in self.points})
            methods = {"attnfd": AttnFD(ctx)}
        self.methods = nn.ModuleDict(dict(methods))

    # -- AttnFD's modules, under the names checkpoints and the visualiser use -----------------------
    def _attnfd(self) -> AttnFD:
        if "attnfd" not in self.methods:
            raise AttributeError(f"this distiller has no attnfd method (methods: {list(self.methods)})")
        return self.methods["attnfd"]

    @property
    def attention(self) -> nn.ModuleDict:
        return self._attnfd().attention

    @property
    def connectors(self) -> nn.ModuleDict:
        return self._attnfd().connectors

    def refine(self, feats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Student F'' at each point, passed through its connector (teacher channels) — AttnFD."""
        return self._attnfd().refine(feats)

    # -- what the methods need and do ---------------------------------------------------------------
    def required_targets(self) -> list[str]:
        """Union (in order) of the teacher targets the methods read."""
        out: list[str] = []
        for m in self.methods.values():
            out += [t for t in m.targets() if t not in out]
        return out

    def ce_weight(self, epoch: int) -> float:
        w = 1.0
        for m in self.methods.values():
            w *= m.ce_weight(epoch)
        return w

    def backbone_parameters(self):
        return self.student.backbone_parameters()

    def head_parameters(self):
        """Student head + every method's modules (CBAMs with their MLPs, connectors, projectors)."""
        yield from self.student.head_parameters()
        yield from self.methods.parameters()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.student(x)
