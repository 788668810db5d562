"""FitNet hints (Romero et al., ICLR 2015), as the SemCKD repo's ``HintLoss`` and ``ConvReg``.

One student map, ``feats[hint_layer]``, is regressed onto the teacher's map of the same index by a
small trainable convolution, and the regression output is pulled to the teacher's map by MSE. The
official code trains the regressor together with the student from the first step (no separate
hint-pretraining stage), and so does this one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from semckd_ray.distill.base import DistillContext, DistillMethod, register_method
from semckd_ray.distill.catalog import FitNetSpec
from semckd_ray.errors import UserError

__all__ = ["FitNet", "ConvReg"]


class ConvReg(nn.Module):
    """Student map [Cs, Hs, Ws] -> teacher channels, then BN and ReLU (official ``ConvReg``).

    The convolution is chosen by the two heights so that the output has the teacher's size:
    a stride-2 3x3 conv when the student is twice as tall, a stride-2 transposed conv when half as
    tall, a valid conv of kernel ``1 + Hs - Ht`` when taller or equal. When the student is smaller
    by another ratio a size-keeping 3x3 conv is used and the teacher map is average-pooled down to
    the student's size instead (the SemCKD repo's extension of RepDistiller, which refused that case).
    The trailing ReLU is applied whatever the teacher's features are, as in the official code.
    """

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...]):
        super().__init__()
        s_c, s_h, s_w = s_shape
        t_c, t_h, t_w = t_shape
        self.pool_teacher = False
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, padding=1)
            self.pool_teacher = True
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


@register_method
class FitNet(FitNetSpec, DistillMethod):
    # name, default_beta, Options: FitNetSpec (semckd_ray.distill.catalog)

    def __init__(self, ctx: DistillContext, options: FitNetSpec.Options | None = None):
        super().__init__(ctx, options)
        layer = self.options.hint_layer
        s_shapes, t_shapes = ctx.student_shapes, ctx.teacher_shapes
        usable = [i for i, (s, t) in enumerate(zip(s_shapes, t_shapes)) if len(s) == 3 and len(t) == 3]
        if layer not in usable:
            raise UserError(
                f"fitnet option hint_layer={layer} does not index a feature map (C x H x W) of both "
                f"models; allowed: {usable}"
            )
        self.hint_layer = layer
        self.regressor = ConvReg(s_shapes[layer], t_shapes[layer])

    def forward(self, out_s, out_t, target, index=None):
        f_s = self.regressor(out_s[1][self.hint_layer])
        f_t = out_t[1][self.hint_layer]
        if self.regressor.pool_teacher:
            f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[2:])
        return {"fitnet": F.mse_loss(f_s, f_t)}
