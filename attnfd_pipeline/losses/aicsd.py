"""AICSD: adaptive inter-class similarity distillation.

A. M. Mansourian, R. Ahmadi, S. Kasaei, "AICSD: Adaptive Inter-Class Similarity Distillation for Semantic
Segmentation", Multimedia Tools and Applications (2025), arXiv:2308.04243 (seeds/aicsd-readme.txt).

For each sample and class c, the logits map z_c (H·W values) becomes an *intra-class distribution*
P_c = softmax(z_c / T) over the spatial positions. The *inter-class similarity* matrix holds the KL
divergence between every pair of classes:

    M[i, j] = KL(P_i ‖ P_j) = Σ_x P_i(x) (log P_i(x) − log P_j(x))          (C × C per sample)

    L_ICS = mean over samples and (i, j) of (M_T[i, j] − M_S[i, j])²
    L_KD  = pixel-wise KL(p_T ‖ p_S) of the class softmax at temperature T, × T²  (``kd_loss``)
    L     = λ_ics · L_ICS + λ_kd · L_KD

Adaptive loss weighting (ALW): the README says a hyper-parameter α "progressively increases with epoch
number" and scales the two distillation losses and the CE "to mitigate the negative effects of the
teacher". We read it, with the AttnFD paper's remark that AICSD decays the distillation weight late in
training, as

    total = a_e · CE + (1 − a_e) · L,   a_e = alw_start + (alw_end − alw_start) · e / epochs

(``ce_weight`` returns a_e; the method's loss carries the (1 − a_e)). The schedule's exact form is not
in the seeds: the linear ramp and its end points are our choice, configurable in ``student.aicsd``;
``adaptive = false`` gives the plain CE + L. The logits are the cached teacher ``"logits"`` (decoder
resolution); the student's are resized to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnfd_pipeline.config import AICSDConfig
from attnfd_pipeline.losses.base import DistillMethod, MethodContext, as_float, match_size, register
from attnfd_pipeline.targets import LOGITS
from attnfd_pipeline.losses.kd import kd_loss


def ics_matrix(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) logits → (N, C, C) matrices M[i, j] = KL(P_i ‖ P_j) of the spatial softmaxes."""
    z = as_float(logits).flatten(2) / temperature
    logp = F.log_softmax(z, dim=2)
    p = logp.exp()
    neg_entropy = (p * logp).sum(2)  # Σ_x P_i log P_i
    return neg_entropy[:, :, None] - torch.bmm(p, logp.transpose(1, 2))


def ics_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """MSE between the teacher's and the student's inter-class similarity matrices."""
    t = as_float(teacher_logits)
    s = match_size(as_float(student_logits), t)
    return (ics_matrix(t, temperature) - ics_matrix(s, temperature)).pow(2).mean()


def alw_weight(epoch: int, epochs: int, start: float, end: float) -> float:
    """CE weight a_e of the adaptive loss weighting (grows linearly from ``start`` towards ``end``)."""
    return start + (end - start) * min(max(epoch, 0), epochs) / max(epochs, 1)


@register
class AICSD(DistillMethod):
    name = "aicsd"
    paper = "Mansourian et al., AICSD: Adaptive Inter-Class Similarity Distillation for Semantic Segmentation"
    params_type = AICSDConfig

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.epochs = max(int(ctx.epochs), 1)

    @classmethod
    def required_targets(cls, points):
        return (LOGITS,)

    def ce_weight(self, epoch: int) -> float:
        p = self.params
        return alw_weight(epoch, self.epochs, p.alw_start, p.alw_end) if p.adaptive else 1.0

    def forward(self, out, targets, epoch=0, batch=None):
        p = self.params
        s, t = out[LOGITS], targets[LOGITS]
        l_ics = ics_loss(s, t, p.temperature)
        l_kd = kd_loss(s, t, p.temperature)
        scale = 1.0 - self.ce_weight(epoch) if p.adaptive else 1.0
        loss = scale * (p.ics_weight * l_ics + p.kd_weight * l_kd)
        return loss, {"ics": float(l_ics.detach()), "pixel_kl": float(l_kd.detach()), "ce_weight": 1.0 - scale}
