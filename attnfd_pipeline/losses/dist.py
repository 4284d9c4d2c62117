"""DIST: knowledge distillation from a stronger teacher through Pearson relations of class distributions.

T. Huang, S. You, F. Wang, C. Qian, C. Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022
(arXiv:2205.10536); "DistKD" in the AttnFD paper's tables. The segmentation code its authors released treats
every pixel of the batch as one sample of a classification problem:

- the student's and the teacher's logits become per-pixel class distributions p = softmax(z / T) over the
  C classes, one row per pixel of the batch (N·H·W rows);
- *inter-class relation*: for each pixel, the Pearson correlation ρ between the student's and the teacher's
  class distribution (across the C classes); L_inter = 1 − mean over pixels of ρ;
- *intra-class relation*: for each class, the Pearson correlation between the student's and the teacher's
  probabilities of that class across all N·H·W pixels of the batch; L_intra = 1 − mean over classes of ρ;
- L = T² · (β · L_inter + γ · L_intra).

Pearson ρ(u, v) = ⟨u − ū, v − v̄⟩ / (‖u − ū‖ ‖v − v̄‖ + 1e-8), the release's small constant in the denominator.
The released segmentation recipe uses β = γ = 1 and no temperature (T = 1, so T² = 1), at weight 1 beside
the CE; the paper's classification recipe softens with T (ImageNet: T = 1; CIFAR: T = 4) and scales by T²,
which ``temperature`` offers. The release compares the logits at the model's output resolution (stride 8,
its DeepLabV3); here the cached teacher ``"logits"`` (decoder resolution) and the student's resized to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnfd_pipeline.errors import check
from attnfd_pipeline.losses.base import DistillMethod, MethodSection, paired_logits, register
from attnfd_pipeline.targets import LOGITS


@dataclass(frozen=True)
class DISTConfig(MethodSection):
    """DIST ("DistKD"): inter- and intra-class Pearson relations of per-pixel class distributions (logits)."""

    beta: float = 1.0  # weight of the inter-class relation (per pixel, across classes)
    gamma: float = 1.0  # weight of the intra-class relation (per class, across the batch's pixels)
    temperature: float = 1.0  # softmax temperature T (the released segmentation recipe: 1); the loss is × T²

    def __post_init__(self):
        super().__post_init__()
        check(self.weight >= 0 and self.beta >= 0 and self.gamma >= 0, "student.dist.weight",
               "weight, beta and gamma must be >= 0")
        check(self.temperature > 0, "student.dist.temperature", "must be > 0")

EPS = 1e-8  # added to the product of norms in the Pearson correlation, as in the release


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` ((R, K) → (R,))."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def pixel_class_rows(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, C, H, W) logits → (N·H·W, C) class distributions softmax(z / T)."""
    c = logits.shape[1]
    return (logits / temperature).movedim(1, -1).reshape(-1, c).softmax(dim=1)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    """T² · (β · inter-class + γ · intra-class) Pearson-relation loss; (N, C, H, W) inputs."""
    s, t = paired_logits(student_logits, teacher_logits)
    ps, pt = pixel_class_rows(s, temperature), pixel_class_rows(t, temperature)
    inter = 1 - pearson_rows(ps, pt).mean()
    intra = 1 - pearson_rows(ps.T, pt.T).mean()
    return temperature ** 2 * (beta * inter + gamma * intra)


@register
class DIST(DistillMethod):
    name = "dist"
    label = "DIST"
    paper = "Huang et al., Knowledge Distillation from A Stronger Teacher (NeurIPS 2022)"
    params_type = DISTConfig

    @classmethod
    def required_targets(cls, points, params=None):
        return (LOGITS,)

    def forward(self, out, targets, epoch=0, batch=None):
        p = self.params
        return dist_loss(out[LOGITS], targets[LOGITS], beta=p.beta, gamma=p.gamma, temperature=p.temperature), {}
