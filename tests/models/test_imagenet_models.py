"""The zoo's ImageNet models are torchvision's: its state-dict keys, its outputs, its weight files.

Each is compared with the torchvision model of the same weights, at small inputs (64 px, and
100 px for a side the reductions do not divide) to keep the tests fast on a CPU.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn

from semckd_ray.config import TeacherConfig
from semckd_ray.errors import UserError
from semckd_ray.models import ZooModel, create_model, load_checkpoint
from semckd_ray.models._registry import ZOO
from semckd_ray.teacher import load_teacher

CLASSES = 10
CPU = torch.device("cpu")

# Zoo name -> (torchvision builder, its modules whose outputs are features 0-4, its classifier,
# whose input is the pooled feature 5, the file name of its published ImageNet weights).
TORCHVISION = {
    "ResNet18": (torchvision.models.resnet18, ["maxpool", "layer1", "layer2", "layer3", "layer4"], "fc",
                 "resnet18-f37072fd.pth"),
    "ResNet34": (torchvision.models.resnet34, ["maxpool", "layer1", "layer2", "layer3", "layer4"], "fc",
                 "resnet34-b627a593.pth"),
    "ResNet50": (torchvision.models.resnet50, ["maxpool", "layer1", "layer2", "layer3", "layer4"], "fc",
                 "resnet50-0676ba61.pth"),
    "MobileNetV2_Imagenet": (torchvision.models.mobilenet_v2,
                             ["features.0", "features.3", "features.6", "features.13", "features.17"],
                             "classifier", "mobilenet_v2-b0353104.pth"),
}
NAMES = list(TORCHVISION)


@functools.cache
def _model(name: str) -> ZooModel:
    torch.manual_seed(0)
    return create_model(name, num_classes=CLASSES).eval()


def _torchvision_model(name: str, num_classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(1)
    return TORCHVISION[name][0](num_classes=num_classes).eval()


def _torchvision_features(model: nn.Module, name: str, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """torchvision's logits and, through hooks, the outputs the official code takes as features."""
    _, stages, classifier, _ = TORCHVISION[name]
    modules = dict(model.named_modules())
    feats: list[torch.Tensor] = []
    handles = [modules[stage].register_forward_hook(lambda _m, _i, out: feats.append(out)) for stage in stages]
    handles.append(modules[classifier].register_forward_pre_hook(lambda _m, args: feats.append(args[0])))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, feats


def test_the_zoo_lists_the_official_codes_imagenet_names():
    assert set(ZOO["resnet_imagenet"]) == set(NAMES)


@pytest.mark.parametrize("size", [64, 100])
@pytest.mark.parametrize("name", NAMES)
def test_features_match_feature_info_at_any_input_size(name, size):
    model = _model(name)
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, CLASSES)
    assert [tuple(f.shape[1:]) for f in feats] == [info.shape_at(size) for info in model.feature_info]
    assert len(feats[model.distill_features]) == 4  # SemCKD distils the four stages
    assert model.input_size == 224


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_shapes_are_torchvisions(name):
    ours = {k: v.shape for k, v in _model(name).state_dict().items()}
    theirs = {k: v.shape for k, v in _torchvision_model(name).state_dict().items()}
    assert list(ours) == list(theirs)
    assert ours == theirs


@pytest.mark.parametrize("name", NAMES)
def test_features_and_logits_are_torchvisions_outputs(name):
    reference = _torchvision_model(name)
    model = create_model(name, num_classes=CLASSES).eval()
    load_checkpoint(model, reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    expected_logits, expected_feats = _torchvision_features(reference, name, x)
    with torch.no_grad():
        logits, feats = model(x)
    assert len(feats) == len(expected_feats) == 6
    for i, (actual, expected) in enumerate(zip(feats, expected_feats)):
        assert torch.equal(actual, expected), f"feature {i}"
    assert torch.equal(logits, expected_logits)


@pytest.mark.parametrize("wrapped", [False, True], ids=["torchvision-state-dict", "official-model-entry"])
def test_a_torchvision_weight_file_loads_as_the_teacher(tmp_path, wrapped):
    reference = _torchvision_model("ResNet34")
    path = tmp_path / "resnet34.pth"
    torch.save({"model": reference.state_dict()} if wrapped else reference.state_dict(), path)
    teacher = load_teacher(TeacherConfig(model="ResNet34", checkpoint=str(path)), CLASSES, CPU).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(teacher(x)[0], reference(x))


@pytest.mark.parametrize("name", NAMES)
def test_a_missing_file_names_the_torchvision_file_to_put_there(tmp_path, name):
    file_name = TORCHVISION[name][3]
    path = tmp_path / "teachers" / file_name
    with pytest.raises(UserError, match="does not exist") as err:
        load_checkpoint(_model(name), path)
    message = str(err.value)
    assert f"https://download.pytorch.org/models/{file_name}" in message
    assert f"torchvision's {file_name}" in message
    assert f"'{path}'" in message
    assert _model(name).pretrained_file == (file_name, f"https://download.pytorch.org/models/{file_name}")


def test_a_cifar_models_missing_file_names_no_download():
    with pytest.raises(UserError, match="does not exist or is not a file; check the path.$"):
        load_checkpoint(create_model("resnet8"), "/nonexistent/resnet8.pth")


def test_a_1000_class_file_into_a_10_class_teacher_names_the_classifier_shapes(tmp_path):
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(_torchvision_model("ResNet18", num_classes=1000).state_dict(), path)
    with pytest.raises(UserError, match=r"teacher.model='ResNet18'.*does not fit") as err:
        load_teacher(TeacherConfig(model="ResNet18", checkpoint=str(path)), CLASSES, CPU)
    message = str(err.value)
    assert "fc.weight (checkpoint [1000, 512], model [10, 512])" in message
    assert "fc.bias (checkpoint [1000], model [10])" in message
    assert "num_classes" in message
