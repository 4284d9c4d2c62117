"""CIRKD: cross-image relational distillation — the mini-batch pixel-to-pixel term and the memory-bank
pixel-to-pixel and pixel-to-region contrast terms, as its authors' code computes them.

C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "Cross-Image Relational Knowledge Distillation for
Semantic Segmentation", CVPR 2022, pp. 12319–12328.

At each point (``student.cirkd.points``; the release taps the feature after the ASPP head, the project's
``E``) on the student's feature F_S and the teacher's raw feature F_T (cached ``raw_<point>``):

1. *mini-batch pixel-to-pixel* (``cross_image_relation_loss``): both maps L2-normalised along channels —
   no connector: relations are within one network, so the channels need not match (``connector = true``
   adds the project's 1×1 conv + BN) —, optionally average-pooled 2×2 first (the release's option, off by
   default). For every ordered pair (i, j) of images the similarities S[x, y] = f_i(x) · f_j(y) / τ become a
   distribution over the pixels y of image j, and
       L_mb = mean over (i, j, x) of KL( softmax_y(S_T[i, j, x, :]) ‖ softmax_y(S_S[i, j, x, :]) );
2. *memory bank* (``PixelRegionMemory``): per class, a queue of teacher pixel embeddings and one of teacher
   region embeddings (the mean embedding of a class in one image), filled every step from the batch's
   teacher features and ground-truth labels (nearest-resized to the feature map) before the contrast —
   so it holds the teacher embeddings of the previous batches' images, as in the release. A projector
   (1×1 conv, BN, ReLU, 1×1 conv) maps the student to the teacher's channels; for every labelled pixel
   the similarities of its student and teacher embeddings to a random draw of the queue entries
   (``pixel_contrast_size`` / ``region_contrast_size`` spread over the classes), ÷ τ, are distilled with
       L_mem = T_c² · KL( softmax(t · Q / τ / T_c) ‖ softmax(s · Q / τ / T_c) ), averaged over the pixels;
   L = L_mb + pixel_memory_weight · L_pixel + region_memory_weight · L_region, summed over points.

The release pushes into class c's pixel queue the pixels at k random positions among the image's first n
positions (raster order; n = the class's pixel count): its draw indexes the whole map rather than the
class's pixels. The queues' class split is not used by the loss, so this biases the bank towards the top
rows rather than mislabelling it; ``pixel_sampling = "class"`` draws among the class's pixels instead.

The release's weights: the VOC script's 0.01 / 0.01 (the defaults here; its argparse default, used for
Cityscapes, CamVid, ADE20K and COCO-Stuff, is 0.1 / 0.1) and logit KD at weight 1 — a method of its own
here: ``student.method = "cirkd+kd"``. The queues start as random unit vectors (as released), are not
saved in checkpoints (a resumed run refills them) and, under torchrun, hold each process's own batches
(the release gathers them across processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from attnfd_pipeline.errors import UserError, check
from attnfd_pipeline.losses.base import (DistillMethod, MethodContext, MethodSection, as_float, connector, match_size,
                                        per_point, register)
from attnfd_pipeline.targets import POINTS, raw_name


@dataclass(frozen=True)
class CIRKDConfig(MethodSection):
    """CIRKD: the mini-batch pixel-to-pixel relations and the memory-bank pixel-to-pixel and pixel-to-region
    contrast on raw features, with the released code's defaults (attnfd_pipeline/losses/cirkd.py)."""

    points: tuple[str, ...] = ("E",)  # taps it distils (the release: after the ASPP head); () = student.points
    tau: float = 0.1  # temperature of the similarity softmax (the release's contrast temperature)
    pool: int = 1  # pooling factor before relating pixels (1 = none, as released; its option: 2)
    pool_mode: Literal["avg", "max"] = "avg"  # the release's option average-pools
    connector: bool = False  # a 1×1 conv + BN on the student first (the release relates each network's own map)
    pixel_memory_weight: float = 0.01  # memory pixel-to-pixel contrast (the release's VOC script; 0 = off)
    region_memory_weight: float = 0.01  # memory pixel-to-region contrast (the release's VOC script; 0 = off)
    pixel_memory_size: int = 20000  # queue entries per class
    region_memory_size: int = 2000
    pixel_contrast_size: int = 4096  # queue entries drawn per step, over all classes
    region_contrast_size: int = 1024
    pixel_update_freq: int = 16  # pixels of a class pushed per image and step
    # which pixels are pushed: "released" = random positions among the image's first n (the release's indexing),
    # "class" = random pixels of the class
    pixel_sampling: Literal["released", "class"] = "released"
    contrast_kd_temperature: float = 1.0  # of the memory terms' distillation

    def __post_init__(self):
        super().__post_init__()
        check(min(self.weight, self.pixel_memory_weight, self.region_memory_weight) >= 0, "student.cirkd.weight",
               "weight, pixel_memory_weight and region_memory_weight must be >= 0")
        check(self.tau > 0 and self.contrast_kd_temperature > 0, "student.cirkd.tau",
               "tau and contrast_kd_temperature must be > 0")
        check(self.pool >= 1, "student.cirkd.pool", "must be >= 1")
        for p in self.points:
            check(p in POINTS, "student.cirkd.points", f"unknown point {p!r}; known: {', '.join(POINTS)}")
        check(min(self.pixel_memory_size, self.region_memory_size, self.pixel_contrast_size,
                   self.region_contrast_size, self.pixel_update_freq) >= 1, "student.cirkd.pixel_memory_size",
               "memory and contrast sizes must be >= 1")
        check(self.pixel_update_freq <= self.pixel_memory_size, "student.cirkd.pixel_update_freq",
               "must be <= pixel_memory_size")

