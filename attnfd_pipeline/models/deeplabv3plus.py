"""DeepLabV3+ (Chen et al. 2018) with the structure of jfzhang95/pytorch-deeplab-xception.

backbone → ASPP (1×1 + three 3×3 atrous at rates 6/12/18 for OS16, 12/24/36 for OS8, + image
pooling; 5×256 → 1×1 → 256 + BN + ReLU [tap E] + Dropout 0.5) → decoder (low-level 1×1 → 48 +
BN + ReLU, concat with the bilinearly upsampled ASPP output, 3×3 conv 256 + BN + ReLU + Dropout 0.5,
3×3 conv 256 + BN + ReLU [tap D]) → Dropout 0.1 → 1×1 classifier ["logits", stride 4] →
bilinear upsample (align_corners=True) to the input size ["out"].

Distillation taps (docs/method.md "Distillation points"): "B" = backbone last-stage output before its
final ReLU, "E" = ASPP
projection output after BN + ReLU, "D" = decoder feature before the classifier's dropout.
With ``inpath_attention`` the CBAM-refined tap F'' replaces the raw tap as input to the next layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone, SegmentationModel, TapSpec, build_backbone, init_head_weights
from attnfd_pipeline.errors import UserError

__all__ = ["ASPP", "DeepLabV3Plus", "DeepLabV3PlusDecoder", "build_deeplabv3plus"]


def _conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    padding = 0 if kernel_size == 1 else dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling; ``forward`` returns the projection output (tap E).

    The 0.5 dropout that follows the projection is ``self.dropout`` and is applied by the caller
    (so that the tap, and in-path attention, sit before it).
    """

    def __init__(self, in_channels: int, output_stride: int = 16, out_channels: int = 256) -> None:
        super().__init__()
        if output_stride == 16:
            rates = (6, 12, 18)
        elif output_stride == 8:
            rates = (12, 24, 36)
        else:
            raise UserError(f"output_stride must be 16 or 8, got {output_stride!r}")
        self.rates = rates
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, 1)]
            + [_conv_bn_relu(in_channels, out_channels, 3, dilation=r) for r in rates]
        )
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.project = _conv_bn_relu(5 * out_channels, out_channels, 1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        feats = [branch(x) for branch in self.branches]
        pooled = self.image_pool(x)
        feats.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True))
        return self.project(torch.cat(feats, dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    """Decoder up to tap D (the classifier's 0.1 dropout and the classifier live in the model)."""

    def __init__(self, low_level_channels: int, in_channels: int = 256, channels: int = 256) -> None:
        super().__init__()
        self.reduce = _conv_bn_relu(low_level_channels, 48, 1)
        self.conv1 = _conv_bn_relu(in_channels + 48, channels, 3)
        self.dropout = nn.Dropout(0.5)
        self.conv2 = _conv_bn_relu(channels, channels, 3)

    def forward(self, x: Tensor, low_level: Tensor) -> Tensor:
        low = self.reduce(low_level)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True)
        x = self.dropout(self.conv1(torch.cat([x, low], dim=1)))
        return self.conv2(x)


class DeepLabV3Plus(SegmentationModel):
    """DeepLabV3+; ``forward(x)`` returns a dict with "out", "logits", "B", "E", "D"
    (and "<P>_refined" for every in-path attention point P)."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        inpath_attention: Iterable[str] | str | None = None,
        name: str = "deeplabv3plus",
    ) -> None:
        super().__init__(backbone, num_classes, name)
        self.aspp = ASPP(backbone.out_channels, backbone.output_stride)
        self.decoder = DeepLabV3PlusDecoder(backbone.low_level_channels)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(256, num_classes, 1)
        init_head_weights([self.aspp, self.decoder, self.classifier])
        self.taps = {
            "B": TapSpec(backbone.out_channels, backbone.output_stride),
            "E": TapSpec(256, backbone.output_stride),
            "D": TapSpec(256, backbone.low_level_stride),
        }
        self.logits_stride = backbone.low_level_stride
        self._init_attention(inpath_attention)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs: dict[str, Tensor] = {}
        low, b = self.backbone(x)
        b = self._tap("B", b, outputs)
        e = self._tap("E", self.aspp(self.backbone.activate(b)), outputs)
        d = self._tap("D", self.decoder(self.aspp.dropout(e), low), outputs)
        logits = self.classifier(self.dropout(d))
        outputs["logits"] = logits
        outputs["out"] = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return outputs


def build_deeplabv3plus(
    backbone: str,
    num_classes: int,
    *,
    output_stride: int = 16,
    backbone_weights: str | PathLike[str] | None = None,
    inpath_attention: Iterable[str] | str | None = None,
    name: str | None = None,
) -> DeepLabV3Plus:
    bb = build_backbone(backbone, output_stride, backbone_weights)
    return DeepLabV3Plus(
        bb, num_classes, inpath_attention=inpath_attention, name=name or f"deeplabv3plus_{backbone}"
    )
