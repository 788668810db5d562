"""The CIFAR model zoo of SemCKD / RepDistiller, behind one registry.

``create_model(name)`` builds a model whose ``forward(x)`` returns ``(logits, features)`` and whose
``feature_info`` describes the features (see ``_features.py``); ``load_checkpoint`` loads official
or our own checkpoints into it.
"""

# Importing the family modules registers their models.
from semckd_ray.models import mobilenetv2, resnet, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401
from semckd_ray.models._features import CifarModel, FeatureInfo
from semckd_ray.models._registry import create_model, list_models, register_model
from semckd_ray.models.checkpoint import load_checkpoint

__all__ = [
    "CifarModel",
    "FeatureInfo",
    "create_model",
    "list_models",
    "load_checkpoint",
    "register_model",
]
