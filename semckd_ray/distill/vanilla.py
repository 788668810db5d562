"""Vanilla training: cross-entropy only, no teacher (also how teachers are trained)."""

from semckd_ray.distill.base import DistillMethod, register_method
from semckd_ray.distill.catalog import VanillaSpec


@register_method
class Vanilla(VanillaSpec, DistillMethod):
    def forward(self, out_s, out_t, target, index=None):
        return {}
