"""The contract every zoo model keeps, so a distiller never has to guess what a model returns.

``forward(x)`` returns ``(logits, features)``. ``features`` is exactly the list that the official
SemCKD / RepDistiller model returns from ``model(x, is_feat=True)`` (with ``preact=False``): the
stem output, one map per stage, then the pooled vector fed to the classifier. The order of the pair
is the reverse of the official ``(features, logits)``: logits first, as every loss needs them.

``feature_info`` describes that list without a forward pass, and ``distill_features`` says which
entries SemCKD distils (``features[1:-1]``: neither the stem output nor the pooled vector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

__all__ = ["FeatureInfo", "CifarModel"]

CIFAR_SIZE = 32


@dataclass(frozen=True)
class FeatureInfo:
    """One entry of a model's feature list, for a 32x32 CIFAR input.

    ``reduction`` is 32 divided by the map's side (1 for a 32x32 map, 8 for a 4x4 one); it is 0 for
    the pooled vector ``[N, C]``, which has no spatial extent.
    """

    channels: int
    reduction: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape at a 32x32 input: ``(C, H, W)`` for a map, ``(C,)`` for the pooled vector."""
        if self.reduction == 0:
            return (self.channels,)
        side = CIFAR_SIZE // self.reduction
        return (self.channels, side, side)


class CifarModel(nn.Module):
    """Base of every zoo model: it only declares the feature contract described in this module."""

    distill_features: ClassVar[slice] = slice(1, -1)
    feature_info: list[FeatureInfo]
