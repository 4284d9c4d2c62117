"""Af-DCD: augmentation-free dense contrastive distillation, as its authors' training code runs it.

J. Fan, C. Li, X. Liu, M. Song, A. Yao, "Augmentation-free Dense Contrastive Knowledge Distillation for
Efficient Semantic Segmentation", NeurIPS 2023 (seeds/afdcd-readme.txt).

At each point, on the teacher feature F_T (cached ``raw_<point>``) and the student's F_S:

1. *masked feature mimicking*: the student feature is aligned to the teacher's channels (1×1 conv, only
   when the channels differ), a random ``mask_ratio`` of its pixels is zeroed (or the centre third of the
   map: ``mask = "centre"``), and a projector (3×3 conv, ReLU, 3×3 conv; or the release's "enhanced" one:
   two conv-ReLU blocks, each read out by its own 3×3 conv, averaged) reconstructs the teacher feature
   F̂ = proj(mask ⊙ align(F_S)); L_fd = Σ (F̂ − F_T)² / batch.
2. *omni-contrasting* over channel and spatial partitions: both maps are max-pooled by ``pool`` (CamVid:
   cropped to their top-left 44 × 44 instead), cut into patches of ``patch × patch`` positions, and each
   position's channel vector into ``groups`` (M) equal channel groups. Within one patch every (position,
   group) vector of F̂ is an anchor; its positive is the teacher vector at the same (position, group); its
   negatives are the teacher vectors of every *other* channel group (at any position of the patch). With
   similarity −‖a − b‖₁ and temperature τ, the cross-entropy of the positive, summed over anchors,
   ÷ (H · W of the pooled map) ÷ batch = the mean over anchors × M.

The release (``recipe = "released"``, the default) distils one point, the backbone's last stage after its
ReLU (the project's tap ``B`` is before it: both maps pass a ReLU here), adds logit KD (``kd_loss``) and clips
the gradient norm of the method's modules at 15, with its per-dataset weights (``student.afdcd.dataset``;
``RELEASED_WEIGHTS``). Its Cityscapes script asks for the centre mask and the enhanced projector with flags
the parser does not define (``--rand_mask`` / ``--enhance_projector`` against ``--rand-mask`` …); both are
options here. ``recipe = "mean"`` is the project's earlier form: means instead of the sums (so weights 1 and
0.01 keep the reference's balance in mean terms), ``student.points`` un-ReLU'd, no KD, no clipping.

Kept from the project's form in both recipes: for maps too small for ``pool × patch`` the pooling shrinks
until a patch fits and patches are cut to the map (the release needs ≥ 16 × 16 after pooling, divisible by
the patch); channel groups fall back to gcd(C, groups); the teacher features are the cached eval-mode ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from attnfd_pipeline.errors import UserError, check
from attnfd_pipeline.losses.base import (DistillMethod, MethodContext, MethodSection, as_float, match_size, per_point,
                                        register)
from attnfd_pipeline.losses.kd import kd_loss
from attnfd_pipeline.targets import LOGITS, POINTS, raw_name

@dataclass(frozen=True)
class AfDCDConfig(MethodSection):
    """Af-DCD: masked feature mimicking + omni-contrastive loss on raw features; ``recipe = "released"`` is
    the authors' training code, ``"mean"`` the project's mean form (attnfd_pipeline/losses/afdcd.py)."""

    recipe: Literal["released", "mean"] = "released"
    dataset: Literal["voc", "cityscapes", "camvid", "ade20k", "coco"] = "voc"  # whose released weights
    points: tuple[str, ...] = ()  # () = the recipe's: released B (after its ReLU), mean student.points
    fd_weight: float | None = None  # masked feature mimicking; unset = the recipe's (released: per dataset)
    ctr_weight: float | None = None  # contrastive term; unset = the recipe's (released: per dataset)
    kd_weight: float | None = None  # logit KD; unset = the recipe's (released: 1, ADE20K / COCO 0.5; mean: 0)
    kd_temperature: float = 1.0
    grad_clip: float | None = None  # max gradient norm of the method's modules; unset = released 15, mean none
    mask_ratio: float = 0.75  # fraction of student pixels zeroed before the projector
    mask: Literal["random", "centre"] = "random"  # or the release's centre-third mask
    projector: Literal["plain", "enhanced"] = "plain"  # or the release's enhanced projector
    tau: float = 0.07  # contrastive temperature
    groups: int = 16  # channel partitions M
    patch: int = 4  # spatial partition: patch side (positions contrasted together)
    pool: int = 4  # max-pool factor before contrasting (reduced when the map is too small)

    def __post_init__(self):
        super().__post_init__()
        weights = [self.weight, *(w for w in (self.fd_weight, self.ctr_weight, self.kd_weight) if w is not None)]
        check(min(weights) >= 0, "student.afdcd.weight", "weights must be >= 0")
        check(self.grad_clip is None or self.grad_clip >= 0, "student.afdcd.grad_clip", "must be >= 0 (0 = none)")
        check(self.kd_temperature > 0, "student.afdcd.kd_temperature", "must be > 0")
        for p in self.points:
            check(p in POINTS, "student.afdcd.points", f"unknown point {p!r}; known: {', '.join(POINTS)}")
        check(0 <= self.mask_ratio < 1, "student.afdcd.mask_ratio", "must be in [0, 1)")
        check(self.tau > 0, "student.afdcd.tau", "must be > 0")
        check(self.groups >= 1 and self.patch >= 1 and self.pool >= 1, "student.afdcd.groups",
               "groups, patch and pool must be >= 1")

# the release's training scripts (DeepLabV3-R101 → R18): mimicking, contrastive and KD weights, and the
# contrast crop used instead of pooling (0 = pool)
RELEASED_WEIGHTS = {"voc": (1e-6, 5e-3, 1.0, 0), "cityscapes": (2e-6, 5e-3, 1.0, 0), "camvid": (8e-6, 0.01, 1.0, 44),
                    "ade20k": (1e-6, 0.04, 0.5, 0), "coco": (5e-6, 5e-3, 0.5, 0)}
MEAN_WEIGHTS = (1.0, 0.01, 0.0, 0)
RELEASED_POINTS = ("B",)
RELEASED_CLIP = 15.0


@dataclass(frozen=True)
class Recipe:
    """The settings a config section resolves to (its unset values taken from the recipe)."""

    fd: float
    ctr: float
    kd: float
    crop: int
    clip: float
    relu: bool
    sums: bool


def recipe_of(p: AfDCDConfig) -> Recipe:
    released = p.recipe == "released"
    fd, ctr, kd, crop = RELEASED_WEIGHTS[p.dataset] if released else MEAN_WEIGHTS
    pick = lambda given, default: default if given is None else given  # noqa: E731 - three uses below
    return Recipe(fd=pick(p.fd_weight, fd), ctr=pick(p.ctr_weight, ctr), kd=pick(p.kd_weight, kd), crop=crop,
                  clip=pick(p.grad_clip, RELEASED_CLIP if released else 0.0), relu=released, sums=released)


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
                          pool: int = 4, tau: float = 0.07, crop: int = 0, sums: bool = False) -> torch.Tensor:
    """Af-DCD's omni-contrastive loss between equal-shape (N, C, H, W) maps: the mean over anchors, or
    (``sums``) the release's sum over anchors ÷ (H · W of the pooled map) ÷ batch. ``crop`` > 0: the top-left
    ``crop × crop`` of the maps instead of pooling."""
    if student.shape != teacher.shape:
        raise UserError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    s, t = as_float(student), as_float(teacher)
    if crop > 0:
        s, t = s[:, :, :crop, :crop], t[:, :, :crop, :crop]
        pool = 1
    n, c, h, w = s.shape
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
    per_anchor = torch.logsumexp(logits, dim=2) - sim.diagonal(dim1=1, dim2=2)
    return per_anchor.sum() / (n * s.shape[2] * s.shape[3]) if sums else per_anchor.mean()


def random_pixel_mask(like: torch.Tensor, ratio: float, released: bool = False) -> torch.Tensor:
    """(N, 1, H, W) mask with each pixel zeroed with probability ``ratio`` (``released``: the release's test
    on the same uniform draw, zero where u > 1 − ratio)."""
    n, _, h, w = like.shape
    u = torch.rand(n, 1, h, w, device=like.device)
    keep = u <= 1 - ratio if released else u >= ratio
    return keep.to(like.dtype)


def centre_mask(like: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) ones with the centre third (rows and columns H//3 … 2H//3) zeroed."""
    n, _, h, w = like.shape
    mask = torch.ones(n, 1, h, w, device=like.device, dtype=like.dtype)
    mask[:, :, h // 3:2 * h // 3, w // 3:2 * w // 3] = 0
    return mask


class EnhancedProjector(nn.Module):
    """The release's enhanced projector: two 3×3 conv + ReLU blocks, each read out by a 3×3 conv, averaged."""

    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(inplace=True))
        self.block_2 = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(inplace=True))
        self.readout_1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.readout_2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        x1 = self.block_1(x)
        return (self.readout_1(x1) + self.readout_2(self.block_2(x1))) / 2.0


