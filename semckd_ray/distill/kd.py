"""Hinton et al. knowledge distillation: CE + KD with no further term (SPEC section 6)."""

from semckd_ray.distill.base import DistillMethod, register_method
from semckd_ray.distill.catalog import KDSpec


@register_method
class KD(KDSpec, DistillMethod):
    def forward(self, out_s, out_t, target, index=None):
        # The KD term itself is computed by Distiller for every method that uses a teacher.
        return {}
