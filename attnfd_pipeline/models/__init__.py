"""Segmentation model zoo: DeepLabV3+ (ResNet-18/34/50/101, MobileNetV2), DeepLabV3 (ResNet-18/101,
MobileNetV2) and PSPNet-ResNet18.

Every model's ``forward(x)`` returns a dict with "out" (input resolution), "logits" (classifier
output before the final upsample) and the raw distillation taps "B", "E", "D" (plus
"<P>_refined" for in-path attention points); ``model.taps`` maps tap names to :class:`TapSpec`.
"""

from .backbones import (
    DISTILLATION_POINTS,
    MobileNetV2Backbone,
    ResNetBackbone,
    SegmentationModel,
    TapSpec,
    build_backbone,
    load_torchvision_weights,
)
from .deeplabv3 import DeepLabV3, build_deeplabv3
from .deeplabv3plus import ASPP, DeepLabV3Plus, build_deeplabv3plus
from .pspnet import PSPNet, build_pspnet
from .registry import build_model, list_models, register_model

__all__ = [
    "ASPP",
    "DISTILLATION_POINTS",
    "DeepLabV3",
    "DeepLabV3Plus",
    "MobileNetV2Backbone",
    "PSPNet",
    "ResNetBackbone",
    "SegmentationModel",
    "TapSpec",
    "build_backbone",
    "build_deeplabv3",
    "build_deeplabv3plus",
    "build_model",
    "build_pspnet",
    "list_models",
    "load_torchvision_weights",
    "register_model",
]
