"""CIRKD (mini-batch pixel-to-pixel part): cross-image relational distillation.

C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "Cross-Image Relational Knowledge Distillation for
Semantic Segmentation", CVPR 2022, pp. 12319–12328.

At each point the student's raw feature passes a connector (1×1 conv + BN → teacher channels, bilinear
resize), both maps are max-pooled by ``pool`` and L2-normalised along channels. For every ordered pair
of images (i, j) of the batch the pixel-to-pixel similarities S[x, y] = f_i(x) · f_j(y) / τ are turned
into a distribution over the pixels y of image j, and the student's is pulled to the teacher's:

    L = mean over (i, j, x) of KL( softmax_y(S_T[i, j, x, :]) ‖ softmax_y(S_S[i, j, x, :]) )

Simplified: only the mini-batch pixel-to-pixel relation is implemented — CIRKD's memory bank of
pixel and region embeddings (pixel-to-region contrast) and its logit KD term are left out (combine with
``kd``: ``student.method = "cirkd+kd"``). The teacher features are the cached raw ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnfd_pipeline.config import CIRKDConfig
from attnfd_pipeline.losses.base import DistillMethod, MethodContext, as_float, connector, match_size, register
from attnfd_pipeline.targets import raw_name
from attnfd_pipeline.errors import UserError


def cross_image_relation_loss(student: torch.Tensor, teacher: torch.Tensor, *, tau: float = 0.1,
                              pool: int = 2) -> torch.Tensor:
    """CIRKD's mini-batch pixel-to-pixel loss between equal-shape (N, C, H, W) maps."""
    if student.shape != teacher.shape:
        raise UserError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    s, t = as_float(student), as_float(teacher)
    if pool > 1:
        s = F.max_pool2d(s, pool, ceil_mode=True)
        t = F.max_pool2d(t, pool, ceil_mode=True)
    s = F.normalize(s.flatten(2), dim=1)  # (N, C, P)
    t = F.normalize(t.flatten(2), dim=1)
    sim_s = torch.einsum("icx,jcy->ijxy", s, s) / tau
    sim_t = torch.einsum("icx,jcy->ijxy", t, t) / tau
    log_ps, log_pt = F.log_softmax(sim_s, dim=3), F.log_softmax(sim_t, dim=3)
    return (log_pt.exp() * (log_pt - log_ps)).sum(3).mean()


@register
class CIRKD(DistillMethod):
    name = "cirkd"
    paper = "Yang et al., Cross-Image Relational Knowledge Distillation for Semantic Segmentation (CVPR 2022)"
    params_type = CIRKDConfig

    @classmethod
    def required_targets(cls, points):
        return tuple(raw_name(p) for p in points)

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.connectors = nn.ModuleDict({p: connector(ctx.student_channels[p], int(ctx.target_shapes[raw_name(p)][0]))
                                         for p in self.points})

    def forward(self, out, targets, epoch=0, batch=None):
        per = {}
        for p in self.points:
            t = targets[raw_name(p)]
            per[p] = cross_image_relation_loss(match_size(self.connectors[p](out[p]), t), t,
                                               tau=self.params.tau, pool=self.params.pool)
        return sum(per.values()), {f"L_{p}": float(v.detach()) for p, v in per.items()}
