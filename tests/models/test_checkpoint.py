"""load_checkpoint reads the official format, refuses unsafe files, and explains every failure."""

from __future__ import annotations

import os

import pytest
import torch

from semckd_ray.errors import UserError
from semckd_ray.models import create_model, load_checkpoint


def _resnet8(num_classes: int = 100, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("resnet8", num_classes=num_classes)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key


class _RunsShellCommand:
    """Unpickling this calls ``os.system``: what a malicious checkpoint would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_load_returns_the_other_entries_of_the_checkpoint(tmp_path):
    source, target = _resnet8(seed=0), _resnet8(seed=1)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict(), "epoch": 7, "best_acc": torch.tensor(71.5)}, path)
    checkpoint = load_checkpoint(target, path)
    _assert_same_weights(target, source)
    assert checkpoint["epoch"] == 7 and checkpoint["best_acc"].item() == 71.5
    assert set(checkpoint["model"]) == set(source.state_dict())


def test_official_format_with_optimizer_and_attention_entries_loads(tmp_path):
    source, target = _resnet8(seed=0), _resnet8(seed=1)
    official = {
        "epoch": 240,
        "model": source.state_dict(),
        "attention": {"query_weight0.linear.weight": torch.zeros(2, 2)},
        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "best_acc": torch.tensor(75.0),
    }
    torch.save(official, tmp_path / "resnet8_best.pth")
    load_checkpoint(target, tmp_path / "resnet8_best.pth")
    _assert_same_weights(target, source)


def test_bare_state_dict_saved_through_ddp_loads_without_the_module_prefix():
    source, target = _resnet8(seed=0), _resnet8(seed=1)
    ddp_state_dict = {f"module.{k}": v for k, v in source.state_dict().items()}
    checkpoint = load_checkpoint(target, ddp_state_dict)
    _assert_same_weights(target, source)
    assert set(checkpoint) == {"model"}


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "no_such_teacher.pth"
    with pytest.raises(UserError, match="does not exist") as err:
        load_checkpoint(_resnet8(), path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("truncate", [False, True], ids=["garbage", "truncated"])
def test_corrupt_file_is_reported_as_unreadable(tmp_path, truncate):
    path = tmp_path / "broken.pth"
    if truncate:
        torch.save({"model": _resnet8().state_dict()}, path)
        path.write_bytes(path.read_bytes()[:4000])
    else:
        path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="could not be read") as err:
        load_checkpoint(_resnet8(), path)
    assert str(path) in str(err.value)


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "malicious.pth"
    torch.save({"model": _resnet8().state_dict(), "extra": _RunsShellCommand(f"touch {marker}")}, path)
    with pytest.raises(UserError, match="refused for safety") as err:
        load_checkpoint(_resnet8(), path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_other_architecture_lists_missing_and_unexpected_keys():
    resnet20 = create_model("resnet20")
    with pytest.raises(UserError) as err:
        load_checkpoint(_resnet8(), resnet20.state_dict())
    message = str(err.value)
    assert "ResNet" in message
    assert "unexpected keys: layer1.1.conv1.weight" in message
    assert "more)" in message  # 90 unexpected keys: the list is truncated


def test_other_number_of_classes_lists_both_shapes():
    with pytest.raises(UserError) as err:
        load_checkpoint(_resnet8(num_classes=100), _resnet8(num_classes=10).state_dict())
    assert "fc.weight (checkpoint [10, 64], model [100, 64])" in str(err.value)
    assert "fc.bias (checkpoint [10], model [100])" in str(err.value)


def test_other_family_lists_missing_keys_and_names_the_model_class():
    with pytest.raises(UserError) as err:
        load_checkpoint(create_model("wrn_16_1"), _resnet8().state_dict())
    assert "WideResNet" in str(err.value)
    assert "missing keys: block1.layer.0.bn1.weight" in str(err.value)


def test_checkpoint_without_weights_is_rejected():
    with pytest.raises(UserError, match="holds no model weights.*'epoch'"):
        load_checkpoint(_resnet8(), {"epoch": 3, "best_acc": 70.0})
