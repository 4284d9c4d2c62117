"""AICSD: adaptive inter-class similarity distillation, as its paper describes it or as its code runs.

A. M. Mansourian, R. Ahmadi, S. Kasaei, "AICSD: Adaptive Inter-Class Similarity Distillation for Semantic
Segmentation", Multimedia Tools and Applications (2025), arXiv:2308.04243. ``student.aicsd.variant`` picks
one of two readings (docs/method.md "Rival methods" says where they part):

``"paper"`` (the default): for each sample and class c, the logits map z_c (H·W values) becomes an
*intra-class distribution* P_c = softmax(z_c / T) over the spatial positions, and

    M[i, j] = KL(P_i ‖ P_j) = Σ_x P_i(x) (log P_i(x) − log P_j(x))          (C × C per sample)
    L_ICS = mean over samples and (i, j) of (M_T[i, j] − M_S[i, j])²
    L_KD  = pixel-wise KL(p_T ‖ p_S) of the class softmax at temperature T, × T²  (``kd_loss``)
    L     = λ_ics · L_ICS + λ_kd · L_KD

with the adaptive weighting read as total = a_e · CE + (1 − a_e) · L, a_e = alw_start + (alw_end −
alw_start) · e / epochs (``ce_weight`` returns a_e; the method's loss carries the 1 − a_e). The schedule's
form is not in the paper: the linear ramp and its end points are configurable.

``"released"``: what the authors' training code computes. Its README's AICSD command
(``--pa_lambda 9500 --pi_lambda 10 --ALW``) names a flag the code does not define, and the adaptive lines are
commented out, so what runs is CE + 9500 · L_pa + 10 · L_pi:

- L_pa (``pairwise_similarity_loss``): the student's and teacher's ASPP features (cached ``raw_E`` here;
  the release takes the ASPP projection after its BN and before its ReLU, the project's tap E is after the
  ReLU), each max-pooled with a window of half the map (so a 33 × 33 map becomes 3 × 3), L2-normalised over
  channels; the squared difference of their position × position cosine matrices summed, ÷ P² ÷ batch;
- L_pi (``released_pixel_kl``): KL(p_T ‖ p_S) of the class softmax at T = 1, averaged over every
  B·C·H·W element (``KLDivLoss``'s ``mean``), no T²; on the logits upsampled to the input size
  (bilinear, align_corners), the release's output resolution;
- L_lo (``logit_similarity_loss``, weight ``lo_weight``, off as released): softmax over H only, the
  probabilities (not log-probabilities) fed to ``KLDivLoss(batchmean)`` for every class pair i ≤ j, one
  symmetric C × C matrix per batch, rows L2-normalised, mean squared difference ÷ batch size;
- the commented-out adaptive weighting (``released_alw``): α = epoch / 120 (``alw_epochs``) and
  loss = α · (CE + lo_weight · L_lo) + (1 − α) · pi_weight · L_pi (L_pa left out, as in those lines).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from attnfd_pipeline.errors import check
from attnfd_pipeline.losses.base import (DistillMethod, MethodContext, MethodSection, WHEN_SET, as_float, match_size,
                                        paired_logits, register)
from attnfd_pipeline.losses.kd import kd_loss
from attnfd_pipeline.targets import LOGITS, POINTS, raw_name


@dataclass(frozen=True)
class AICSDConfig(MethodSection):
    """AICSD: the paper's reading (inter-class similarity + pixel KL on logits, adaptive CE/distillation
    weighting) or the released code's terms (``variant``; attnfd_pipeline/losses/aicsd.py)."""

    # the keys below name a run only when set away from their defaults (``WHEN_SET``): runs of the paper variant
    # keep the names they had before the released variant existed
    variant: Literal["paper", "released"] = field(default="paper", metadata=WHEN_SET)
    temperature: float = 1.0  # of both the spatial (per-class) and the pixel-wise softmax (released: 1)
    # -- variant = "released": the authors' code (its README command without the undefined --ALW)
    pa_weight: float = field(default=9500.0, metadata=WHEN_SET)  # pairwise spatial similarity, ASPP feature (0 = off)
    pi_weight: float = field(default=10.0, metadata=WHEN_SET)  # pixel KL, mean over B·C·H·W, no T²
    lo_weight: float = field(default=0.0, metadata=WHEN_SET)  # logit inter-class similarity (the release's lo_loss)
    pa_point: str = field(default="E", metadata=WHEN_SET)  # tap / raw teacher target of the pairwise term (ASPP)
    pa_scale: float = field(default=0.5, metadata=WHEN_SET)  # max-pool window as a fraction of the map's sides
    # the commented-out weighting: α·(CE + lo) + (1 − α)·pi, α = epoch / alw_epochs
    released_alw: bool = field(default=False, metadata=WHEN_SET)
    alw_epochs: int = field(default=120, metadata=WHEN_SET)  # its denominator (the release's literal); 0 = train.epochs
    # -- variant = "paper"
    ics_weight: float = 1.0  # λ of the inter-class-similarity MSE
    kd_weight: float = 1.0  # λ of the pixel-wise KL
    adaptive: bool = True  # adaptive loss weighting: a·CE + (1 − a)·distillation, a growing over epochs
    alw_start: float = 0.5  # a at epoch 0 …
    alw_end: float = 1.0  # … growing linearly towards this value at the end of training

    def __post_init__(self):
        super().__post_init__()
        check(self.weight >= 0 and self.ics_weight >= 0 and self.kd_weight >= 0, "student.aicsd.weight",
               "weights must be >= 0")
        check(self.temperature > 0, "student.aicsd.temperature", "must be > 0")
        check(0 <= self.alw_start <= self.alw_end <= 1, "student.aicsd.alw_start",
               "need 0 <= alw_start <= alw_end <= 1")
        check(min(self.pa_weight, self.pi_weight, self.lo_weight) >= 0, "student.aicsd.pa_weight",
               "pa_weight, pi_weight and lo_weight must be >= 0")
        check(self.pa_point in POINTS, "student.aicsd.pa_point", f"unknown point {self.pa_point!r}; known: "
               f"{', '.join(POINTS)}")
        check(0 < self.pa_scale <= 1, "student.aicsd.pa_scale", "must be in (0, 1]")
        check(self.alw_epochs >= 0, "student.aicsd.alw_epochs", "must be >= 0 (0 = train.epochs)")

