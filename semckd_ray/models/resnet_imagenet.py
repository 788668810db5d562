"""torchvision's ImageNet ResNet-18/34/50 and MobileNetV2, as the official SemCKD code uses them.

The official ImageNet models are torchvision's with a ``forward`` that also returns the feature
maps; so are these, subclasses of torchvision's classes with torchvision's own initialisation. The
state-dict keys are therefore torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``,
``fc.weight``...): torchvision's published weight files (plain state dicts) and the official
``{"model": state_dict}`` checkpoints load as they are. Nothing is downloaded here: torchvision's
weight entries only name the published file, for the message of a missing checkpoint.

Features, as the official code: the stem output (after the max-pool for the ResNets), the output of
each of the four stages (strides 4, 8, 16, 32), and the pooled vector fed to the classifier.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor
from torchvision.models import (MobileNet_V2_Weights, ResNet18_Weights, ResNet34_Weights, ResNet50_Weights,
                                WeightsEnum)
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from semckd_ray.models._features import IMAGENET_SIZE, FeatureInfo, ZooModel
from semckd_ray.models._registry import register_model

__all__ = ["ImageNetResNet", "ImageNetMobileNetV2"]

# Indices in MobileNetV2.features of the blocks whose outputs are features 0-4: the stem, then the
# last block of each stride, the official code's splits [0, 1, 4, 7, 14, 18] (feature k ends before
# split k + 1). The final 1x1 convolution (index 18) runs between feature 4 and the pooling.
_MOBILENET_FEATURE_BLOCKS = (0, 3, 6, 13, 17)


def _published(weights: WeightsEnum) -> tuple[str, str]:
    """``(file name, URL)`` of the file of torchvision's ``weights`` entry (read, not fetched)."""
    return weights.url.rpartition("/")[2], weights.url


class ImageNetResNet(ZooModel, ResNet):
    """torchvision's ResNet of ``layers`` ``block``s per stage, returning the official feature list.

    ``weights`` is torchvision's entry for this architecture's published weights: only its URL is read.
    """

    input_size: ClassVar[int] = IMAGENET_SIZE

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int],
                 weights: WeightsEnum, num_classes: int = 1000):
        super().__init__(block, list(layers), num_classes=num_classes)
        self.pretrained_file = _published(weights)
        width = 64 * block.expansion
        self.feature_info = [
            FeatureInfo(64, 4),
            FeatureInfo(width, 4),
            FeatureInfo(2 * width, 8),
            FeatureInfo(4 * width, 16),
            FeatureInfo(8 * width, 32),
            FeatureInfo(8 * width, 0),
        ]

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = [x]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feats.append(x)
        pooled = self.avgpool(x).flatten(1)
        feats.append(pooled)
        return self.fc(pooled), feats


class ImageNetMobileNetV2(ZooModel, MobileNetV2):
    """torchvision's MobileNetV2 (width 1.0), the official code's ``MobileNetV2_Imagenet``."""

    input_size: ClassVar[int] = IMAGENET_SIZE

    def __init__(self, num_classes: int = 1000):
        super().__init__(num_classes=num_classes)
        self.pretrained_file = _published(MobileNet_V2_Weights.IMAGENET1K_V1)
        self.feature_info = [
            FeatureInfo(32, 2),
            FeatureInfo(24, 4),
            FeatureInfo(32, 8),
            FeatureInfo(96, 16),
            FeatureInfo(320, 32),
            FeatureInfo(self.last_channel, 0),
        ]

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        feats = []
        for index, block in enumerate(self.features):
            x = block(x)
            if index in _MOBILENET_FEATURE_BLOCKS:
                feats.append(x)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        feats.append(pooled)
        return self.classifier(pooled), feats


@register_model
def ResNet18(**kwargs) -> ImageNetResNet:  # noqa: N802 (the official code's name)
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), ResNet18_Weights.IMAGENET1K_V1, **kwargs)


@register_model
def ResNet34(**kwargs) -> ImageNetResNet:  # noqa: N802 (the official code's name)
    return ImageNetResNet(BasicBlock, (3, 4, 6, 3), ResNet34_Weights.IMAGENET1K_V1, **kwargs)


@register_model
def ResNet50(**kwargs) -> ImageNetResNet:  # noqa: N802 (the official code's name)
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), ResNet50_Weights.IMAGENET1K_V1, **kwargs)


@register_model
def MobileNetV2_Imagenet(**kwargs) -> ImageNetMobileNetV2:  # noqa: N802 (the official code's name)
    return ImageNetMobileNetV2(**kwargs)