IGNORE = 255


def _pool(x: torch.Tensor, pool: int, mode: str) -> torch.Tensor:
    if pool <= 1:
        return x
    fn = F.avg_pool2d if mode == "avg" else F.max_pool2d
    return fn(x, pool, stride=pool, ceil_mode=True)


def cross_image_relation_loss(student: torch.Tensor, teacher: torch.Tensor, *, tau: float = 0.1, pool: int = 1,
                              pool_mode: str = "avg") -> torch.Tensor:
    """CIRKD's mini-batch pixel-to-pixel loss between (N, C_S, H, W) and (N, C_T, H, W) maps."""
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise UserError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}: batch or size differ")
    s, t = _pool(as_float(student), pool, pool_mode), _pool(as_float(teacher), pool, pool_mode)
    s = F.normalize(s.flatten(2), dim=1)  # (N, C, P)
    t = F.normalize(t.flatten(2), dim=1)
    sim_s = torch.einsum("icx,jcy->ijxy", s, s) / tau
    sim_t = torch.einsum("icx,jcy->ijxy", t, t) / tau
    log_ps, log_pt = F.log_softmax(sim_s, dim=3), F.log_softmax(sim_t, dim=3)
    return (log_pt.exp() * (log_pt - log_ps)).sum(3).mean()


def relation_kd(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(t / T) ‖ softmax(s / T)) summed over columns, averaged over rows (``batchmean``)."""
    log_ps = F.log_softmax(s_logits / temperature, dim=1)
    log_pt = F.log_softmax(t_logits / temperature, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(1).mean() * temperature ** 2


def memory_contrast_loss(s_emb: torch.Tensor, t_emb: torch.Tensor, bank: torch.Tensor, *, tau: float,
                         temperature: float) -> torch.Tensor:
    """Distil the anchors' similarities to the (K, C) bank rows: (A, C) unit student / teacher embeddings."""
    return relation_kd(s_emb @ bank.T / tau, (t_emb @ bank.T / tau).detach(), temperature)


