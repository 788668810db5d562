"""The zoo reproduces the official CIFAR models: names, sizes, features, state-dict keys, outputs.

The golden files describe the CIFAR models; the ImageNet ones are torchvision's, checked against
torchvision in test_imagenet_models.py. Every model of the zoo trains (forward and backward).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from golden import FLOAT32_FLOOR, golden_dir, golden_files, relative_error

from semckd_ray.errors import UserError
from semckd_ray.models import FeatureInfo, ZooModel, create_model, list_models, load_checkpoint
from semckd_ray.models._registry import ZOO

MODEL_NAMES = list_models()
CIFAR_NAMES = [name for name in MODEL_NAMES if name not in ZOO["resnet_imagenet"]]


@functools.cache
def _model(name: str) -> ZooModel:
    torch.manual_seed(0)
    return create_model(name)


def _golden_json(filename: str) -> dict:
    path = golden_dir() / filename
    if not path.is_file():
        pytest.skip(f"{path} not found (set SEMCKD_GOLDEN_DIR)")
    return json.loads(path.read_text())["models"]


@pytest.fixture(scope="module")
def reference_models() -> dict:
    return _golden_json("models.json")


@pytest.fixture(scope="module")
def reference_state_dicts() -> dict:
    return _golden_json("models_state_dict.json")


def test_registry_holds_exactly_the_reference_cifar_zoo(reference_models):
    assert sorted(CIFAR_NAMES) == sorted(reference_models)


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_parameter_and_buffer_counts_match_reference(name, reference_models):
    model = _model(name)
    assert sum(p.numel() for p in model.parameters()) == reference_models[name]["params"]
    assert sum(b.numel() for b in model.buffers()) == reference_models[name]["buffers"]


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_features_and_feature_info_match_reference(name, reference_models):
    reference = reference_models[name]
    model = _model(name).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 32, 32))
    assert model.input_size == 32
    assert list(logits.shape) == reference["logit_shape"]
    assert [list(f.shape) for f in feats] == reference["feat_shapes"]
    assert [[2, *info.shape] for info in model.feature_info] == reference["feat_shapes"]
    distilled = model.feature_info[model.distill_features]
    assert [info.channels for info in distilled] == reference["semckd_channels"]
    assert all(isinstance(info, FeatureInfo) for info in model.feature_info)


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_state_dict_keys_and_shapes_match_reference(name, reference_state_dicts):
    state_dict = {k: list(v.shape) for k, v in _model(name).state_dict().items()}
    assert state_dict == reference_state_dicts[name]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_reaches_every_parameter(name):
    model = _model(name).train()
    model.zero_grad(set_to_none=True)
    logits, feats = model(torch.randn(2, 3, 32, 32))
    loss = logits.logsumexp(1).mean() + sum(f.pow(2).mean() for f in feats[model.distill_features])
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("path", golden_files("model_*.pt"))
def test_official_checkpoint_reproduces_official_outputs(path):
    """The official float32 outputs, matched directly: a forward pass has no branch whose rounding
    moves a value (unlike SemCKD's gradients, golden.py), so two CPUs' float32 outputs differ by
    their rounding alone: 1.7e-6 at most here (AMD EPYC, Zen 3, AVX2), each 1.2e-6 from float64 at most."""
    reference = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(reference["model_name"], num_classes=reference.get("num_classes", 100))
    load_checkpoint(model, {"model": reference["model"]})
    model.eval()
    with torch.no_grad():
        logits, feats = model(reference["input"])
    assert len(feats) == len(reference["features"])
    for i, (actual, expected) in enumerate(zip(feats, reference["features"])):
        assert actual.shape == expected.shape, f"feature {i}"
        assert relative_error(actual, expected) <= FLOAT32_FLOOR, f"feature {i}"
    assert relative_error(logits, reference["logits"]) <= FLOAT32_FLOOR


def test_vgg_pools_before_block4_only_for_64px_inputs():
    model = _model("vgg8").eval()
    with torch.no_grad():
        _, feats_32 = model(torch.randn(1, 3, 32, 32))
        _, feats_64 = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats_32[1:-1]] == [16, 8, 4, 4]
    assert [f.shape[-1] for f in feats_64[1:-1]] == [32, 16, 8, 4]


def test_num_classes_sets_the_classifier_width():
    logits, _ = create_model("resnet8", num_classes=10)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(UserError, match="unknown model 'nope'") as err:
        create_model("nope")
    assert all(name in str(err.value) for name in ("resnet8x4", "wrn_40_2", "MobileNetV2", "ShuffleV2"))


def test_list_models_filters_by_shell_pattern():
    resnets = list_models("resnet*")
    assert "resnet8x4" in resnets and "resnet110" in resnets
    assert all(name.startswith("resnet") for name in resnets)
    assert list_models("wrn_40_*") == ["wrn_40_1", "wrn_40_2"]
