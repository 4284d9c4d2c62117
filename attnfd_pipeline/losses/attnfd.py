"""AttnFD distillation loss (paper eq. 6–7, SPEC §5).

    L_Attn = mean over samples of ‖ F''_S / ‖F''_S‖ − F''_T / ‖F''_T‖ ‖²

``norm`` selects what ‖·‖ is taken over:
- ``"batch"`` (default; the authors' code, which produced the reported numbers — AttnFD issue #5):
  each tensor is divided by the L2 norm of the whole batch tensor (N, C, H, W together); the squared
  difference is summed and divided by the batch size. α = 2 / 15 are calibrated for this.
- ``"sample"``: each sample divided by its own L2 norm over C×H×W; summed, divided by the batch size.
- ``"channel"`` (the paper's text): each pixel's C-vector divided by its L2 norm; the squared
  difference is summed over channels and averaged over pixels and samples.
Each is invariant to rescaling its unit (whole batch, one sample, one pixel) of either input.
"""

from __future__ import annotations

import torch

NORMS = ("batch", "sample", "channel")
EPS = 1e-12


def _unit(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x / x.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp_min(EPS)


def attnfd_loss(student: torch.Tensor, teacher: torch.Tensor, norm: str = "batch") -> torch.Tensor:
    """Loss between refined maps of equal shape (N, C, H, W); computed in float32."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    s, t = student.float(), teacher.float()
    n = s.shape[0]
    if norm == "batch":
        return (_unit(s, (0, 1, 2, 3)) - _unit(t, (0, 1, 2, 3))).pow(2).sum() / n
    if norm == "sample":
        return (_unit(s, (1, 2, 3)) - _unit(t, (1, 2, 3))).pow(2).sum() / n
    if norm == "channel":
        return (_unit(s, (1,)) - _unit(t, (1,))).pow(2).sum(1).mean()
    raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
