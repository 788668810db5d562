"""CIFAR VGGs with BatchNorm (the reference's ``vgg*_bn``), as in the SemCKD / RepDistiller zoo.

Five conv blocks and a single linear classifier (no VGG FC stack). Each block is conv-BN(-ReLU-conv-BN...)
without its last ReLU, so the module indices (``block1.0``, ``block1.1``, ``block1.3``, ...) match the
reference checkpoints; the ReLU is applied in ``forward``. A 32x32 input is pooled only three
times, so the last two blocks both see 4x4 maps (the reference pools a fourth time only for 64x64
inputs). Features: block0 output (32x32), blocks 1-4 (16x16, 8x8, 4x4, 4x4), the pooled vector.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from semckd_ray.models._features import CifarModel, FeatureInfo
from semckd_ray.models._layers import init_reference_weights_
from semckd_ray.models._registry import register_model

__all__ = ["VGG"]

# Output channels of each conv, per block, by depth (torchvision's configs A, B, D, E; "S" for vgg8).
_CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _make_block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        layers += [conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(CifarModel):
    """VGG-BN with five conv blocks separated by 2x2 max-pools and a global-average-pooled linear head."""

    def __init__(self, depth: int, num_classes: int = 100):
        super().__init__()
        cfg = _CONFIGS[depth]
        in_channels = [3] + [block[-1] for block in cfg[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _make_block(c, widths) for c, widths in zip(in_channels, cfg)
        )
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        self.feature_info = [FeatureInfo(widths[-1], r) for widths, r in zip(cfg, (1, 2, 4, 8, 8))]
        self.feature_info.append(FeatureInfo(cfg[-1][-1], 0))
        init_reference_weights_(self, linear="normal")

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        pool_before_block4 = x.shape[2] == 64
        x = F.relu(self.block0(x))
        feats = [x]
        for block in (self.block1, self.block2, self.block3):
            x = F.relu(block(self.pool(x)))
            feats.append(x)
        if pool_before_block4:
            x = self.pool(x)
        x = F.relu(self.block4(x))
        feats.append(x)
        pooled = self.global_pool(x).flatten(1)
        feats.append(pooled)
        return self.classifier(pooled), feats


@register_model
def vgg8(**kwargs) -> VGG:
    return VGG(8, **kwargs)


@register_model
def vgg11(**kwargs) -> VGG:
    return VGG(11, **kwargs)


@register_model
def vgg13(**kwargs) -> VGG:
    return VGG(13, **kwargs)


@register_model
def vgg16(**kwargs) -> VGG:
    return VGG(16, **kwargs)


@register_model
def vgg19(**kwargs) -> VGG:
    return VGG(19, **kwargs)
