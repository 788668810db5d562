"""The model registry: ``ZOO`` names every model, ``@register_model`` gives each its constructor.

``ZOO`` lists the models by the module of this package that defines them, so that names are known
without importing torch (the config checks ``student.model`` against ``list_models()`` before
anything heavy is imported; this module imports no torch). ``create_model`` imports a model's
module on first use, whose ``@register_model`` functions fill the constructor table. A new model:
its function, decorated, in its family's module, and its name under that module here.
"""

from __future__ import annotations

import fnmatch
import importlib
from typing import TYPE_CHECKING, Callable

from semckd_ray.errors import UserError

if TYPE_CHECKING:
    from torch import nn

# Module of semckd_ray.models -> the models its @register_model functions define.
ZOO: dict[str, tuple[str, ...]] = {
    "resnet": ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
               "resnet8x4", "resnet8x4_double", "resnet32x4"),
    "vgg": ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19"),
    "wrn": ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"),
    "mobilenetv2": ("MobileNetV2",),
    "shufflenetv1": ("ShuffleV1",),
    "shufflenetv2": ("ShuffleV2",),
    "resnet_imagenet": ("ResNet18", "ResNet34", "ResNet50", "MobileNetV2_Imagenet"),
}

_MODULE_OF = {name: f"{__package__}.{module}" for module, names in ZOO.items() for name in names}
_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Function decorator: registers a model constructor under its function name, which ``ZOO`` lists."""
    name, module = fn.__name__, fn.__module__
    if _MODULE_OF.get(name) != module:
        family = module.rpartition(".")[2]
        if name in _MODULE_OF:
            raise RuntimeError(f"model {name!r} of {module} is listed in ZOO as one of {_MODULE_OF[name]}: "
                               f"move it to ZOO[{family!r}] in {__name__}")
        raise RuntimeError(f"model {name!r} of {module} is not listed in ZOO: add it to ZOO[{family!r}] in {__name__}")
    if name in _MODELS:
        raise RuntimeError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Model names, optionally filtered by a shell-style pattern (``"resnet*"``); imports no model."""
    names = sorted(_MODULE_OF, key=str.lower)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def check_model_name(name: str) -> str:
    """``name`` if it is a model of the zoo, else a ``UserError`` listing them; imports no model."""
    if name not in _MODULE_OF:
        raise UserError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return name


def model_constructor(name: str) -> Callable[..., nn.Module]:
    """The registered constructor of model ``name``, its module imported if it was not yet."""
    module = _MODULE_OF[check_model_name(name)]
    importlib.import_module(module)
    try:
        return _MODELS[name]
    except KeyError:
        raise RuntimeError(f"{module} defines no @register_model function {name!r}, which ZOO lists "
                           f"in {__name__}: register it there, or remove it from ZOO") from None


def create_model(name: str, num_classes: int = 100, **kwargs) -> nn.Module:
    """Build the zoo model ``name``; its ``forward(x)`` returns ``(logits, features)``."""
    return model_constructor(name)(num_classes=num_classes, **kwargs)
