"""CIFAR MobileNetV2 (Sandler et al. 2018) as in the SemCKD / RepDistiller zoo.

The zoo's ``MobileNetV2`` is the reference's ``mobile_half``: expansion 6, width multiplier 0.5,
a stride-2 stem (so the first features are 16x16) and the 1280-channel head kept at full width.
Features: stem output, then the outputs of inverted-residual groups 1, 2, 4 and 6 (the last group
before each resolution drop, and the final one), which are linear-bottleneck outputs (BN, no
ReLU), then the pooled vector. Module names follow the reference (``blocks.1.0.conv.3``).
"""

from __future__ import annotations

from torch import Tensor, nn

from semckd_ray.models._features import CifarModel, FeatureInfo
from semckd_ray.models._layers import init_reference_weights_
from semckd_ray.models._registry import register_model

__all__ = ["CifarMobileNetV2"]

# Per group of inverted residuals: (output channels at width 1, number of blocks, stride of the
# first block). Every group expands by the network's expansion, except the first, which does not.
_GROUPS = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))
_FEATURE_GROUPS = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, with identity shortcut when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_shortcut else out


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class CifarMobileNetV2(CifarModel):
    """MobileNetV2 for 32x32 inputs with expansion ``expansion`` and width multiplier ``width_mult``."""

    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, channels, 3, stride=2)
        reduction = 2
        self.feature_info = [FeatureInfo(channels, reduction)]
        self.blocks = nn.ModuleList()
        for index, (width, num_blocks, stride) in enumerate(_GROUPS):
            out_channels = int(width * width_mult)
            group_expansion = 1 if index == 0 else expansion
            group = []
            for i in range(num_blocks):
                group.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, group_expansion))
                channels = out_channels
            self.blocks.append(nn.Sequential(*group))
            reduction *= stride
            if index in _FEATURE_GROUPS:
                self.feature_info.append(FeatureInfo(channels, reduction))
        last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, last_channels, 1, stride=1)
        # The reference sizes this pool for a 32x32 input (the head sees 2x2 maps).
        self.avgpool = nn.AvgPool2d(2, ceil_mode=True)
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        self.feature_info.append(FeatureInfo(last_channels, 0))
        init_reference_weights_(self, linear="normal")

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.conv1(x)
        feats = [x]
        for index, group in enumerate(self.blocks):
            x = group(x)
            if index in _FEATURE_GROUPS:
                feats.append(x)
        pooled = self.avgpool(self.conv2(x)).flatten(1)
        feats.append(pooled)
        return self.classifier(pooled), feats


@register_model
def MobileNetV2(**kwargs) -> CifarMobileNetV2:  # noqa: N802 (the reference zoo's name)
    return CifarMobileNetV2(expansion=6, width_mult=0.5, **kwargs)
