"""Reusable layers: CBAM attention (Woo et al. 2018) as used by AttnFD."""

from .cbam import (
    ATTENTION_KINDS,
    CBAM,
    ChannelGate,
    ParameterFreeCBAM,
    SpatialGate,
    build_attention,
)

__all__ = [
    "ATTENTION_KINDS",
    "CBAM",
    "ChannelGate",
    "ParameterFreeCBAM",
    "SpatialGate",
    "build_attention",
]
