"""DeepLabV3 (Chen et al. 2017), no decoder, with the head of the Af-DCD / CIRKD segmentation code.

backbone [tap B, pre-ReLU] → activate → ASPP (1×1 + three 3×3 atrous at rates 12/24/36 for OS8,
6/12/18 for OS16, + image pooling; 5×C → 1×1 → C + BN + ReLU [tap E] + Dropout 0.5) → 3×3 conv C
+ BN + ReLU [tap D] → Dropout 0.1 → 1×1 classifier ["logits", output stride] → bilinear upsample
(align_corners=True) to the input size ["out"].

The head width C follows the released code: 256 on ResNet-101 (2048 input channels), 128 on ResNet-18
and MobileNetV2 (512 / 320). Taps (docs/method.md "DeepLabV3" and "Distillation points"): with no decoder,
"D" is the head's 3×3 conv output before the classifier's dropout — the feature the CIRKD code distils
("after the ASPP head") — so it sits where DeepLabV3+'s D sits (the last feature before the classifier),
at the output stride instead of stride 4. The released code's training-only auxiliary FCN head on
layer3 is not built (no method here reads it).
"""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike

import torch.nn.functional as F
from torch import Tensor, nn

from attnfd_pipeline.errors import UserError

from .backbones import Backbone, ResNetBackbone, SegmentationModel, TapSpec, build_backbone, init_head_weights
from .deeplabv3plus import ASPP

__all__ = ["DEEPLABV3_BACKBONES", "DeepLabV3", "build_deeplabv3"]

# backbone → head width C of the released DeepLabV3 (ASPP branches, projection and 3×3 head conv)
DEEPLABV3_BACKBONES = {"resnet101": 256, "resnet18": 128, "mobilenetv2": 128}


class DeepLabV3(SegmentationModel):
    """DeepLabV3; ``forward(x)`` returns a dict with "out", "logits", "B", "E", "D"
    (and "<P>_refined" for every in-path attention point P)."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        channels: int = 256,
        inpath_attention: Iterable[str] | str | None = None,
        name: str = "deeplabv3",
    ) -> None:
        super().__init__(backbone, num_classes, name)
        os_ = self.output_stride
        self.aspp = ASPP(backbone.out_channels, os_, out_channels=channels)
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_head_weights([self.aspp, self.head, self.classifier])
        self.taps = {
            "B": TapSpec(backbone.out_channels, os_),
            "E": TapSpec(channels, os_),
            "D": TapSpec(channels, os_),
        }
        self.logits_stride = os_
        self._init_attention(inpath_attention)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs: dict[str, Tensor] = {}
        _, b = self.backbone(x)
        b = self._tap("B", b, outputs)
        e = self._tap("E", self.aspp(self.backbone.activate(b)), outputs)
        d = self._tap("D", self.head(self.aspp.dropout(e)), outputs)
        logits = self.classifier(self.dropout(d))
        outputs["logits"] = logits
        outputs["out"] = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return outputs


def _backbone(name: str, output_stride: int, weights: str | PathLike[str] | None) -> Backbone:
    # The released DeepLabV3 ResNet-101 is dilated without multi-grid (layer3 at 2, layer4 at 4 after a
    # first block at 2 for OS8), which is torchvision's own replace_stride_with_dilation scheme.
    if name == "resnet101":
        return ResNetBackbone("resnet101", output_stride, weights)
    return build_backbone(name, output_stride, weights)


def build_deeplabv3(
    backbone: str,
    num_classes: int,
    *,
    output_stride: int = 8,
    backbone_weights: str | PathLike[str] | None = None,
    inpath_attention: Iterable[str] | str | None = None,
    name: str | None = None,
) -> DeepLabV3:
    """DeepLabV3 on ``backbone`` (one of :data:`DEEPLABV3_BACKBONES`), output stride 8 by default as in the
    Af-DCD / CIRKD tables."""
    if backbone not in DEEPLABV3_BACKBONES:
        raise UserError(f"DeepLabV3 backbone {backbone!r} unknown; expected one of {sorted(DEEPLABV3_BACKBONES)}")
    bb = _backbone(backbone, output_stride, backbone_weights)
    return DeepLabV3(
        bb, num_classes, channels=DEEPLABV3_BACKBONES[backbone], inpath_attention=inpath_attention,
        name=name or f"deeplabv3_{backbone}",
    )
