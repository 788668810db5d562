"""The model registry: ``@register_model`` fills one table; ``create_model`` and ``list_models`` read it."""

from __future__ import annotations

import fnmatch
from typing import Callable

from torch import nn

from semckd_ray.errors import UserError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Function decorator: registers a model constructor under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise RuntimeError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a shell-style pattern (``"resnet*"``)."""
    names = sorted(_MODELS, key=str.lower)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def create_model(name: str, num_classes: int = 100, **kwargs) -> nn.Module:
    """Build the zoo model ``name``; its ``forward(x)`` returns ``(logits, features)``."""
    try:
        fn = _MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; valid models: {', '.join(list_models())}") from None
    return fn(num_classes=num_classes, **kwargs)