RELEASED, PAPER = "released", "paper"


def ics_matrix(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) logits → (N, C, C) matrices M[i, j] = KL(P_i ‖ P_j) of the spatial softmaxes."""
    z = as_float(logits).flatten(2) / temperature
    logp = F.log_softmax(z, dim=2)
    p = logp.exp()
    neg_entropy = (p * logp).sum(2)  # Σ_x P_i log P_i
    return neg_entropy[:, :, None] - torch.bmm(p, logp.transpose(1, 2))


def ics_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """MSE between the teacher's and the student's inter-class similarity matrices."""
    s, t = paired_logits(student_logits, teacher_logits)
    return (ics_matrix(t, temperature) - ics_matrix(s, temperature)).pow(2).mean()


def alw_weight(epoch: int, epochs: int, start: float, end: float) -> float:
    """CE weight a_e of the paper variant's adaptive loss weighting (linear from ``start`` towards ``end``)."""
    return start + (end - start) * min(max(epoch, 0), epochs) / max(epochs, 1)


# ---------------------------------------------------------------------------------------------
# the released variant's terms


def half_map_max_pool(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """Max-pool with window = stride = ``scale`` × the map's sides (at least 1), partial windows kept."""
    kh, kw = max(int(x.shape[-2] * scale), 1), max(int(x.shape[-1] * scale), 1)
    return F.max_pool2d(x, (kh, kw), stride=(kh, kw), ceil_mode=True)


def spatial_similarity(feat: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, P, P) cosine similarities of the positions' channel vectors; the norms are
    treated as constants (detached), as in the release."""
    norm = feat.pow(2).sum(1, keepdim=True).sqrt().detach() + 1e-8
    f = (feat / norm).flatten(2)
    return torch.einsum("bcm,bcn->bmn", f, f)


def pairwise_similarity_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                             scale: float = 0.5) -> torch.Tensor:
    """Σ (S_T − S_S)² / P² / N over the pooled maps' spatial similarity matrices (channels may differ)."""
    t = half_map_max_pool(as_float(teacher_feat), scale)
    s = half_map_max_pool(match_size(as_float(student_feat), as_float(teacher_feat)), scale)
    p = t.shape[-1] * t.shape[-2]
    return (spatial_similarity(t) - spatial_similarity(s)).pow(2).sum() / p ** 2 / t.shape[0]


def released_pixel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T ‖ p_S) of the class softmaxes averaged over all B·C·H·W elements (no T²)."""
    s, t = paired_logits(student_logits, teacher_logits)
    log_pt = F.log_softmax(t / temperature, dim=1)
    return (log_pt.exp() * (log_pt - F.log_softmax(s / temperature, dim=1))).mean()


def logit_similarity_matrix(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The release's (C, C) class-pair matrix: softmax over H; entry (i, j), i ≤ j, is
    Σ_{b,h,w} p_j (log p_j − p_i) / B (probabilities where KLDivLoss expects log-probabilities), mirrored."""
    b, c = logits.shape[:2]
    p = F.softmax(as_float(logits) / temperature, dim=2).transpose(0, 1).reshape(c, -1)  # (C, B·H·W)
    full = (p * p.log()).sum(1)[None, :] - p @ p.T  # full[i, j]: input class i, target class j
    upper = torch.triu(full)
    return (upper + torch.triu(full, 1).T) / b


