"""The contract every zoo model keeps, so a distiller never has to guess what a model returns.

``forward(x)`` returns ``(logits, features)``. ``features`` is exactly the list that the official
SemCKD / RepDistiller model returns from ``model(x, is_feat=True)`` (with ``preact=False``): the
stem output, one map per stage, then the pooled vector fed to the classifier. The order of the pair
is the reverse of the official ``(features, logits)``: logits first, as every loss needs them.

``feature_info`` describes that list without a forward pass, and ``distill_features`` says which
entries SemCKD distils (``features[1:-1]``: neither the stem output nor the pooled vector). The
maps' sides depend on the input's, so a model also says the input it is made for (``input_size``:
32 for the CIFAR models, 224 for the ImageNet ones), at which a caller probes its features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

__all__ = ["FeatureInfo", "ZooModel", "CifarModel"]

CIFAR_SIZE = 32
IMAGENET_SIZE = 224


@dataclass(frozen=True)
class FeatureInfo:
    """One entry of a model's feature list.

    ``reduction`` is the input's side divided by the map's (1 for a map as large as the input, 8 for
    a 4x4 map of a 32x32 input); it is 0 for the pooled vector ``[N, C]``, which has no spatial extent.
    """

    channels: int
    reduction: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape at a 32x32 input, the CIFAR models' (see ``shape_at``)."""
        return self.shape_at(CIFAR_SIZE)

    def shape_at(self, size: int) -> tuple[int, ...]:
        """Per-sample shape for a ``size`` x ``size`` input: ``(C, H, W)`` for a map, ``(C,)`` for the pooled vector.

        A side that ``reduction`` does not divide rounds up, as each stride-2 convolution or pooling
        with "same" padding does: exact for the ImageNet models at any size. The CIFAR models are
        described at their 32x32 input only (VGG, for one, pools by the input's size).
        """
        if self.reduction == 0:
            return (self.channels,)
        side = -(-size // self.reduction)
        return (self.channels, side, side)


class ZooModel(nn.Module):
    """Base of every zoo model: it only declares the feature contract described in this module.

    ``pretrained_file`` is ``(file name, URL)`` of the published weights that load into the model
    as they are, which the message of a missing checkpoint names; None where none are published.
    """

    distill_features: ClassVar[slice] = slice(1, -1)
    input_size: ClassVar[int]
    pretrained_file: tuple[str, str] | None = None
    feature_info: list[FeatureInfo]


class CifarModel(ZooModel):
    """Base of the CIFAR models of SemCKD / RepDistiller: 32x32 inputs, no published weights."""

    input_size: ClassVar[int] = CIFAR_SIZE
