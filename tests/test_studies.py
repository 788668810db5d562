"""The paper's other studies on digits, through the CLI on the 2-node cluster: a few-shot grid sweep,
a label-noise training, a linear probe of one of their students onto a dataset the test writes,
and the report that lays them out (issue 16)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from semckd_ray.tracking import client
from test_transfer import write_cifar10
from test_tune import trained_teacher

TEACHER = Path(__file__).resolve().parents[1] / "tune_configs" / "teacher_digits.yaml"

EPOCHS = 2
BASE = {
    "name": "studies", "seed": 0, "data": {"dataset": "digits"},
    "teacher": {"model": "resnet20", "train": str(TEACHER)}, "student": {"model": "resnet8"},
    "method": {"name": "kd"},
    "optim": {"epochs": EPOCHS, "batch_size": 32, "lr": 0.05, "lr_decay_epochs": [EPOCHS]},
    "checkpoint": {"every": EPOCHS}, "tracking": {"experiment": "studies"},
}


def cli(module: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.mark.slow
def test_fractions_noise_and_a_linear_probe_run_through_the_cli_and_the_report_lays_them_out(ray_cluster, workdir):
    trained_teacher(TEACHER, os.environ["MLFLOW_TRACKING_URI"], workdir)  # reused by both, as a finished run
    fewshot = {**BASE, "search": {"sampler": "grid", "scheduler": {"type": "none"},
                                  "space": {"data.train_fraction": {"type": "choice", "values": [0.5, 1.0]}}}}
    (workdir / "fewshot.yaml").write_text(yaml.safe_dump(fewshot))
    (workdir / "noise.yaml").write_text(yaml.safe_dump({**BASE, "data": {"dataset": "digits", "label_noise": 0.3}}))
    cli("semckd_ray.tune", "--config", "fewshot.yaml", cwd=workdir)
    cli("semckd_ray.train", "--config", "noise.yaml", cwd=workdir)

    mlflow = client(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("studies").experiment_id
    runs = mlflow.search_runs([experiment])
    trainings = {(r.data.params["data.train_fraction"], r.data.params["data.label_noise"]): r
                 for r in runs if r.data.tags.get("role") == "student"}
    assert sorted(trainings) == [("0.5", "0.0"), ("1.0", "0.0"), ("1.0", "0.3")], sorted(trainings)
    assert all(r.info.status == "FINISHED" and r.data.metrics["epoch"] == EPOCHS for r in trainings.values())
    # Every class keeps half its images (the val split held out first, the same in both trials).
    half, full = trainings[("0.5", "0.0")], trainings[("1.0", "0.0")]
    assert half.data.metrics["data_val_images"] == full.data.metrics["data_val_images"]
    assert abs(half.data.metrics["data_train_images"] - full.data.metrics["data_train_images"] / 2) <= 10
    # The noisy labels are an artifact of their run, 30 % of each class redrawn.
    noisy = trainings[("1.0", "0.3")]
    path = mlflow.download_artifacts(noisy.info.run_id, "data/label_noise.csv", str(workdir))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == noisy.data.metrics["data_noisy_labels"]
    assert abs(len(rows) - 0.3 * full.data.metrics["data_train_images"]) <= 10
    assert "data_noisy_labels" not in full.data.metrics or full.data.metrics["data_noisy_labels"] == 0

    # The full-data student, frozen, with a new linear layer on a 10-class dataset written here.
    root = write_cifar10(workdir / "target", per_batch=12, n_test=30)
    cli("semckd_ray.transfer", "--student", f"runs:/{full.info.run_id}", "--dataset", "cifar10", "--root", str(root),
        "--epochs", "2", "--val-size", "12", cwd=workdir)
    probe = [r for r in mlflow.search_runs([experiment]) if r.data.tags.get("role") == "transfer"]
    assert [(r.data.tags["student_run_id"], r.data.tags["transfer_dataset"], r.info.status) for r in probe] == [
        (full.info.run_id, "cifar10", "FINISHED")]

    cli("semckd_ray.report", "--experiment", "studies", "--out", str(workdir / "report"), cwd=workdir)
    report = (workdir / "report" / "report.md").read_text()
    for section in ("## Few-shot", "## Label noise", "## Transfer"):
        assert section in report, report
    with open(workdir / "report" / "fewshot.csv") as f:
        fractions = sorted(float(r["data.train_fraction"]) for r in csv.DictReader(f))
    assert fractions == [0.5, 1.0], fractions
    with open(workdir / "report" / "label_noise.csv") as f:
        rates = sorted(float(r["data.label_noise"]) for r in csv.DictReader(f))
    assert rates == [0.0, 0.3], rates
    with open(workdir / "report" / "transfer.csv") as f:
        transfer = list(csv.DictReader(f))
    assert [(r["transfer_dataset"], r["n"]) for r in transfer] == [("cifar10", "1")], transfer
