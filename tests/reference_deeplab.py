"""A DeepLabV3+ with the reference code's module names and forward, written for the import tests from
the published facts (pytorch-deeplab-xception lineage as the AttnFD / AICSD code uses it): ReLU at the
start of each residual block and none at its end, multi-grid (1, 2, 4) layer4 for Bottleneck ResNets,
ASPP ``aspp1..4`` + ``global_avg_pool`` + ``conv1/bn1``, decoder ``conv1/bn1`` + ``last_conv``,
side-branch ``cbam`` modules with a ``Linear`` channel MLP, align_corners=True everywhere.
Not shipped: it exists to produce checkpoints in the reference layout and the outputs they must give."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RefBasic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        x = F.relu(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return out + (x if self.downsample is None else self.downsample(x))


class RefBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        x = F.relu(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + (x if self.downsample is None else self.downsample(x))


class RefCBAM(nn.Module):
    def __init__(self, c, r=16):
        super().__init__()
        self.ChannelGate = nn.Module()
        self.ChannelGate.mlp = nn.Sequential(nn.Flatten(), nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c))
        self.SpatialGate = nn.Module()
        self.SpatialGate.spatial = nn.Module()
        self.SpatialGate.spatial.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.SpatialGate.spatial.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        mlp = self.ChannelGate.mlp
        att = mlp(F.adaptive_avg_pool2d(x, 1)) + mlp(F.adaptive_max_pool2d(x, 1))
        x = x * torch.sigmoid(att)[:, :, None, None]
        pooled = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], 1)
        s = self.SpatialGate.spatial
        return x * torch.sigmoid(s.bn(s.conv(pooled)))


class RefResNet(nn.Module):
    def __init__(self, block, layers, output_stride=16):
        super().__init__()
        strides, dilations = ([1, 2, 2, 1], [1, 1, 1, 2]) if output_stride == 16 else ([1, 2, 1, 1], [1, 1, 2, 4])
        self.cin = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, 64, [dilations[0]] * layers[0], strides[0])
        self.layer2 = self._layer(block, 128, [dilations[1]] * layers[1], strides[1])
        self.layer3 = self._layer(block, 256, [dilations[2]] * layers[2], strides[2])
        grid = [1, 2, 4] if block is RefBottleneck else [1] * layers[3]
        self.layer4 = self._layer(block, 512, [g * dilations[3] for g in grid], strides[3])
        self.cbam = RefCBAM(512 * block.expansion)

    def _layer(self, block, planes, dils, stride):
        down = None
        if stride != 1 or self.cin != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.cin, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self.cin, planes, stride, dils[0], down)]
        self.cin = planes * block.expansion
        blocks += [block(self.cin, planes, 1, d) for d in dils[1:]]
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        low = F.relu(x)
        b = self.layer4(self.layer3(self.layer2(x)))
        return b, low


class RefASPPModule(nn.Module):
    def __init__(self, cin, k, dilation):
        super().__init__()
        self.atrous_conv = nn.Conv2d(cin, 256, k, padding=0 if k == 1 else dilation, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(256)

    def forward(self, x):
        return F.relu(self.bn(self.atrous_conv(x)))


class RefASPP(nn.Module):
    def __init__(self, cin, output_stride=16):
        super().__init__()
        rates = [1, 6, 12, 18] if output_stride == 16 else [1, 12, 24, 36]
        self.aspp1 = RefASPPModule(cin, 1, 1)
        self.aspp2 = RefASPPModule(cin, 3, rates[1])
        self.aspp3 = RefASPPModule(cin, 3, rates[2])
        self.aspp4 = RefASPPModule(cin, 3, rates[3])
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, 256, 1, bias=False),
                                             nn.BatchNorm2d(256), nn.ReLU())
        self.conv1 = nn.Conv2d(1280, 256, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(256)
        self.cbam = RefCBAM(256)

    def forward(self, x):
        pooled = F.interpolate(self.global_avg_pool(x), size=x.shape[2:], mode="bilinear", align_corners=True)
        x = torch.cat([self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x), pooled], 1)
        return F.relu(self.bn1(self.conv1(x)))


class RefDecoder(nn.Module):
    def __init__(self, low_ch, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(low_ch, 48, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(48)
        self.last_conv = nn.Sequential(nn.Conv2d(304, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
                                       nn.Dropout(0.5), nn.Conv2d(256, 256, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(256), nn.ReLU(), nn.Dropout(0.1),
                                       nn.Conv2d(256, num_classes, 1))
        self.cbam = RefCBAM(256)


class RefDeepLab(nn.Module):
    """``forward(x)`` → dict with "out", "logits", raw taps "B", "E", "D" and their CBAM refinements."""

    def __init__(self, arch="resnet18", num_classes=11, output_stride=16):
        super().__init__()
        block, layers = {"resnet18": (RefBasic, [2, 2, 2, 2]), "resnet34": (RefBasic, [3, 4, 6, 3]),
                         "resnet101": (RefBottleneck, [3, 4, 23, 3])}[arch]
        self.backbone = RefResNet(block, layers, output_stride)
        self.aspp = RefASPP(512 * block.expansion, output_stride)
        self.decoder = RefDecoder(64 * block.expansion, num_classes)

    def forward(self, x):
        b, low = self.backbone(x)
        e = self.aspp(F.relu(b))
        low = F.relu(self.decoder.bn1(self.decoder.conv1(low)))
        up = F.interpolate(e, size=low.shape[2:], mode="bilinear", align_corners=True)
        d = self.decoder.last_conv[0:7](torch.cat([up, low], 1))
        logits = self.decoder.last_conv[7:](d)
        out = F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)
        return {"out": out, "logits": logits, "B": b, "E": e, "D": d, "B_refined": self.backbone.cbam(b),
                "E_refined": self.aspp.cbam(e), "D_refined": self.decoder.cbam(d)}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics (so the eval-mode forward exercises every mapped tensor),
    scaled to keep activations of order one through the depth."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
    return model.eval()
