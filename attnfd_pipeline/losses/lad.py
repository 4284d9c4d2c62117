"""LAD: distillation of raw features with a normalised MSE — AttnFD without CBAM.

T. Liu, C. Chen, X. Yang, W. Tan, "Rethinking Knowledge Distillation with Raw Features for Semantic Segmentation"
(WACV 2024, pp. 1155–1164; "LAD" in AttnFD's Table 1, the paper's closest rival).

    L_LAD = Σ_points L_norm( connector(F_S), F_T )

with F_S, F_T the raw (un-refined) student and teacher features at each point (cached targets
``raw_B``, ``raw_E``, ``raw_D``), the same connector as AttnFD (1×1 conv + BN, bilinear resize) and the
same normalised squared distance ``attnfd_loss`` with ``student.norm`` — so that AttnFD vs LAD isolates
the CBAM refinement. Simplification: LAD's own recipe details (its projector design and loss scaling)
are not reproduced; this is the "raw features + MSE" ablation the AttnFD paper compares against.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnfd_pipeline.losses.attnfd import attnfd_loss
from attnfd_pipeline.losses.base import (DistillMethod, MethodContext, MethodSection, connector, match_size, per_point,
                                        register)
from attnfd_pipeline.targets import raw_name


@dataclass(frozen=True)
class LADConfig(MethodSection):
    """LAD's section: its weights only; its normalisation is ``student.norm``, its points ``student.points``."""


@register
class LAD(DistillMethod):
    name = "lad"
    label = "LAD"
    uses = frozenset({"points", "norm"})
    params_type = LADConfig
    paper = "T. Liu et al., Rethinking Knowledge Distillation with Raw Features for Semantic Segmentation (WACV 2024)"

    @classmethod
    def required_targets(cls, points, params=None):
        return tuple(raw_name(p) for p in points)

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.norm = ctx.norm
        self.connectors = per_point(ctx, self.points, connector, raw_name)

    def forward(self, out, targets, epoch=0, batch=None):
        per = {}
        for p in self.points:
            t = targets[raw_name(p)]
            per[p] = attnfd_loss(match_size(self.connectors[p](out[p]), t), t, self.norm)
        return sum(per.values()), {f"L_{p}": float(v.detach()) for p, v in per.items()}
