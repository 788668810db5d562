"""Distillation methods: one registry, one spec and one module per method.

Each method has its torch-free spec in ``catalog`` (name, teacher, default beta, options: what the
config is validated against) and its ``DistillMethod`` subclass, decorated with
``@register_method``, in a module of this package. ``get_method_class`` (and so ``create_method``)
imports every such module on first use. The names below are imported from their modules when first
used: importing this package, or ``catalog``, does not import torch.
"""

import importlib

# Each exported name and the module that defines it.
_EXPORTS = {
    **dict.fromkeys(["list_methods", "make_options", "method_spec", "MethodSpec"], "catalog"),
    **dict.fromkeys(["DistillContext", "DistillMethod", "Distiller", "ModelOutput", "create_method",
                     "get_method_class", "kd_loss", "register_method"], "base"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
