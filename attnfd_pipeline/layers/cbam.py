"""Convolutional Block Attention Module (CBAM) and its parameter-free variant.

References
----------
* S. Woo, J. Park, J.-Y. Lee, I. S. Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018.
* AttnFD (attention-guided feature distillation), eq. 2-5:

      F'  = M_C(F)  ⊗ F
      F'' = M_S(F') ⊗ F'

  M_C: global average- and max-pool over H×W → shared MLP (C → C/r → C, ReLU between, with bias)
       → summed → sigmoid, broadcast over H×W.
  M_S: channel-wise max and mean (2 maps) → 7×7 conv (padding 3, no bias) + BatchNorm
       → sigmoid, broadcast over channels.

Parameter check (paper Table 6, reduction 16): CBAM(512) + 2×CBAM(256) = 50,540 and
CBAM(320) + 2×CBAM(256) = 30,368.

``ParameterFreeCBAM`` is the "teacher mode" the AttnFD authors describe on their tracker:
channel gate = sigmoid(avg-pool + max-pool), spatial gate = sigmoid(channel-max + channel-mean).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from attnfd_pipeline.errors import UserError

__all__ = [
    "ATTENTION_KINDS",
    "CBAM",
    "ChannelGate",
    "ParameterFreeCBAM",
    "SpatialGate",
    "build_attention",
]

ATTENTION_KINDS = ("cbam", "parameter_free")


class ChannelGate(nn.Module):
    """Channel attention M_C(F) of shape (N, C, 1, 1)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if channels <= 0 or reduction <= 0:
            raise UserError(f"channels and reduction must be positive, got {channels}, {reduction}")
        hidden = max(1, channels // reduction)
        self.channels = channels
        self.reduction = reduction
        # Shared MLP as 1×1 convolutions (equivalent to Linear layers), with bias.
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        avg = x.mean(dim=(2, 3), keepdim=True)
        mx = x.amax(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))


class SpatialGate(nn.Module):
    """Spatial attention M_S(F) of shape (N, 1, H, W)."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)
        # eps / momentum as in the reference implementation's BasicConv (AttnFD cbam.py).
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled)))


class CBAM(nn.Module):
    """CBAM refinement: ``forward(F) -> F''`` (same shape as F)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.channels = channels
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate()

    def forward(self, x: Tensor) -> Tensor:
        x = self.channel_gate(x) * x
        return self.spatial_gate(x) * x

    def attention_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(mc, ms)``: the channel gate on F (N,C,1,1) and the spatial gate on F' (N,1,H,W)."""
        mc = self.channel_gate(x)
        ms = self.spatial_gate(mc * x)
        return mc, ms


class ParameterFreeCBAM(nn.Module):
    """CBAM without learnable parameters (AttnFD "teacher mode")."""

    @staticmethod
    def channel_gate(x: Tensor) -> Tensor:
        return torch.sigmoid(x.mean(dim=(2, 3), keepdim=True) + x.amax(dim=(2, 3), keepdim=True))

    @staticmethod
    def spatial_gate(x: Tensor) -> Tensor:
        return torch.sigmoid(x.amax(dim=1, keepdim=True) + x.mean(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        x = self.channel_gate(x) * x
        return self.spatial_gate(x) * x

    def attention_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mc = self.channel_gate(x)
        ms = self.spatial_gate(mc * x)
        return mc, ms


def build_attention(kind: str, channels: int, reduction: int = 16) -> nn.Module:
    """Build an attention module: ``"cbam"`` (learnable) or ``"parameter_free"``."""
    if kind == "cbam":
        return CBAM(channels, reduction)
    if kind == "parameter_free":
        return ParameterFreeCBAM()
    raise UserError(f"unknown attention kind {kind!r}; expected one of {list(ATTENTION_KINDS)}")
