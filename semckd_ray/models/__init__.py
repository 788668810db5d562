"""The model zoo of SemCKD / RepDistiller, behind one registry: its CIFAR models and its ImageNet ones.

The ImageNet models (``ResNet18``, ``ResNet34``, ``ResNet50``, ``MobileNetV2_Imagenet``) are
torchvision's, so torchvision's published weight files load into them as they are.

``create_model(name)`` builds a model whose ``forward(x)`` returns ``(logits, features)`` and whose
``feature_info`` describes the features (see ``_features.py``); ``load_checkpoint`` loads official
or our own checkpoints into it. ``list_models()`` names the models without importing torch
(``_registry.ZOO``); each model's module is imported when it is first built, and the names of
``_features`` and ``checkpoint`` exported here are imported when first used.
"""

from semckd_ray._lazy import lazy_exports

from semckd_ray.models._registry import create_model, list_models, register_model

_LAZY = {"CifarModel": "_features", "FeatureInfo": "_features", "ZooModel": "_features",
         "load_checkpoint": "checkpoint"}

__all__ = [
    "CifarModel",
    "FeatureInfo",
    "ZooModel",
    "create_model",
    "list_models",
    "load_checkpoint",
    "register_model",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
