"""torchvision backbones adapted for dense prediction, plus shared model plumbing.

Backbones are torchvision's ``resnet18/34/50/101`` and ``mobilenet_v2`` built with
``weights=None`` (nothing is ever downloaded). ImageNet weights a user has on disk can be loaded
with ``weights=PATH`` (a torchvision-format state dict); they are loaded into the unmodified
torchvision network *before* any surgery, and all module names are kept, so the backbone's
state dict is torchvision's layout (minus the classifier) under the model's ``backbone.`` prefix.

Output stride (docs/method.md "Networks" and "torchvision backbones"):

* ResNet-50/101: ``replace_stride_with_dilation``; ResNet-101 additionally gets the multi-grid
  (1, 2, 4) × dilation of DeepLabV3+ (jfzhang95/pytorch-deeplab-xception) in layer4, and at
  OS8 layer3 uses dilation 2 in every block.
* ResNet-18/34 (BasicBlock cannot be dilated by torchvision): the strided first block of the
  stage is set to stride 1 (3×3 conv and downsample 1×1 conv) and every 3×3 conv of the stage is
  dilated, on the built modules.
* MobileNetV2: ``features[:18]`` (ends at the 320-channel block; the 1×1 → 1280 conv is dropped);
  blocks that would run below the output stride get stride 1 and dilated depthwise convs.

Every backbone's ``forward(x)`` returns ``(low_level, b)`` where ``low_level`` is the stride-4
feature for the DeepLabV3+ decoder and ``b`` is the distillation tap "B" (docs/method.md "Distillation
points"): the last
stage's output **before** its final ReLU for ResNets (the last residual block is run with a
forward that stops at ``out + identity``), the (linear) 320-channel block output for MobileNetV2.
The network continues from ``backbone.activate(b)`` (ReLU for ResNets, identity for MobileNetV2),
which equals torchvision's own stage output.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..layers.cbam import CBAM
from ..safe_load import state_mismatch
from attnfd_pipeline.errors import UserError

__all__ = [
    "BACKBONES",
    "DISTILLATION_POINTS",
    "Backbone",
    "MobileNetV2Backbone",
    "ResNetBackbone",
    "SegmentationModel",
    "TapSpec",
    "build_backbone",
    "init_head_weights",
    "load_torchvision_weights",
]

DISTILLATION_POINTS = ("B", "E", "D")
VALID_OUTPUT_STRIDES = (8, 16)


@dataclass(frozen=True)
class TapSpec:
    """Shape description of a feature tap: channel count and stride w.r.t. the input."""

    channels: int
    stride: int


# --------------------------------------------------------------------------------------------
# Weight loading
# --------------------------------------------------------------------------------------------
def load_torchvision_weights(
    net: nn.Module,
    path: str | PathLike[str],
    optional_prefixes: Sequence[str] = ("fc.", "classifier."),
    label: str | None = None,
) -> None:
    """Load a torchvision-format state dict from ``path`` into ``net`` (strictly).

    Keys starting with one of ``optional_prefixes`` (the ImageNet classifier, layers the
    segmentation backbone drops) may be present or absent; BatchNorm ``num_batches_tracked``
    buffers may be absent (old checkpoints). Anything else missing, unexpected or of the wrong
    shape raises ``ValueError`` naming the file and up to 5 offending keys.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {str(p)!r}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pragma: no cover - message depends on torch internals
        raise UserError(f"could not read backbone weights from {str(p)!r}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"backbone weights file {str(p)!r} is not a state dict of tensors")

    def optional(key: str) -> bool:
        return key.startswith(tuple(optional_prefixes)) or key.endswith("num_batches_tracked")

    own = net.state_dict()
    problems = state_mismatch(own, state, skip=optional)
    if problems:
        raise UserError(
            f"backbone weights file {str(p)!r} does not match torchvision {label or type(net).__name__}: "
            + "; ".join(problems)
        )
    # Optional keys (classifier, dropped layers) are not loaded: the segmentation model discards them.
    net.load_state_dict({k: v for k, v in state.items() if k in own and not optional(k)}, strict=False)


# --------------------------------------------------------------------------------------------
# Surgery helpers
# --------------------------------------------------------------------------------------------
def _dilate_conv(conv: nn.Conv2d, dilation: int) -> None:
    """Set the dilation of a 3×3 conv and keep 'same' padding."""
    k = conv.kernel_size[0]
    conv.dilation = (dilation, dilation)
    conv.padding = ((k - 1) // 2 * dilation,) * 2


def _convs3x3(module: nn.Module) -> Iterator[nn.Conv2d]:
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            yield m


def _unstride_basic_layer(layer: nn.Sequential, dilation: int) -> None:
    """Turn a strided BasicBlock stage into a stride-1 stage with dilated 3×3 convs."""
    first = layer[0]
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for conv in _convs3x3(layer):
        _dilate_conv(conv, dilation)


def block_forward_pre_relu(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision BasicBlock / Bottleneck forward without the final ReLU (returns out + identity)."""
    identity = x if block.downsample is None else block.downsample(x)
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    elif isinstance(block, BasicBlock):
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.bn2(block.conv2(out))
    else:  # pragma: no cover - only torchvision blocks are used
        raise TypeError(f"unsupported residual block {type(block).__name__}")
    return out + identity


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------
class Backbone(nn.Module):
    """Base: ``forward(x) -> (low_level, b_pre_activation)``; ``activate(b)`` feeds the head."""

    out_channels: int
    low_level_channels: int
    low_level_stride: int = 4
    output_stride: int

    def activate(self, b: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError


_RESNETS = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101,
}


class ResNetBackbone(Backbone):
    """torchvision ResNet trunk (conv1 … layer4, no avgpool/fc) at output stride 16 or 8."""

    def __init__(
        self,
        arch: str,
        output_stride: int = 16,
        weights: str | PathLike[str] | None = None,
        multi_grid: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if arch not in _RESNETS:
            raise UserError(f"unknown ResNet {arch!r}; expected one of {sorted(_RESNETS)}")
        if output_stride not in VALID_OUTPUT_STRIDES:
            raise UserError(f"output_stride must be one of {VALID_OUTPUT_STRIDES}, got {output_stride!r}")
        bottleneck = arch in ("resnet50", "resnet101")
        if bottleneck:
            rswd = [False, output_stride == 8, True]
            net = _RESNETS[arch](weights=None, replace_stride_with_dilation=rswd)
        else:
            net = _RESNETS[arch](weights=None)
        if weights is not None:
            load_torchvision_weights(net, weights, optional_prefixes=("fc.",), label=arch)

        # Dilation of layer3 / layer4 for the requested output stride.
        d3, d4 = (1, 2) if output_stride == 16 else (2, 4)
        if bottleneck:
            if multi_grid is not None:
                if len(multi_grid) != len(net.layer4):
                    raise UserError(f"multi_grid needs {len(net.layer4)} entries, got {multi_grid}")
                for block, mg in zip(net.layer4, multi_grid):
                    _dilate_conv(block.conv2, mg * d4)
                if d3 > 1:
                    for block in net.layer3:
                        _dilate_conv(block.conv2, d3)
        else:
            if multi_grid is not None:
                raise UserError("multi_grid is only supported for Bottleneck ResNets")
            if d3 > 1:
                _unstride_basic_layer(net.layer3, d3)
            _unstride_basic_layer(net.layer4, d4)

        self.arch = arch
        self.output_stride = output_stride
        self.multi_grid = multi_grid
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        expansion = 4 if bottleneck else 1
        self.out_channels = 512 * expansion
        self.low_level_channels = 64 * expansion
        self.low_level_stride = 4

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        x = self.layer3(self.layer2(low))
        n = len(self.layer4)
        for i in range(n - 1):
            x = self.layer4[i](x)
        b = block_forward_pre_relu(self.layer4[n - 1], x)
        return low, b

    def activate(self, b: Tensor) -> Tensor:
        return F.relu(b)


class MobileNetV2Backbone(Backbone):
    """torchvision MobileNetV2 ``features[:18]`` (up to the 320-channel block)."""

    def __init__(self, output_stride: int = 16, weights: str | PathLike[str] | None = None) -> None:
        super().__init__()
        if output_stride not in VALID_OUTPUT_STRIDES:
            raise UserError(f"output_stride must be one of {VALID_OUTPUT_STRIDES}, got {output_stride!r}")
        net = tvm.mobilenet_v2(weights=None)
        if weights is not None:
            load_torchvision_weights(
                net, weights, optional_prefixes=("classifier.", "features.18."), label="mobilenet_v2"
            )
        features = net.features[:18]  # keys "0".."17" kept: torchvision layout

        # features[0] is the stride-2 stem; blocks 1..17 are InvertedResidual.
        stride, dilation = 2, 1
        for block in list(features)[1:]:
            s = block.stride
            if s == 2 and stride * 2 > output_stride:
                if block.use_res_connect:  # pragma: no cover - never true for strided blocks
                    raise RuntimeError("cannot unstride a residual MobileNetV2 block")
                block.stride = 1
                dilation *= 2
                for conv in _convs3x3(block):
                    conv.stride = (1, 1)
            elif s == 2:
                stride *= 2
            if dilation > 1:
                for conv in _convs3x3(block):
                    _dilate_conv(conv, dilation)
        self.features = features
        self.output_stride = output_stride
        self.out_channels = 320
        self.low_level_channels = 24
        self.low_level_stride = 4
        self._low_level_end = 4  # features[:4] -> 24 ch, stride 4

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for i in range(self._low_level_end):
            x = self.features[i](x)
        low = x
        for i in range(self._low_level_end, len(self.features)):
            x = self.features[i](x)
        return low, x

    def activate(self, b: Tensor) -> Tensor:
        return b  # the 320-channel block is a linear bottleneck


def _resnet101(output_stride: int, weights):
    return ResNetBackbone("resnet101", output_stride, weights, multi_grid=(1, 2, 4))


BACKBONES = {
    "resnet18": lambda os_, w: ResNetBackbone("resnet18", os_, w),
    "resnet34": lambda os_, w: ResNetBackbone("resnet34", os_, w),
    "resnet50": lambda os_, w: ResNetBackbone("resnet50", os_, w),
    "resnet101": _resnet101,
    "mobilenetv2": lambda os_, w: MobileNetV2Backbone(os_, w),
}


def build_backbone(
    name: str, output_stride: int = 16, weights: str | PathLike[str] | None = None
) -> Backbone:
    """Build a backbone by name (``resnet18/34/50/101``, ``mobilenetv2``)."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name](output_stride, weights)


# --------------------------------------------------------------------------------------------
# Shared segmentation-model plumbing
# --------------------------------------------------------------------------------------------
class SegmentationModel(nn.Module):
    """Base class: taps, in-path CBAM attention and backbone/head parameter groups.

    Subclasses call ``super().__init__(backbone, num_classes, name)`` (which checks the class count and sets
    ``backbone``, ``num_classes``, ``name``, ``output_stride``), set ``self.taps`` (``dict[str, TapSpec]``) and
    call ``self._init_attention(...)`` once ``taps`` is known.
    """

    backbone: Backbone
    taps: dict[str, TapSpec]
    num_classes: int
    name: str
    attention: nn.ModuleDict | None

    def __init__(self, backbone: Backbone, num_classes: int, name: str) -> None:
        super().__init__()
        if num_classes <= 0:
            raise UserError(f"num_classes must be positive, got {num_classes!r}")
        self.name = name
        self.num_classes = num_classes
        self.output_stride = backbone.output_stride
        self.backbone = backbone

    def _init_attention(self, inpath_attention: Iterable[str] | str | None, reduction: int = 16) -> None:
        if inpath_attention is None:
            points: tuple[str, ...] = ()
        else:
            requested = [inpath_attention] if isinstance(inpath_attention, str) else list(inpath_attention)
            unknown = [p for p in requested if p not in self.taps]
            if unknown:
                raise UserError(f"unknown in-path attention point(s) {unknown}; expected a subset of {list(self.taps)}")
            points = tuple(p for p in self.taps if p in requested)  # canonical order, no duplicates
        self.inpath_points = points
        if points:
            self.attention = nn.ModuleDict({p: CBAM(self.taps[p].channels, reduction) for p in points})
        else:
            self.attention = None

    def _tap(self, point: str, x: Tensor, outputs: dict[str, Tensor]) -> Tensor:
        """Record raw tap ``point``; if in-path attention is on there, return (and record) F''."""
        outputs[point] = x
        if self.attention is not None and point in self.attention:
            x = self.attention[point](x)
            outputs[f"{point}_refined"] = x
        return x

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter not in the backbone (heads, classifier, in-path attention)."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        return (p for p in self.parameters() if id(p) not in backbone_ids)

    def num_parameters(self, include_attention: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if not include_attention and self.attention is not None:
            total -= sum(p.numel() for p in self.attention.parameters())
        return total


def init_head_weights(modules: Iterable[nn.Module]) -> None:
    """Head initialisation as in the reference DeepLabV3+ (kaiming-normal convs, BN 1/0)."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
