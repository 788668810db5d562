"""The frozen teacher of a distillation: its own memory layout, eval mode, no gradients, the same features."""

from __future__ import annotations

import pytest
import torch

from semckd_ray.models import create_model
from semckd_ray.teacher import FrozenTeacher, fold_batchnorm


def _teacher(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=10)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("fold", [True, False])
def test_frozen_teacher_gives_contiguous_features_as_accurate_as_the_plain_forward(layout, fold):
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        truth = _teacher().double()(x.double())
        plain = _teacher()(x)
        teacher = FrozenTeacher(_teacher(), layout, fold=fold)
        logits, feats = teacher(x)
    conv = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 3)
    assert conv.weight.is_contiguous(memory_format=layout)
    folded = not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    assert folded == fold
    for ours, ref, exact in zip([logits, *feats], [truth[0], *truth[1]], [plain[0], *plain[1]]):
        assert ours.is_contiguous()
        assert ours.shape == ref.shape
        # forward only, BatchNorm on running statistics: rounding is all that differs
        assert _rel(ours, ref) <= max(1e-6, 4 * _rel(exact, ref))


@pytest.mark.parametrize("name", ["resnet8x4", "vgg8", "wrn_16_1", "ShuffleV2", "MobileNetV2"])
def test_fold_batchnorm_keeps_every_feature(name):
    """Folded where a BatchNorm directly follows a convolution, in blocks (fx) and Sequentials (VGG, not traceable)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    model = model.double()
    folded = fold_batchnorm(model)
    count = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert 0 < count(model) and count(folded) < count(model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref, ours = model(x), folded(x)
    for a, b in zip([ref[0], *ref[1]], [ours[0], *ours[1]]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_fold_batchnorm_leaves_a_pair_whose_convolution_output_is_a_feature():
    class Tapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y), [y]

    model = Tapped().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    folded = fold_batchnorm(model)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x)[1][0], model(x)[1][0], rtol=0, atol=0)


def test_features_come_in_the_students_layout():
    teacher = FrozenTeacher(_teacher(), torch.contiguous_format, feature_format=torch.channels_last)
    _, feats = teacher(torch.randn(4, 3, 32, 32))
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats if f.dim() == 4)
    assert feats[-1].dim() == 2


def test_stays_frozen():
    teacher = FrozenTeacher(_teacher().train())
    assert not teacher.model.training
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("setting, expected", [(None, torch.channels_last), (False, torch.contiguous_format)])
def test_trainer_runs_the_teacher_in_the_configured_layout(tmp_path, monkeypatch, setting, expected):
    from semckd_ray import train_loop
    from semckd_ray.config import parse_train_config
    from semckd_ray.train_loop import LocalReporter, run_worker

    path = tmp_path / "teacher.pt"
    torch.save({"model": _teacher().state_dict()}, path)
    built = []

    class Recording(FrozenTeacher):
        def __init__(self, model, memory_format, feature_format):
            built.append((memory_format, feature_format))
            super().__init__(model, memory_format, feature_format)

    monkeypatch.setattr(train_loop, "FrozenTeacher", Recording)
    scaling = {} if setting is None else {"teacher_channels_last": setting}
    cfg = parse_train_config({
        "name": "layout", "data": {"dataset": "digits", "root": str(tmp_path / "data")},
        "student": {"model": "resnet8"}, "teacher": {"model": "resnet20", "checkpoint": str(path)},
        "method": {"name": "kd"}, "optim": {"epochs": 1, "batch_size": 64}, "scaling": scaling,
    }).model_dump(mode="json")  # fmt: skip
    final = run_worker(cfg, LocalReporter(tmp_path / "ckpt"))
    assert built == [(expected, torch.contiguous_format)]
    assert final["val_top1"] >= 0


@pytest.mark.parametrize("resume, unfinished, expected", [
    (False, "run-a", None),  # without --resume a teacher never continues an old training
    (True, "run-a", "latest"),  # with it, the interrupted training goes on from its checkpoint
    (True, None, None),  # nothing to continue: trained from the start
])
def test_ensure_teacher_continues_an_interrupted_teacher_only_when_resuming(tmp_path, monkeypatch, capsys,
                                                                          resume, unfinished, expected):
    from pathlib import Path

    from semckd_ray import trainer
    from semckd_ray.config import parse_train_config, read_yaml
    from semckd_ray.errors import UserError
    from semckd_ray.teacher import ensure_teacher

    smoke = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"
    cfg = parse_train_config(read_yaml(smoke), config_dir=smoke.parent)
    calls = []

    def find_training(teacher_cfg, which):
        assert which == "latest"
        if unfinished is None:
            raise UserError("--resume: no unfinished training")
        return unfinished, f"teacher-digits-{unfinished}"

    class Result:
        run_id = "run-b"

    monkeypatch.setattr(trainer, "find_finished_run", lambda teacher_cfg, digest: None)
    monkeypatch.setattr(trainer, "find_training", find_training)
    monkeypatch.setattr(trainer, "train", lambda teacher_cfg, resume=None: calls.append(resume) or Result())
    resolved = ensure_teacher(cfg, resume=resume)
    assert calls == [expected]
    assert resolved.teacher.checkpoint == "runs:/run-b"
    assert ("training the teacher resnet20 first" in capsys.readouterr().out) == (expected is None)
