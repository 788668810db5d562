"""Distillation methods: one registry, one spec and one module per method.

Each method has its torch-free spec in ``catalog`` (name, teacher, default beta, options: what the
config is validated against) and its ``DistillMethod`` subclass, decorated with
``@register_method``, in a module of this package. ``get_method_class`` (and so ``create_method``)
imports every such module on first use. The names below are imported from their modules when first
used: importing this package, or ``catalog``, does not import torch.
"""

from semckd_ray._lazy import lazy_exports

# Each exported name and the module that defines it.
_EXPORTS = {
    **dict.fromkeys(["list_methods", "make_options", "method_spec", "MethodSpec"], "catalog"),
    **dict.fromkeys(["DistillContext", "DistillMethod", "Distiller", "ModelOutput", "create_method",
                     "get_method_class", "kd_loss", "register_method"], "base"),
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
