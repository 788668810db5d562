"""The per-worker loop in-process (world size 1, no Ray): it learns, and it resumes bit-exactly."""

import pytest
import torch

from semckd_ray.config import parse_train_config
from semckd_ray.models import create_model
from semckd_ray.train_loop import STATE_FILE, LocalReporter, lr_at, run_worker


def config(tmp_path, **sections):
    raw = {
        "name": "loop",
        "data": {"dataset": "digits", "root": str(tmp_path / "data")},
        "student": {"model": "resnet8"},
        "method": {"name": "vanilla"},
        "optim": {"epochs": 2, "batch_size": 32, "lr": 0.05},
        "checkpoint": {"every": 1},
    }
    raw.update(sections)
    return parse_train_config(raw).model_dump(mode="json")


def test_learns_digits_well_above_chance(tmp_path):
    cfg = config(tmp_path, optim={"epochs": 5, "batch_size": 32, "lr": 0.05, "lr_decay_epochs": [3]})
    reporter = LocalReporter(tmp_path / "ckpt")
    final = run_worker(cfg, reporter)
    assert len(reporter.metrics) == 5
    assert [m["epoch"] for m in reporter.metrics] == [1, 2, 3, 4, 5]
    # The score comes first: Tune's progress table shows a trial's first four metrics.
    assert all(list(m)[:4] == ["best_val_top1", "val_top1", "epoch", "lr"] for m in reporter.metrics)
    assert final["best_val_top1"] > 60.0  # chance is 10%
    assert final["test_top1_at_best_val"] > 60.0
    for key in ("train_ce", "train_total", "train_top1", "train_top5", "val_top1", "val_top5", "lr",
                "epoch_seconds", "images_per_s", "test_top1_last"):
        assert key in final


class _Interrupt(Exception):
    pass


class InterruptingReporter(LocalReporter):
    """Dies right after the first checkpoint has been reported, like a worker killed mid-run."""

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir is not None:
            raise _Interrupt


def state_dicts(folder):
    latest = sorted(folder.glob("epoch_*"))[-1]
    blob = torch.load(latest / STATE_FILE, weights_only=True)
    return blob["model"], blob["method"], blob["optimizer"]


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    teacher_path = tmp_path / "teacher.pt"
    torch.manual_seed(1)
    torch.save({"model": create_model("resnet14", num_classes=10).state_dict()}, teacher_path)
    cfg = config(tmp_path, method={"name": "semckd", "beta": 10}, teacher={"model": "resnet14", "checkpoint": str(teacher_path)})

    straight = LocalReporter(tmp_path / "straight")
    run_worker(cfg, straight)

    interrupted = InterruptingReporter(tmp_path / "resumed")
    with pytest.raises(_Interrupt):
        run_worker(cfg, interrupted)
    assert [m["epoch"] for m in interrupted.metrics] == [1]
    resumed = LocalReporter(tmp_path / "resumed")
    run_worker(cfg, resumed)
    assert [m["epoch"] for m in resumed.metrics] == [2]  # epoch 1 was not trained again

    for a, b in zip(state_dicts(tmp_path / "straight"), state_dicts(tmp_path / "resumed")):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key
    assert resumed.metrics[-1]["train_total"] == straight.metrics[-1]["train_total"]


def test_step_schedule_matches_the_official_code(tmp_path):
    from semckd_ray.config import TrainConfig

    cfg = TrainConfig.model_validate(config(tmp_path, optim={"epochs": 240, "lr": 0.05}))
    assert lr_at(cfg, 1) == lr_at(cfg, 150) == 0.05
    assert lr_at(cfg, 151) == pytest.approx(0.005)
    assert lr_at(cfg, 181) == pytest.approx(0.0005)
    assert lr_at(cfg, 240) == pytest.approx(0.00005)
