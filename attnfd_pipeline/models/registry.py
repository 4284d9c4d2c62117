"""Model registry: ``build_model(name, num_classes, ...)`` in the spirit of torchvision's ``get_model``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from os import PathLike

from torch import nn

from .deeplabv3 import DEEPLABV3_BACKBONES, build_deeplabv3
from .deeplabv3plus import build_deeplabv3plus
from .pspnet import build_pspnet
from attnfd_pipeline.errors import UserError

__all__ = ["build_model", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``fn(num_classes, *, output_stride, backbone_weights, inpath_attention)``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise UserError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Sorted names accepted by :func:`build_model`."""
    return sorted(_MODELS)


def build_model(
    name: str,
    num_classes: int,
    *,
    output_stride: int | None = None,
    backbone_weights: str | PathLike[str] | None = None,
    inpath_attention: Iterable[str] | str | None = None,
) -> nn.Module:
    """Build a registered segmentation model.

    ``output_stride`` None means the architecture's default: 16 for DeepLabV3+, 8 for DeepLabV3 and PSPNet.
    ``backbone_weights``: path to a torchvision-format ImageNet state dict (never downloaded).
    ``inpath_attention``: distillation points (subset of ``model.taps``) that get a CBAM in the
    forward path.
    """
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    kwargs = {"backbone_weights": backbone_weights, "inpath_attention": inpath_attention}
    if output_stride is not None:
        kwargs["output_stride"] = output_stride
    return _MODELS[name](num_classes, **kwargs)


def _register_deeplabv3plus(backbone: str) -> None:
    name = f"deeplabv3plus_{backbone}"

    @register_model(name)
    def _build(num_classes: int, **kwargs) -> nn.Module:
        return build_deeplabv3plus(backbone, num_classes, name=name, **kwargs)


for _bb in ("resnet101", "resnet50", "resnet34", "resnet18", "mobilenetv2"):
    _register_deeplabv3plus(_bb)


def _register_deeplabv3(backbone: str) -> None:
    name = f"deeplabv3_{backbone}"

    @register_model(name)
    def _build(num_classes: int, **kwargs) -> nn.Module:
        return build_deeplabv3(backbone, num_classes, name=name, **kwargs)


for _bb in DEEPLABV3_BACKBONES:
    _register_deeplabv3(_bb)


@register_model("pspnet_resnet18")
def _pspnet_resnet18(num_classes: int, **kwargs) -> nn.Module:
    return build_pspnet("resnet18", num_classes, name="pspnet_resnet18", **kwargs)
