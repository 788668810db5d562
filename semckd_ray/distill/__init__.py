"""Distillation methods: one registry, one file per method.

Every module in this package that defines a ``DistillMethod`` subclass decorated with
``@register_method`` is imported here, so adding a method touches only its own file.
"""

import importlib
import pkgutil

from semckd_ray.distill.base import (
    DistillContext,
    DistillMethod,
    Distiller,
    ModelOutput,
    create_method,
    get_method_class,
    kd_loss,
    list_methods,
    make_options,
    register_method,
)

_NOT_METHODS = {"base", "official"}

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _NOT_METHODS and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "DistillContext",
    "DistillMethod",
    "Distiller",
    "ModelOutput",
    "create_method",
    "get_method_class",
    "kd_loss",
    "list_methods",
    "make_options",
    "register_method",
]
