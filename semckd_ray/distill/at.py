"""Attention Transfer (Zagoruyko & Komodakis, ICLR 2017), as the SemCKD repo's ``distiller_zoo/AT.py``.

A feature map is summarised by its spatial attention: the channel mean of ``f^p``, flattened and
L2-normalised per sample. The loss of a (student, teacher) pair is the mean squared difference of
the two attentions. The pairs are ``zip(feats_s[1:-1], feats_t[1:-1])`` (the intermediate maps in
order; a deeper model's surplus maps are left out) and their losses are summed with equal weight,
as the official loop does (``loss_kd = sum(loss_group)``).

Maps of different resolution are compared after average-pooling the larger one to the size of the
smaller; this lets any teacher/student pair be distilled and is what the golden vectors check.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from semckd_ray.distill.base import DistillContext, DistillMethod, register_method
from semckd_ray.distill.catalog import ATSpec
from semckd_ray.errors import UserError

__all__ = ["AT", "attention_map", "at_loss", "intermediate_maps", "pool_to_smaller"]


def intermediate_maps(shapes: tuple[tuple[int, ...], ...], who: str, method: str) -> list[tuple[int, ...]]:
    """The per-sample shapes of ``features[1:-1]``, checked to be C x H x W maps.

    Shared by the methods that pair the intermediate maps (AT, VID), so that a model without such
    maps is refused when the method is built rather than deep inside the first step.
    """
    maps = list(shapes[1:-1])
    if not maps or any(len(s) != 3 for s in maps):
        raise UserError(
            f"{method} needs the {who}'s intermediate feature maps (features[1:-1], each C x H x W); "
            f"got feature shapes {list(shapes)}"
        )
    return maps


def pool_to_smaller(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool whichever of the two maps is taller to the other's spatial size.

    The official code decides on the heights alone and pools to a square; pooling to the other
    map's (H, W) is the same on the square maps of every zoo model and stays correct on others.
    """
    if f_s.shape[2] > f_t.shape[2]:
        f_s = F.adaptive_avg_pool2d(f_s, f_t.shape[2:])
    elif f_s.shape[2] < f_t.shape[2]:
        f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[2:])
    return f_s, f_t


def attention_map(feat: Tensor, p: float) -> Tensor:
    """[B, C, H, W] -> [B, H*W]: channel mean of ``feat^p``, L2-normalised per sample."""
    return F.normalize(feat.pow(p).mean(1).flatten(1))


def at_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """AT loss of one pair of maps: mean squared difference of their attention maps."""
    f_s, f_t = pool_to_smaller(f_s, f_t)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@register_method
class AT(ATSpec, DistillMethod):
    # name, default_beta, Options: ATSpec (semckd_ray.distill.catalog)

    def __init__(self, ctx: DistillContext, options: ATSpec.Options | None = None):
        super().__init__(ctx, options)
        intermediate_maps(ctx.student_shapes, "student", self.name)
        intermediate_maps(ctx.teacher_shapes, "teacher", self.name)
        self.p = float(self.options.p)

    def forward(self, out_s, out_t, target, index=None):
        pairs = zip(out_s[1][1:-1], out_t[1][1:-1])
        return {"at": sum(at_loss(f_s, f_t, self.p) for f_s, f_t in pairs)}
