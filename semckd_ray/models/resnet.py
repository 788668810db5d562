"""CIFAR ResNets (He et al. 2016, the 6n+2 family) as in the SemCKD / RepDistiller zoo.

Module names follow the reference (``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``), so its
checkpoints load as they are. Features: stem output, the post-ReLU output of each of the three
stages (32x32, 16x16, 8x8), and the pooled vector.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from semckd_ray.models._features import CifarModel, FeatureInfo
from semckd_ray.models._layers import init_reference_weights_
from semckd_ray.models._registry import register_model

__all__ = ["ResNet", "BasicBlock"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs and an identity (or 1x1 conv + BN) shortcut; returns the post-ReLU sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(CifarModel):
    """CIFAR ResNet of ``depth`` = 6n+2 layers: a 3x3 stem and three stages of n basic blocks.

    ``widths`` is (stem, stage1, stage2, stage3) channels; stages 2 and 3 halve the resolution.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"a CIFAR ResNet's depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(widths[0], widths[1], blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], blocks_per_stage, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_info = [
            FeatureInfo(widths[0], 1),
            FeatureInfo(widths[1], 1),
            FeatureInfo(widths[2], 2),
            FeatureInfo(widths[3], 4),
            FeatureInfo(widths[3], 0),
        ]
        init_reference_weights_(self, linear="default")

    @staticmethod
    def _make_stage(in_planes: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x]
        for stage in (self.layer1, self.layer2, self.layer3):
            x = stage(x)
            feats.append(x)
        pooled = self.avgpool(x).flatten(1)
        feats.append(pooled)
        return self.fc(pooled), feats


@register_model
def resnet8(**kwargs) -> ResNet:
    return ResNet(8, (16, 16, 32, 64), **kwargs)


@register_model
def resnet14(**kwargs) -> ResNet:
    return ResNet(14, (16, 16, 32, 64), **kwargs)


@register_model
def resnet20(**kwargs) -> ResNet:
    return ResNet(20, (16, 16, 32, 64), **kwargs)


@register_model
def resnet32(**kwargs) -> ResNet:
    return ResNet(32, (16, 16, 32, 64), **kwargs)


@register_model
def resnet44(**kwargs) -> ResNet:
    return ResNet(44, (16, 16, 32, 64), **kwargs)


@register_model
def resnet56(**kwargs) -> ResNet:
    return ResNet(56, (16, 16, 32, 64), **kwargs)


@register_model
def resnet110(**kwargs) -> ResNet:
    return ResNet(110, (16, 16, 32, 64), **kwargs)


@register_model
def resnet8x4(**kwargs) -> ResNet:
    return ResNet(8, (32, 64, 128, 256), **kwargs)


@register_model
def resnet8x4_double(**kwargs) -> ResNet:
    return ResNet(8, (64, 128, 256, 512), **kwargs)


@register_model
def resnet32x4(**kwargs) -> ResNet:
    return ResNet(32, (32, 64, 128, 256), **kwargs)
