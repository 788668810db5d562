"""``python -m semckd_ray.transfer``: a frozen student's linear probe on another dataset, logged in MLflow.

One one-epoch resnet8 student trained on ``digits`` in this process (no Ray) logs into an MLflow store
in a temporary folder; the probes train on a small CIFAR-10-format dataset the tests write (60
training images, 12 of them held out for validation, 30 test images) for a few epochs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from semckd_ray import transfer
from semckd_ray.config import parse_train_config
from semckd_ray.data import eval_loader, load_dataset
from semckd_ray.errors import UserError
from semckd_ray.models import create_model, load_checkpoint
from semckd_ray.tracking import client
from semckd_ray.train_loop import STATE_FILE, LocalReporter, accuracy_counts, run_worker
from semckd_ray.trainer import register_model, start_run
from test_bad_input import assert_user_error, run_command

EPOCHS = 3
PER_EPOCH = ("train_loss", "train_top1", "val_top1", "test_top1", "test_top5", "lr")


def write_cifar10(root: Path, per_batch: int = 12, n_test: int = 30) -> Path:
    """A small CIFAR-10 in the layout of cifar-10-python.tar.gz, each class a brightness (learnable)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        labels = rng.integers(0, 10, size=n)
        data = (labels[:, None] * 20 + rng.integers(0, 60, size=(n, 3072))).astype(np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels.tolist()}))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"class{i}" for i in range(10)]}))
    return root


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A finished one-epoch digits student: its MLflow run, its checkpoint file, and the target dataset."""
    root = tmp_path_factory.mktemp("transfer")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = parse_train_config({
        "name": "transfer-student",
        "data": {"dataset": "digits", "root": str(root / "data")},
        "student": {"model": "resnet8"},
        "method": {"name": "vanilla"},
        "optim": {"epochs": 1, "batch_size": 64, "lr": 0.05},
        "tracking": {"uri": uri, "experiment": "students", "register_model": "transfer-resnet8"},
    })
    mlflow_client = client(uri)
    mlflow_client.create_experiment("students", artifact_location=(root / "artifacts").as_uri())
    run_id = start_run(cfg)
    run_worker(cfg.model_dump(mode="json"), LocalReporter(root / "ckpt"), run_id=run_id, tracking_uri=uri)
    checkpoint = root / "ckpt" / "epoch_00001" / STATE_FILE
    return SimpleNamespace(root=root, uri=uri, run_id=run_id, checkpoint=checkpoint, client=mlflow_client,
                           registered=register_model(cfg, run_id), target=write_cifar10(root / "target"),
                           weights=torch.load(checkpoint, weights_only=True)["model"])


def probe_args(student, spec: str, *more: str) -> list[str]:
    return ["--student", spec, "--dataset", "cifar10", "--root", str(student.target), "--val-size", "12",
            "--epochs", str(EPOCHS), "--batch-size", "16", "--tracking-uri", student.uri, *more]


def run_probe(student, monkeypatch, spec: str, *more: str):
    """``transfer.main`` on ``spec``; the MLflow run it created and the backbone it used."""
    loaded = []
    original = transfer.load_student

    def spy(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(transfer, "load_student", spy)
    before = {r.info.run_id for r in student.client.search_runs(_experiment_ids(student.client))}
    assert transfer.main(probe_args(student, spec, *more)) == 0
    (run,) = [r for r in student.client.search_runs(_experiment_ids(student.client)) if r.info.run_id not in before]
    return run, loaded[0].model


def _experiment_ids(mlflow_client) -> list[str]:
    return [e.experiment_id for e in mlflow_client.search_experiments()]


def history(mlflow_client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(mlflow_client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_a_local_checkpoint_trains_a_linear_probe_that_is_logged_and_reproduces_its_numbers(
        student, monkeypatch, capsys, tmp_path):
    run, backbone = run_probe(student, monkeypatch, str(student.checkpoint), "--experiment", "transfer-test")
    out = capsys.readouterr().out
    assert out.count("[transfer cifar10] epoch ") == EPOCHS and f"transfer run {run.info.run_id}" in out

    # The backbone is the student, bit for bit, after training: BatchNorm statistics included.
    assert backbone.state_dict().keys() == student.weights.keys()
    assert all(torch.equal(v.cpu(), student.weights[k]) for k, v in backbone.state_dict().items())
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())

    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags
    assert run.info.run_name == "transfer cifar10 transfer-student-vanilla-resnet8"
    assert student.client.get_experiment(run.info.experiment_id).name == "transfer-test"
    tags = run.data.tags
    assert tags["role"] == "transfer" and tags["transfer_dataset"] == "cifar10"
    assert tags["student_model"] == "resnet8" and tags["student_method"] == "vanilla"
    assert "student_run_id" not in tags  # a local file: no run known
    params = run.data.params
    assert {k: params[k] for k in ("epochs", "lr", "momentum", "weight_decay", "lr_decay_epochs", "batch_size",
                                   "augment", "normalize", "seed", "val_size", "train_images", "test_images",
                                   "student_model", "student_method", "student_dataset", "feature_dim")} == {
        "epochs": "3", "lr": "0.05", "momentum": "0.9", "weight_decay": "0.0005", "lr_decay_epochs": "[150, 180, 210]",
        "batch_size": "16", "augment": "True", "normalize": "target", "seed": "0", "val_size": "12",
        "train_images": "48", "test_images": "30", "student_model": "resnet8", "student_method": "vanilla",
        "student_dataset": "digits", "feature_dim": "64"}

    for key in PER_EPOCH:
        steps = [m.step for m in student.client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), key
    metrics = run.data.metrics
    val = history(student.client, run.info.run_id, "val_top1")
    test = history(student.client, run.info.run_id, "test_top1")
    best_epoch = int(metrics["best_epoch"])
    assert best_epoch == 1 + val.index(max(val))  # the first epoch of the best val top-1
    assert metrics["test_top1_at_best_val"] == test[best_epoch - 1]
    assert metrics["best_val_top1"] == max(val)
    assert metrics["test_top1"] == test[-1]  # the last epoch's
    assert history(student.client, run.info.run_id, "lr") == [0.05] * EPOCHS

    # linear.pt on the backbone's test features gives the logged numbers.
    assert tags["checkpoint.linear.path"] == "checkpoints/linear.pt"
    local = student.client.download_artifacts(run.info.run_id, "checkpoints/linear.pt", str(tmp_path))
    saved = torch.load(local, weights_only=True)
    model = create_model("resnet8", num_classes=10)
    load_checkpoint(model, student.checkpoint)
    splits = load_dataset("cifar10", student.target, val_size=12, seed=0)
    assert tuple(saved["mean"]) == splits.mean and saved["best_epoch"] == best_epoch
    feats, labels = transfer._features(model.eval(), eval_loader(splits, "test", transfer.EVAL_BATCH_SIZE))
    for weights, logged in (("model", "test_top1"), ("model_at_best_val", "test_top1_at_best_val")):
        head = torch.nn.Linear(saved["in_features"], saved["num_classes"])
        head.load_state_dict(saved[weights])
        with torch.no_grad():
            top1, _ = accuracy_counts(head(feats), labels)
        assert 100.0 * top1 / len(labels) == metrics[logged], weights


def test_a_student_run_goes_into_its_experiment_and_the_same_seed_gives_the_same_numbers(student, monkeypatch):
    spec = f"runs:/{student.run_id}"
    run, _ = run_probe(student, monkeypatch, spec)
    assert run.info.experiment_id == student.client.get_run(student.run_id).info.experiment_id
    assert run.data.tags["student_run_id"] == student.run_id
    assert run.info.run_name == f"transfer cifar10 {student.client.get_run(student.run_id).info.run_name}"
    again, _ = run_probe(student, monkeypatch, spec)
    for key in PER_EPOCH:
        assert history(student.client, again.info.run_id, key) == history(student.client, run.info.run_id, key), key
    other, _ = run_probe(student, monkeypatch, spec, "--seed", "1")
    assert history(student.client, other.info.run_id, "train_loss") != history(student.client, run.info.run_id,
                                                                               "train_loss")


def test_a_registered_student_and_an_official_checkpoint_with_model(student, monkeypatch, tmp_path):
    run, _ = run_probe(student, monkeypatch, student.registered, "--no-augment", "--epochs", "1")
    assert run.info.status == "FINISHED" and run.data.tags["student_run_id"] == student.run_id
    assert run.data.params["augment"] == "False"

    bare = tmp_path / "official.pth"
    torch.save({"model": student.weights}, bare)  # the official format: no config
    run, backbone = run_probe(student, monkeypatch, str(bare), "--model", "resnet8", "--epochs", "2",
                              "--normalize", "cifar100", "--val-size", "0")
    assert run.data.tags["student_model"] == "resnet8" and run.data.params["normalize"] == "cifar100"
    # No val split: the last epoch is the selected one.
    metrics = run.data.metrics
    assert "val_top1" not in metrics and metrics["best_epoch"] == 2
    assert metrics["test_top1_at_best_val"] == metrics["test_top1"]
    assert run.data.params["mean"] == str(list(transfer.CIFAR100_MEAN))
    assert all(torch.equal(v.cpu(), student.weights[k]) for k, v in backbone.state_dict().items())
    with pytest.raises(UserError, match="--model NAME"):
        transfer.main(probe_args(student, str(bare)))


def test_a_failure_during_training_marks_the_run_failed_with_its_reason(student, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(transfer, "_train_epoch", broken)
    before = {r.info.run_id for r in student.client.search_runs(_experiment_ids(student.client))}
    with pytest.raises(RuntimeError, match="out of memory"):
        transfer.main(probe_args(student, str(student.checkpoint)))
    (run,) = [r for r in student.client.search_runs(_experiment_ids(student.client)) if r.info.run_id not in before]
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "RuntimeError: out of memory, say"


def _bad(tmp_path: Path, student) -> dict[str, tuple[list[str], str]]:
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": [1, 2, 3]}, foreign)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    return {
        "unknown dataset": (["--dataset", "imagenet"], "valid datasets: cifar10, cifar100, digits"),
        "missing file": (["--student", str(tmp_path / "nope.pt")], "does not exist"),
        "missing run": (["--student", "runs:/0123456789abcdef0123456789abcdef"], "no MLflow run"),
        "unknown format": (["--student", str(foreign), "--model", "resnet8"], "holds no model weights"),
        "unreadable file": (["--student", str(text), "--model", "resnet8"], "could not be read"),
        "other architecture": (["--student", str(student.checkpoint), "--model", "resnet20"], "does not fit"),
        "unknown model": (["--student", str(student.checkpoint), "--model", "resnet9"], "valid models:"),
        "no val split images": (["--val-size", "60"], "--val-size must be an integer in [0, 60)"),
        "bad epochs": (["--epochs", "0"], "--epochs must be at least 1"),
        "negative val size": (["--val-size", "-1"], "--val-size must be an integer"),
        "missing dataset files": (["--root", str(tmp_path / "empty")], "either pass --download"),
    }


@pytest.mark.parametrize("case", ["unknown dataset", "missing file", "missing run", "unknown format",
                                  "unreadable file", "other architecture", "unknown model", "no val split images",
                                  "bad epochs", "negative val size", "missing dataset files"])
def test_bad_input_is_one_clear_error_before_any_run(student, tmp_path, case):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra, needle = _bad(tmp_path, student)[case]
    base = probe_args(student, str(student.checkpoint))
    base[base.index("--tracking-uri") + 1] = uri
    if case == "missing run":
        base[base.index("--tracking-uri") + 1] = student.uri
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in base:
            base[base.index(flag) + 1] = value
        else:
            base += [flag, value]
    runs_before = len(client(student.uri).search_runs(_experiment_ids(client(student.uri))))
    with pytest.raises(UserError, match=None) as caught:
        transfer.main(base)
    assert needle in str(caught.value)
    assert len(client(student.uri).search_runs(_experiment_ids(client(student.uri)))) == runs_before
    if case != "missing run":
        assert not (tmp_path / "mlflow.db").exists() or not client(uri).search_runs(_experiment_ids(client(uri)))


def test_the_command_reports_a_bad_dataset_with_exit_status_2(tmp_path):
    result = run_command("semckd_ray.transfer", ["--student", "runs:/abc", "--dataset", "imagenet"], tmp_path)
    assert_user_error(result, "unknown dataset 'imagenet'", "valid datasets: cifar10, cifar100, digits")