class _Point(nn.Module):
    def __init__(self, s_ch: int, t_ch: int, projector: str = "plain", always_align: bool = True):
        super().__init__()
        self.align = nn.Conv2d(s_ch, t_ch, 1) if always_align or s_ch != t_ch else nn.Identity()
        self.projector = EnhancedProjector(t_ch) if projector == "enhanced" else nn.Sequential(
            nn.Conv2d(t_ch, t_ch, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(t_ch, t_ch, 3, padding=1))


@register
class AfDCD(DistillMethod):
    name = "afdcd"
    label = "Af-DCD"
    uses = frozenset({"points"})
    paper = ("Fan et al., Augmentation-free Dense Contrastive Knowledge Distillation for Efficient Semantic "
             "Segmentation (NeurIPS 2023)")
    params_type = AfDCDConfig

    @classmethod
    def points_of(cls, points, p: AfDCDConfig) -> tuple[str, ...]:
        return tuple(p.points or (RELEASED_POINTS if p.recipe == "released" else points))

    @classmethod
    def required_targets(cls, points, params=None):
        p = params if params is not None else AfDCDConfig()
        raw = tuple(raw_name(q) for q in cls.points_of(points, p))
        return raw + ((LOGITS,) if recipe_of(p).kd > 0 else ())

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        p = self.params
        self.recipe = recipe_of(p)
        self.points = self.points_of(ctx.points, p)
        build = lambda s, t: _Point(s, t, p.projector, always_align=p.recipe == "mean")  # noqa: E731
        self.heads = per_point(ctx, self.points, build, raw_name)

    def grad_clip(self) -> float:
        """Max gradient norm of this method's modules (0 = none): the release clips them at 15."""
        return self.recipe.clip

    def _mask(self, s: torch.Tensor) -> torch.Tensor:
        p = self.params
        return centre_mask(s) if p.mask == "centre" else random_pixel_mask(s, p.mask_ratio, p.recipe == "released")

    def forward(self, out, targets, epoch=0, batch=None):
        p, r = self.params, self.recipe
        total, logs = 0.0, {}
        for point in self.points:
            t, s = as_float(targets[raw_name(point)]), out[point]
            if r.relu:
                t, s = F.relu(t), F.relu(s)
            head = self.heads[point]
            s = match_size(head.align(s), t)
            rec = as_float(head.projector(s * self._mask(s)))
            l_fd = (rec - t).pow(2).sum() / t.shape[0] if r.sums else (rec - t).pow(2).mean()
            l_ctr = omni_contrastive_loss(rec, t, groups=p.groups, patch=p.patch, pool=p.pool, tau=p.tau,
                                          crop=r.crop, sums=r.sums)
            total = total + r.fd * l_fd + r.ctr * l_ctr
            logs[f"fd_{point}"], logs[f"ctr_{point}"] = float(l_fd.detach()), float(l_ctr.detach())
        if r.kd > 0:
            l_kd = kd_loss(out[LOGITS], targets[LOGITS], p.kd_temperature)
            total = total + r.kd * l_kd
            logs["kd"] = float(l_kd.detach())
        return total, logs
