"""Pieces shared by several model families."""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

__all__ = ["init_reference_weights_", "channel_shuffle"]


def init_reference_weights_(model: nn.Module, linear: Literal["default", "zero_bias", "normal"]) -> None:
    """Initialise ``model`` as the reference zoo does, so that training from scratch matches it.

    Every family but the ShuffleNets (which keep PyTorch's defaults) draws conv weights from
    He-normal with fan-out, N(0, 2 / (k*k*out_channels)), zeroes conv biases and sets BatchNorm to
    the identity. They differ only in the classifier: ResNet keeps PyTorch's default (``"default"``),
    WRN zeroes its bias (``"zero_bias"``), VGG and MobileNetV2 draw N(0, 0.01^2) weights and zero the
    bias (``"normal"``).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear != "default":
            if linear == "normal":
                nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: [N, g*c, H, W] -> view [N, g, c, H, W] -> swap g and c -> flatten."""
    n, channels, h, w = x.shape
    return x.view(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)
