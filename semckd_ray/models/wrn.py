"""Wide ResNets (Zagoruyko & Komodakis 2016, WRN-d-k) as in the SemCKD / RepDistiller zoo.

The blocks are pre-activation (BN-ReLU-conv), so each stage's output is the raw residual sum: the
features SemCKD distils from a WRN are taken before any BN or ReLU, unlike the post-ReLU maps of
the other families. Module names follow the reference (``block1.layer.0.convShortcut``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from semckd_ray.models._features import CifarModel, FeatureInfo
from semckd_ray.models._layers import init_reference_weights_
from semckd_ray.models._registry import register_model

__all__ = ["WideResNet"]


class BasicBlock(nn.Module):
    """Pre-activation block; when the width or stride changes, the 1x1 shortcut sees the activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A stage of blocks; it exists only so that the state-dict keys read ``blockN.layer.i``."""

    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            BasicBlock(in_planes, out_planes, stride),
            *(BasicBlock(out_planes, out_planes, 1) for _ in range(num_blocks - 1)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(CifarModel):
    """WRN of ``depth`` = 6n+4 and widening factor ``widen_factor``: stem, three stages of n blocks, BN-ReLU head."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"a WRN's depth must be 6n+4 (10, 16, 22, ...), got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks_per_stage, widths[0], widths[1], stride=1)
        self.block2 = NetworkBlock(blocks_per_stage, widths[1], widths[2], stride=2)
        self.block3 = NetworkBlock(blocks_per_stage, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_info = [
            FeatureInfo(widths[0], 1),
            FeatureInfo(widths[1], 1),
            FeatureInfo(widths[2], 2),
            FeatureInfo(widths[3], 4),
            FeatureInfo(widths[3], 0),
        ]
        init_reference_weights_(self, linear="zero_bias")

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.conv1(x)
        feats = [x]
        for stage in (self.block1, self.block2, self.block3):
            x = stage(x)
            feats.append(x)
        pooled = F.avg_pool2d(self.relu(self.bn1(x)), 8).flatten(1)
        feats.append(pooled)
        return self.fc(pooled), feats


@register_model
def wrn_16_1(**kwargs) -> WideResNet:
    return WideResNet(16, 1, **kwargs)


@register_model
def wrn_16_2(**kwargs) -> WideResNet:
    return WideResNet(16, 2, **kwargs)


@register_model
def wrn_40_1(**kwargs) -> WideResNet:
    return WideResNet(40, 1, **kwargs)


@register_model
def wrn_40_2(**kwargs) -> WideResNet:
    return WideResNet(40, 2, **kwargs)
