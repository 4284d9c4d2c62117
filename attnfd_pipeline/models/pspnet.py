"""PSPNet (Zhao et al. 2017) on a dilated torchvision ResNet, output stride 8 by default.

backbone [tap B, pre-ReLU] → ReLU → pyramid pooling (bins 1, 2, 3, 6; each adaptive avg-pool →
1×1 conv in → in/4 + BN + ReLU → bilinear upsample, align_corners=True) → the four branches
concatenated [tap E, ``in`` channels] → concat with the backbone feature (2×in) → 3×3 conv 128 + BN
+ ReLU [tap D] → Dropout 0.1 → 1×1 classifier ["logits"] → bilinear upsample to the input ["out"].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from os import PathLike

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone, SegmentationModel, TapSpec, build_backbone, init_head_weights
from attnfd_pipeline.errors import UserError

__all__ = ["PSPNet", "PyramidPooling", "build_pspnet"]


class PyramidPooling(nn.Module):
    """Returns the concatenation of the upsampled pyramid branches (tap E), not including the input."""

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        if in_channels % len(bins):
            raise UserError(f"in_channels {in_channels} not divisible by {len(bins)} bins")
        branch_ch = in_channels // len(bins)
        self.bins = tuple(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(in_channels, branch_ch, 1, bias=False),
                nn.BatchNorm2d(branch_ch),
                nn.ReLU(inplace=True),
            )
            for b in self.bins
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return torch.cat(
            [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=True) for stage in self.stages],
            dim=1,
        )


class PSPNet(SegmentationModel):
    """PSPNet; ``forward(x)`` returns a dict with "out", "logits", "B", "E", "D"
    (and "<P>_refined" for every in-path attention point P)."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        bins: Sequence[int] = (1, 2, 3, 6),
        channels: int = 128,
        inpath_attention: Iterable[str] | str | None = None,
        name: str = "pspnet",
    ) -> None:
        super().__init__(backbone, num_classes, name)
        in_ch = backbone.out_channels
        self.ppm = PyramidPooling(in_ch, bins)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(2 * in_ch, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_head_weights([self.ppm, self.bottleneck, self.classifier])
        os_ = backbone.output_stride
        self.taps = {"B": TapSpec(in_ch, os_), "E": TapSpec(in_ch, os_), "D": TapSpec(channels, os_)}
        self.logits_stride = os_
        self._init_attention(inpath_attention)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs: dict[str, Tensor] = {}
        _, b = self.backbone(x)
        f = self.backbone.activate(self._tap("B", b, outputs))
        e = self._tap("E", self.ppm(f), outputs)
        d = self._tap("D", self.bottleneck(torch.cat([f, e], dim=1)), outputs)
        logits = self.classifier(self.dropout(d))
        outputs["logits"] = logits
        outputs["out"] = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return outputs


def build_pspnet(
    backbone: str,
    num_classes: int,
    *,
    output_stride: int = 8,
    backbone_weights: str | PathLike[str] | None = None,
    inpath_attention: Iterable[str] | str | None = None,
    name: str | None = None,
) -> PSPNet:
    bb = build_backbone(backbone, output_stride, backbone_weights)
    return PSPNet(bb, num_classes, inpath_attention=inpath_attention, name=name or f"pspnet_{backbone}")
