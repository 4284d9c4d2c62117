"""Pixel-wise logit distillation (KD).

G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning
Workshop (arXiv:1503.02531); applied per pixel as in the segmentation KD baselines (e.g. CIRKD, AttnFD
Table 1 "S + KD"):

    L_KD = T² · mean over pixels (n, h, w) of KL( softmax(z_T / T) ‖ softmax(z_S / T) ) over classes

The teacher logits are the cached ``"logits"`` target (decoder resolution, stride 4 for DeepLabV3+);
the student's ``"logits"`` are resized bilinearly to them when the resolutions differ. All pixels count
(the teacher's soft labels exist where the ground truth says "ignore" too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnfd_pipeline.errors import check
from attnfd_pipeline.losses.base import DistillMethod, MethodSection, paired_logits, register
from attnfd_pipeline.targets import LOGITS


@dataclass(frozen=True)
class KDConfig(MethodSection):
    """Hinton KD on pixel logits; needs ``cache.extra = ["logits"]``."""

    temperature: float = 1.0  # softmax temperature T; the loss is multiplied by T²

    def __post_init__(self):
        super().__post_init__()
        check(self.temperature > 0, "student.kd.temperature", "must be > 0")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · pixel-mean KL(p_T ‖ p_S) of temperature-softened class distributions; (N, C, H, W) inputs."""
    s, t = paired_logits(student_logits, teacher_logits)
    log_ps = F.log_softmax(s / temperature, dim=1)
    log_pt = F.log_softmax(t / temperature, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    return kl.mean() * temperature ** 2


@register
class KD(DistillMethod):
    name = "kd"
    label = "KD"
    paper = "Hinton et al., Distilling the Knowledge in a Neural Network (2015)"
    params_type = KDConfig

    @classmethod
    def required_targets(cls, points, params=None):
        return (LOGITS,)

    def forward(self, out, targets, epoch=0, batch=None):
        return kd_loss(out[LOGITS], targets[LOGITS], self.params.temperature), {}
