"""Similarity-Preserving distillation (Tung & Mori, ICCV 2019), as the SemCKD repo's ``distiller_zoo/SP.py``.

The student should see the same sample-to-sample similarities as the teacher: both batch Gram
matrices of the flattened features are row-normalised and compared by their mean squared
difference. The official loop applies it to one pair only, the last intermediate map of each model
(``feats[-2]``, the one before the pooled vector), so the two models' channel counts and sizes
never have to match.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from semckd_ray.distill.base import DistillContext, DistillMethod, register_method
from semckd_ray.distill.catalog import SPSpec
from semckd_ray.errors import UserError

__all__ = ["SP", "similarity_loss"]


def similarity_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """SP loss of one pair: squared Frobenius distance of the row-normalised Gram matrices / B^2."""
    bsz = f_s.shape[0]
    f_s, f_t = f_s.reshape(bsz, -1), f_t.reshape(bsz, -1)
    g_s = F.normalize(f_s @ f_s.t())
    g_t = F.normalize(f_t @ f_t.t())
    return (g_t - g_s).pow(2).sum() / (bsz * bsz)


@register_method
class SP(SPSpec, DistillMethod):
    # name, default_beta (no options): SPSpec (semckd_ray.distill.catalog)

    def __init__(self, ctx: DistillContext, options: SPSpec.Options | None = None):
        super().__init__(ctx, options)
        for who, shapes in (("student", ctx.student_shapes), ("teacher", ctx.teacher_shapes)):
            if len(shapes) < 2:
                raise UserError(
                    f"sp needs the {who}'s last feature before the pooled vector (features[-2]); "
                    f"got feature shapes {list(shapes)}"
                )

    def forward(self, out_s, out_t, target, index=None):
        return {"sp": similarity_loss(out_s[1][-2], out_t[1][-2])}
