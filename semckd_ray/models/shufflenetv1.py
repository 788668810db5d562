"""CIFAR ShuffleNet V1 (Zhang et al. 2018, g=3) as in the SemCKD / RepDistiller zoo.

The stem is a single 1x1 conv (no stride, no max-pool), so the three stages produce 16x16, 8x8 and
4x4 maps. Features: stem output, the post-ReLU output of each stage, the pooled vector. As in the
reference, the weights keep PyTorch's default initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semckd_ray.models._features import CifarModel, FeatureInfo
from semckd_ray.models._layers import channel_shuffle
from semckd_ray.models._registry import register_model

__all__ = ["ShuffleNet"]

_STEM_CHANNELS = 24


class Bottleneck(nn.Module):
    """Grouped 1x1 -> shuffle -> 3x3 depthwise -> grouped 1x1, added to the input, or, when
    ``stride`` is 2, concatenated with its 3x3 average pool (so ``out_planes`` excludes those channels).

    ``group_first_conv`` is False for the very first block: the paper leaves that pointwise conv
    ungrouped because the stem has too few channels.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, group_first_conv: bool):
        super().__init__()
        mid_planes = out_planes // 4
        self.stride = stride
        self.first_groups = groups if group_first_conv else 1
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            out = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        else:
            out = out + x
        return F.relu(out)


class ShuffleNet(CifarModel):
    """ShuffleNet V1: 1x1 stem and three stages, each opened by a stride-2 concatenating block."""

    def __init__(
        self,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, _STEM_CHANNELS, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)
        in_planes = _STEM_CHANNELS
        stages = []
        for stage_index, (planes, blocks) in enumerate(zip(out_planes, num_blocks)):
            stage = []
            for i in range(blocks):
                first = i == 0
                stage.append(
                    Bottleneck(
                        in_planes,
                        planes - in_planes if first else planes,
                        stride=2 if first else 1,
                        groups=groups,
                        group_first_conv=not (first and stage_index == 0),
                    )
                )
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.feature_info = [
            FeatureInfo(_STEM_CHANNELS, 1),
            FeatureInfo(out_planes[0], 2),
            FeatureInfo(out_planes[1], 4),
            FeatureInfo(out_planes[2], 8),
            FeatureInfo(out_planes[2], 0),
        ]

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = F.relu(self.bn1(self.conv1(x)))
        feats = [x]
        for stage in (self.layer1, self.layer2, self.layer3):
            x = stage(x)
            feats.append(x)
        pooled = F.avg_pool2d(x, 4).flatten(1)
        feats.append(pooled)
        return self.linear(pooled), feats


@register_model
def ShuffleV1(**kwargs) -> ShuffleNet:  # noqa: N802 (the reference zoo's name)
    return ShuffleNet(**kwargs)