class PixelRegionMemory(nn.Module):
    """The class-wise queues of teacher pixel and region embeddings (unit vectors), and the student projector."""

    def __init__(self, s_ch: int, t_ch: int, num_classes: int, p: CIRKDConfig):
        super().__init__()
        self.p, self.num_classes = p, num_classes
        self.project = nn.Sequential(nn.Conv2d(s_ch, t_ch, 1, bias=False), nn.BatchNorm2d(t_ch), nn.ReLU(True),
                                     nn.Conv2d(t_ch, t_ch, 1, bias=False))
        # random unit vectors until filled, as released; not saved (they would dwarf the checkpoint)
        for name, size in (("pixels", p.pixel_memory_size), ("regions", p.region_memory_size)):
            self.register_buffer(name, F.normalize(torch.randn(num_classes, size, t_ch), dim=2), persistent=False)
            self.register_buffer(f"{name}_ptr", torch.zeros(num_classes, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def enqueue(self, t_emb: torch.Tensor, labels: torch.Tensor) -> None:
        """Push each image's region means and up to ``pixel_update_freq`` random pixels per class."""
        for feat, lab in zip(t_emb.flatten(2), labels.flatten(1)):  # (C, P), (P,)
            for c in [int(v) for v in torch.unique(lab) if int(v) != IGNORE and int(v) < self.num_classes]:
                idx = (lab == c).nonzero().squeeze(1)
                ptr = int(self.regions_ptr[c])
                self.regions[c, ptr] = F.normalize(feat[:, idx].mean(1), dim=0)
                self.regions_ptr[c] = (ptr + 1) % self.p.region_memory_size
                k = min(idx.numel(), self.p.pixel_update_freq)
                pick = torch.randperm(idx.numel(), device=idx.device)[:k]
                # released: the draw indexes the image's positions, not the class's (see pixel_sampling)
                rows = F.normalize(feat[:, pick if self.p.pixel_sampling == "released" else idx[pick]].T, dim=1)
                ptr, size = int(self.pixels_ptr[c]), self.p.pixel_memory_size
                if ptr + k >= size:
                    self.pixels[c, size - k:] = rows
                    self.pixels_ptr[c] = 0
                else:
                    self.pixels[c, ptr:ptr + k] = rows
                    self.pixels_ptr[c] = (ptr + k) % size

    def sample(self, queue: torch.Tensor, contrast_size: int) -> torch.Tensor:
        """The same random queue slots of every class: (classes · n, C) rows, n = contrast_size // classes + 1."""
        n = contrast_size // self.num_classes + 1
        index = torch.randperm(queue.shape[1], device=queue.device)[:n]
        return queue[:, index].reshape(-1, queue.shape[2])

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor):
        """(pixel-to-pixel, pixel-to-region) memory losses; ``labels`` (N, H, W) at any resolution."""
        t = F.normalize(as_float(teacher), dim=1)
        s = F.normalize(match_size(self.project(student), t), dim=1)
        lab = F.interpolate(labels[:, None].float(), size=t.shape[-2:], mode="nearest")[:, 0].long()
        self.enqueue(t.detach(), lab)
        keep = (lab != IGNORE).flatten()
        if not keep.any():
            zero = 0.0 * s.pow(2).mean()
            return zero, zero
        rows_s = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1])[keep]
        rows_t = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])[keep]
        kw = {"tau": self.p.tau, "temperature": self.p.contrast_kd_temperature}
        pixel = memory_contrast_loss(rows_s, rows_t, self.sample(self.pixels, self.p.pixel_contrast_size), **kw)
        region = memory_contrast_loss(rows_s, rows_t, self.sample(self.regions, self.p.region_contrast_size), **kw)
        return pixel, region


@register
class CIRKD(DistillMethod):
    name = "cirkd"
    label = "CIRKD"
    uses = frozenset({"points"})
    paper = "Yang et al., Cross-Image Relational Knowledge Distillation for Semantic Segmentation (CVPR 2022)"
    params_type = CIRKDConfig

    @classmethod
    def required_targets(cls, points, params=None):
        p = params if params is not None else CIRKDConfig()
        return tuple(raw_name(q) for q in (p.points or points))

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        p = self.params
        self.points = tuple(p.points or ctx.points)
        self.connectors = per_point(ctx, self.points, connector, raw_name) if p.connector else None
        self.memory = None
        if p.pixel_memory_weight > 0 or p.region_memory_weight > 0:
            if ctx.num_classes < 1:
                raise ValueError("cirkd's memory bank needs the class count (MethodContext.num_classes)")
            self.memory = per_point(ctx, self.points, lambda s, t: PixelRegionMemory(s, t, ctx.num_classes, p),
                                    raw_name)

    def forward(self, out, targets, epoch=0, batch=None):
        p, per, logs = self.params, {}, {}
        for q in self.points:
            t, s = targets[raw_name(q)], out[q]
            s_mb = match_size(self.connectors[q](s), t) if self.connectors is not None else match_size(s, t)
            per[q] = cross_image_relation_loss(s_mb, t, tau=p.tau, pool=p.pool, pool_mode=p.pool_mode)
            logs[f"minibatch_{q}"] = float(per[q].detach())
            if self.memory is not None:
                if batch is None or "label" not in batch:
                    raise ValueError("cirkd's memory bank needs the batch's labels (batch['label'])")
                pixel, region = self.memory[q](s, t, batch["label"])
                per[q] = per[q] + p.pixel_memory_weight * pixel + p.region_memory_weight * region
                logs[f"pixel_memory_{q}"], logs[f"region_memory_{q}"] = float(pixel.detach()), float(region.detach())
        return sum(per.values()), logs
