"""AttnFD distillation loss (paper eq. 6–7; docs/method.md "Loss").

    L_Attn = mean over samples of ‖ F''_S / ‖F''_S‖ − F''_T / ‖F''_T‖ ‖²

``norm`` selects what ‖·‖ is taken over:
- ``"batch"`` (default; the authors' code, which the authors say produced the reported numbers):
  each tensor is divided by the L2 norm of the whole batch tensor (N, C, H, W together); the squared
  difference is summed and divided by the batch size. α = 2 / 15 are calibrated for this.
- ``"sample"``: each sample divided by its own L2 norm over C×H×W; summed, divided by the batch size.
- ``"channel"`` (the paper's text): each pixel's C-vector divided by its L2 norm; the squared
  difference is summed over channels and averaged over pixels and samples.
Each is invariant to rescaling its unit (whole batch, one sample, one pixel) of either input.

``AttnFD`` (registered as ``"attnfd"``) is the method: a trainable student CBAM at each point, then a
connector (1×1 conv student → teacher channels + BN), bilinear resizing to the teacher's map,
and ``attnfd_loss`` against the cached teacher F''. During the connector warm-up epochs only the
connectors learn (the reference). Where the cache stores a point's map average-pooled (``cache.pool``),
the student's map is resized to the teacher's full map and pooled the same way before the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnfd_pipeline.cache.encoding import pool_student
from attnfd_pipeline.layers import CBAM
from attnfd_pipeline.losses.base import DistillMethod, MethodContext, MethodSection, connector, match_size, register
from attnfd_pipeline.errors import UserError

NORMS = ("batch", "sample", "channel")
EPS = 1e-12


def _unit(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x / x.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp_min(EPS)


def attnfd_loss(student: torch.Tensor, teacher: torch.Tensor, norm: str = "batch") -> torch.Tensor:
    """Loss between refined maps of equal shape (N, C, H, W); computed in float32."""
    if student.shape != teacher.shape:
        raise UserError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    s, t = student.float(), teacher.float()
    n = s.shape[0]
    if norm == "batch":
        return (_unit(s, (0, 1, 2, 3)) - _unit(t, (0, 1, 2, 3))).pow(2).sum() / n
    if norm == "sample":
        return (_unit(s, (1, 2, 3)) - _unit(t, (1, 2, 3))).pow(2).sum() / n
    if norm == "channel":
        return (_unit(s, (1,)) - _unit(t, (1,))).pow(2).sum(1).mean()
    raise UserError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")


# ---------------------------------------------------------------------------------------------
# the method: a trainable CBAM at each point, then a connector (1×1 conv + BN) to the teacher's channels


@dataclass(frozen=True)
class AttnFDConfig(MethodSection):
    """AttnFD's section: its weights only; its normalisation is ``student.norm``, its points ``student.points``
    and the released-code recipe switches are ``student`` keys (config.StudentConfig)."""


@register
class AttnFD(DistillMethod):
    """AttnFD (Mansourian et al., "Attention-guided Feature Distillation for Semantic Segmentation"):
    L = Σ_points L_Attn(connector(CBAM_S(F_S)), F''_T) against the teacher's refined maps F''_T."""

    name = "attnfd"
    label = "AttnFD"
    uses = frozenset({"points", "norm"})
    params_type = AttnFDConfig
    paper = "Mansourian et al., Attention-guided Feature Distillation for Semantic Segmentation (AttnFD)"

    @classmethod
    def required_targets(cls, points, params=None):
        return tuple(points)

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.norm = ctx.norm
        # built in this order (all CBAMs, then all connectors) so that a seeded build draws the same weights
        self.attention = nn.ModuleDict({p: CBAM(ctx.student_channels[p]) for p in self.points})
        self.connectors = nn.ModuleDict({p: connector(ctx.student_channels[p], int(ctx.target_shapes[p][0]))
                                         for p in self.points})

        self.target_pool = dict(ctx.target_pool)

    def _match(self, p: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The student's map at the target's resolution: bilinear resize, or — for a target the cache stores
        pooled — resize to the teacher's full map, then the same average pooling (a variant of the loss)."""
        if p in self.target_pool:
            f, h, w = self.target_pool[p]
            return pool_student(x, (h, w), f)
        return match_size(x, target)

    def refine(self, feats):
        """Student F'' at each point, passed through its connector (teacher channels)."""
        return {p: self.connectors[p](self.attention[p](feats[p])) for p in self.points}

    def _loss(self, mapped, targets):
        per = {p: attnfd_loss(self._match(p, mapped[p], targets[p]), targets[p], self.norm) for p in self.points}
        return sum(per.values()), {f"L_{p}": float(v.detach()) for p, v in per.items()}

    def forward(self, out, targets, epoch=0, batch=None):
        return self._loss(self.refine(out), targets)

    def warmup_loss(self, out, targets, epoch=0, batch=None):
        # reference connector warm-up: only the connectors learn, from frozen student features and CBAMs
        with torch.no_grad():
            refined = {p: self.attention[p](out[p]) for p in self.points}
        return self._loss({p: self.connectors[p](refined[p]) for p in self.points}, targets)