def logit_similarity_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          temperature: float = 1.0) -> torch.Tensor:
    """Mean squared difference of the row-normalised class-pair matrices, ÷ batch size."""
    s, t = paired_logits(student_logits, teacher_logits)
    ms = F.normalize(logit_similarity_matrix(s, temperature), dim=1)
    mt = F.normalize(logit_similarity_matrix(t, temperature), dim=1)
    return (ms - mt).pow(2).mean() / t.shape[0]


def input_size_logits(out, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's output at input size and the teacher's cached logits upsampled the same way."""
    s = out["out"]
    t = F.interpolate(as_float(targets[LOGITS]), size=s.shape[-2:], mode="bilinear", align_corners=True)
    return s, t


@register
class AICSD(DistillMethod):
    name = "aicsd"
    label = "AICSD"
    paper = "Mansourian et al., AICSD: Adaptive Inter-Class Similarity Distillation for Semantic Segmentation"
    params_type = AICSDConfig

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.epochs = max(int(ctx.epochs), 1)

    @classmethod
    def required_targets(cls, points, params=None):
        p = params if params is not None else AICSDConfig()
        if p.variant == RELEASED and p.pa_weight > 0 and not p.released_alw:
            return (LOGITS, raw_name(p.pa_point))
        return (LOGITS,)

    def ce_weight(self, epoch: int) -> float:
        p = self.params
        if p.variant == RELEASED:
            return epoch / (p.alw_epochs or self.epochs) if p.released_alw else 1.0
        return alw_weight(epoch, self.epochs, p.alw_start, p.alw_end) if p.adaptive else 1.0

    def forward(self, out, targets, epoch=0, batch=None):
        if self.params.variant == RELEASED:
            return self.released_loss(out, targets, epoch)
        p = self.params
        s, t = out[LOGITS], targets[LOGITS]
        l_ics = ics_loss(s, t, p.temperature)
        l_kd = kd_loss(s, t, p.temperature)
        scale = 1.0 - self.ce_weight(epoch) if p.adaptive else 1.0
        loss = scale * (p.ics_weight * l_ics + p.kd_weight * l_kd)
        return loss, {"ics": float(l_ics.detach()), "pixel_kl": float(l_kd.detach()), "ce_weight": 1.0 - scale}

    def released_loss(self, out, targets, epoch):
        p = self.params
        s, t = input_size_logits(out, targets)
        l_pi = released_pixel_kl(s, t, p.temperature)
        zero = l_pi.new_zeros(())
        l_lo = logit_similarity_loss(s, t, p.temperature) if p.lo_weight > 0 else zero
        logs = {"pixel_kl": float(l_pi.detach()), "logit_similarity": float(l_lo.detach())}
        if p.released_alw:
            a = self.ce_weight(epoch)
            return a * p.lo_weight * l_lo + (1 - a) * p.pi_weight * l_pi, {**logs, "ce_weight": a}
        l_pa = zero
        if p.pa_weight > 0:
            l_pa = pairwise_similarity_loss(out[p.pa_point], targets[raw_name(p.pa_point)], p.pa_scale)
        logs["pairwise"] = float(l_pa.detach())
        return p.pa_weight * l_pa + p.pi_weight * l_pi + p.lo_weight * l_lo, logs
