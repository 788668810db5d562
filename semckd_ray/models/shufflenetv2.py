"""CIFAR ShuffleNet V2 (Ma et al. 2018, 1x width) as in the SemCKD / RepDistiller zoo.

The stem is a single 1x1 conv (no stride, no max-pool), so the three stages produce 16x16, 8x8 and
4x4 maps. Features: stem output, the output of each stage (post-ReLU and after the final channel
shuffle), and the pooled vector of the 1x1-conv head. As in the reference, the weights keep
PyTorch's default initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semckd_ray.models._features import CifarModel, FeatureInfo
from semckd_ray.models._layers import channel_shuffle
from semckd_ray.models._registry import register_model

__all__ = ["ShuffleNetV2"]

_STEM_CHANNELS = 24


def _pointwise(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


def _depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=1, groups=channels, bias=False)


class BasicBlock(nn.Module):
    """Splits the channels in half, transforms the second half (1x1 -> 3x3 dw -> 1x1), concatenates and shuffles."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = _pointwise(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = _depthwise(half, stride=1)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = _pointwise(half, half)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        kept, transformed = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(transformed)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class DownBlock(nn.Module):
    """Stride-2 block: two branches over the whole input, each giving half the output channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid_channels = out_channels // 2
        # left branch: 3x3 dw (stride 2) -> 1x1
        self.conv1 = _depthwise(in_channels, stride=2)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = _pointwise(in_channels, mid_channels)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        # right branch: 1x1 -> 3x3 dw (stride 2) -> 1x1
        self.conv3 = _pointwise(in_channels, mid_channels)
        self.bn3 = nn.BatchNorm2d(mid_channels)
        self.conv4 = _depthwise(mid_channels, stride=2)
        self.bn4 = nn.BatchNorm2d(mid_channels)
        self.conv5 = _pointwise(mid_channels, mid_channels)
        self.bn5 = nn.BatchNorm2d(mid_channels)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(CifarModel):
    """ShuffleNet V2: 1x1 stem, three stages (a DownBlock then ``num_blocks`` BasicBlocks), 1x1-conv head."""

    def __init__(
        self,
        out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
        num_blocks: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, _STEM_CHANNELS, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)
        in_channels = _STEM_CHANNELS
        stages = []
        for channels, blocks in zip(out_channels[:3], num_blocks):
            blocks_after_down = (BasicBlock(channels) for _ in range(blocks))
            stages.append(nn.Sequential(DownBlock(in_channels, channels), *blocks_after_down))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = _pointwise(out_channels[2], out_channels[3])
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.feature_info = [
            FeatureInfo(_STEM_CHANNELS, 1),
            FeatureInfo(out_channels[0], 2),
            FeatureInfo(out_channels[1], 4),
            FeatureInfo(out_channels[2], 8),
            FeatureInfo(out_channels[3], 0),
        ]

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = F.relu(self.bn1(self.conv1(x)))
        feats = [x]
        for stage in (self.layer1, self.layer2, self.layer3):
            x = stage(x)
            feats.append(x)
        pooled = F.avg_pool2d(F.relu(self.bn2(self.conv2(x))), 4).flatten(1)
        feats.append(pooled)
        return self.linear(pooled), feats


@register_model
def ShuffleV2(**kwargs) -> ShuffleNetV2:  # noqa: N802 (the reference zoo's name)
    return ShuffleNetV2(**kwargs)
