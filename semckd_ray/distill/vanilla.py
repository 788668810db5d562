"""Vanilla training: cross-entropy only, no teacher (also how teachers are trained)."""

from semckd_ray.distill.base import DistillMethod, register_method


@register_method
class Vanilla(DistillMethod):
    name = "vanilla"
    uses_teacher = False

    def forward(self, out_s, out_t, target, index=None):
        return {}
