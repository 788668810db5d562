"""Variational Information Distillation (Ahn et al., CVPR 2019), as the SemCKD repo's ``VIDLoss``.

VID maximises a variational lower bound on the mutual information between a student map and a
teacher map: a small network predicts the mean of a Gaussian over the teacher's map from the
student's, with one learned variance per teacher channel, and the loss is the Gaussian negative
log-likelihood (without its constant). Pairs are ``zip(feats_s[1:-1], feats_t[1:-1])``, one
predictor each, and their losses are summed, as the official loop does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semckd_ray.distill.at import intermediate_maps, pool_to_smaller
from semckd_ray.distill.base import DistillContext, DistillMethod, register_method
from semckd_ray.distill.catalog import VIDSpec

__all__ = ["VID", "VIDPair"]


class VIDPair(nn.Module):
    """Predictor and variances of one (student, teacher) pair (official ``VIDLoss``).

    Mean: conv1x1 -> ReLU -> conv1x1 -> ReLU -> conv1x1, no bias, the hidden width being the
    teacher's channel count as the official wiring (``VIDLoss(s, t, t)``) builds it. Variance:
    ``softplus(log_scale) + eps`` per teacher channel, initialised to ``init_pred_var``. Maps of
    different heights are compared after pooling the larger one, as in AT.
    """

    def __init__(self, s_channels: int, mid_channels: int, t_channels: int, init_pred_var: float, eps: float):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(s_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, t_channels, kernel_size=1, bias=False),
        )
        # Inverse softplus, so that the initial variance is exactly init_pred_var.
        self.log_scale = nn.Parameter(torch.full((t_channels,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = eps

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        pred_mean = self.regressor(f_s)
        pred_var = (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)
        return (0.5 * ((pred_mean - f_t).pow(2) / pred_var + pred_var.log())).mean()


@register_method
class VID(VIDSpec, DistillMethod):
    # name, default_beta, Options: VIDSpec (semckd_ray.distill.catalog)

    def __init__(self, ctx: DistillContext, options: VIDSpec.Options | None = None):
        super().__init__(ctx, options)
        s_maps = intermediate_maps(ctx.student_shapes, "student", self.name)
        t_maps = intermediate_maps(ctx.teacher_shapes, "teacher", self.name)
        init_var, eps = float(self.options.init_pred_var), float(self.options.eps)
        self.pairs = nn.ModuleList(VIDPair(s[0], t[0], t[0], init_var, eps) for s, t in zip(s_maps, t_maps))

    def forward(self, out_s, out_t, target, index=None):
        maps = zip(self.pairs, out_s[1][1:-1], out_t[1][1:-1])
        return {"vid": sum(pair(f_s, f_t) for pair, f_s, f_t in maps)}
