"""Af-DCD: augmentation-free dense contrastive distillation.

J. Fan, C. Li, X. Liu, M. Song, A. Yao, "Augmentation-free Dense Contrastive Knowledge Distillation for
Efficient Semantic Segmentation", NeurIPS 2023 (seeds/afdcd-readme.txt).

At each point, on the raw teacher feature F_T (cached ``raw_<point>``) and the student's F_S:

1. *masked feature mimicking*: the student feature is aligned to the teacher's channels (1×1 conv),
   a random ``mask_ratio`` of its pixels is zeroed, and a projector (3×3 conv, ReLU, 3×3 conv)
   reconstructs the teacher feature: F̂ = proj(mask ⊙ align(F_S)); L_fd = mean (F̂ − F_T)².
2. *omni-contrasting* over channel and spatial partitions: both maps are max-pooled, cut into
   patches of ``patch × patch`` positions, and each position's channel vector into ``groups`` (M) equal
   channel groups. Within one patch every (position, group) vector of F̂ is an anchor; its positive is
   the teacher vector at the same (position, group); its negatives are the teacher vectors of every
   *other* channel group (at any position of the patch). With similarity −‖a − b‖₁ and temperature τ:

       L_ctr = mean over anchors of −log( e^{s⁺/τ} / (e^{s⁺/τ} + Σ_neg e^{s⁻/τ}) )

   L = fd_weight · L_fd + ctr_weight · L_ctr, summed over points.

Simplified or changed with respect to the paper / its released code: the teacher features are the
cached eval-mode ones (one augmentation per cached seed, the same for every method); the mask is drawn
from the global torch RNG each step; means replace the reference's sums (sum / batch size), so the
default weights (1, 0.01) keep the reference's fd : ctr balance in mean terms rather than its
1e-6 : 5e-3 literals; for small maps the pooling factor shrinks until a patch fits and patches are
cut to the map (the reference assumes ≥ 16×16 after pooling); channel groups fall back to
gcd(C, groups) when C is not divisible; the "enhanced projector" variant is not offered.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnfd_pipeline.config import AfDCDConfig
from attnfd_pipeline.losses.base import DistillMethod, MethodContext, as_float, match_size, register
from attnfd_pipeline.targets import raw_name
from attnfd_pipeline.errors import UserError


def _pool_and_patch(h: int, w: int, pool: int, patch: int) -> tuple[int, int, int]:
    """Pooling factor (≤ ``pool``, reduced until a ``patch``-sized patch fits) and patch sides."""
    k = pool
    while k > 1 and (h // k < patch or w // k < patch):
        k -= 1
    hp, wp = (h // k, w // k) if k > 1 else (h, w)
    return k, min(patch, hp), min(patch, wp)


def to_contrast_rows(x: torch.Tensor, ph: int, pw: int, groups: int) -> torch.Tensor:
    """(N, C, H, W) → (N · patches, ph·pw·M, C/M): one row per (position in patch, channel group),
    row index = position · M + group. H, W are cut down to multiples of the patch sides."""
    n, c, h, w = x.shape
    hh, ww = (h // ph) * ph, (w // pw) * pw
    x = x[:, :, :hh, :ww]
    x = x.reshape(n, groups, c // groups, hh // ph, ph, ww // pw, pw)
    x = x.permute(0, 3, 5, 4, 6, 1, 2)  # n, patch row, patch col, y, x, group, channel in group
    return x.reshape(n * (hh // ph) * (ww // pw), ph * pw * groups, c // groups)


def omni_contrastive_loss(student: torch.Tensor, teacher: torch.Tensor, *, groups: int = 16, patch: int = 4,
                          pool: int = 4, tau: float = 0.07) -> torch.Tensor:
    """Af-DCD's omni-contrastive loss between equal-shape (N, C, H, W) maps (mean over anchors)."""
    if student.shape != teacher.shape:
        raise UserError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    s, t = as_float(student), as_float(teacher)
    _, c, h, w = s.shape
    k, ph, pw = _pool_and_patch(h, w, pool, patch)
    if k > 1:
        s, t = F.max_pool2d(s, k), F.max_pool2d(t, k)
    m = math.gcd(c, groups)
    rs, rt = to_contrast_rows(s, ph, pw, m), to_contrast_rows(t, ph, pw, m)
    sim = -torch.cdist(rs, rt, p=1) / tau  # (patches, L, L), L = positions · M
    group = torch.arange(rs.shape[1], device=sim.device) % m
    same_group = group[:, None] == group[None, :]
    eye = torch.eye(rs.shape[1], dtype=torch.bool, device=sim.device)
    # keep the positive (diagonal) and every other-group negative; drop same-group, other-position pairs
    logits = sim.masked_fill(same_group & ~eye, float("-inf"))
    return (torch.logsumexp(logits, dim=2) - sim.diagonal(dim1=1, dim2=2)).mean()


def random_pixel_mask(like: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N, 1, H, W) mask with each pixel zeroed with probability ``ratio``."""
    n, _, h, w = like.shape
    return (torch.rand(n, 1, h, w, device=like.device) >= ratio).to(like.dtype)


class _Point(nn.Module):
    def __init__(self, s_ch: int, t_ch: int):
        super().__init__()
        self.align = nn.Conv2d(s_ch, t_ch, 1)
        self.projector = nn.Sequential(nn.Conv2d(t_ch, t_ch, 3, padding=1), nn.ReLU(inplace=True),
                                       nn.Conv2d(t_ch, t_ch, 3, padding=1))


@register
class AfDCD(DistillMethod):
    name = "afdcd"
    paper = ("Fan et al., Augmentation-free Dense Contrastive Knowledge Distillation for Efficient Semantic "
             "Segmentation (NeurIPS 2023)")
    params_type = AfDCDConfig

    @classmethod
    def required_targets(cls, points):
        return tuple(raw_name(p) for p in points)

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.heads = nn.ModuleDict({p: _Point(ctx.student_channels[p], int(ctx.target_shapes[raw_name(p)][0]))
                                    for p in self.points})

    def forward(self, out, targets, epoch=0, batch=None):
        p = self.params
        total, logs = 0.0, {}
        for point in self.points:
            t = as_float(targets[raw_name(point)])
            head = self.heads[point]
            s = match_size(head.align(out[point]), t)
            rec = head.projector(s * random_pixel_mask(s, p.mask_ratio))
            l_fd = (as_float(rec) - t).pow(2).mean()
            l_ctr = omni_contrastive_loss(rec, t, groups=p.groups, patch=p.patch, pool=p.pool, tau=p.tau)
            total = total + p.fd_weight * l_fd + p.ctr_weight * l_ctr
            logs[f"fd_{point}"], logs[f"ctr_{point}"] = float(l_fd.detach()), float(l_ctr.detach())
        return total, logs
