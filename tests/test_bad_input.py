"""Bad input through the real command lines: exit status 2, one clear paragraph, no traceback, no Ray.

Every case is a ``python -m semckd_ray.train`` / ``python -m semckd_ray.tune`` subprocess in its
own folder. A command spends nearly all of its time importing torch before it can fail, so the
cases start together and the file costs about as much as its slowest case. A training that
diverges is the one bad input found only once training runs: it stops cleanly and says why.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from paths import REPO
from semckd_ray.config import parse_train_config, read_yaml
from semckd_ray.models import create_model
from semckd_ray.tracking import client

TEACHER_CONFIG = REPO / "tune_configs" / "teacher_digits.yaml"  # vanilla: no teacher needed
SMOKE_CONFIG = REPO / "tune_configs" / "smoke.yaml"  # SemCKD, with a search section
CLI_TIMEOUT_S = 600  # each command fails within seconds when alone; the cases share 2 loaded cores
PARALLEL = 8


def run_command(module: str, args: list[str], cwd: Path,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``cwd``, with its own MLflow store and no Ray address unless ``env`` names one."""
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def assert_user_error(result: subprocess.CompletedProcess, *needles: str, ray_may_run: bool = False) -> str:
    """Exit status 2 and one ``error:`` paragraph, last on stderr, holding every needle; returns it."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, f"exit status {result.returncode}:\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    if not ray_may_run:
        assert "Started a local Ray instance" not in output, output[-4000:]
    assert "error: " in result.stderr, result.stderr[-4000:]
    error = result.stderr[result.stderr.rindex("error: "):].strip()
    assert "\n\n" not in error, error
    for needle in needles:
        assert needle in error, f"{needle!r} not in the error:\n{error}"
    return error


# ------------------------------------------------------------------------------------------
# What each case writes into its folder before running


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def smoke_with_space(folder: Path, space: dict) -> list[str]:
    raw = read_yaml(SMOKE_CONFIG)
    raw["teacher"]["train"] = str(TEACHER_CONFIG)
    raw["search"]["space"] = space
    return ["--config", str(write_yaml(folder / "sweep.yaml", raw))]


def student_of(teacher_file: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    """A SemCKD student on digits whose resnet20 teacher's checkpoint is the file ``teacher_file`` writes."""

    def setup(folder: Path) -> list[str]:
        raw = read_yaml(SMOKE_CONFIG)
        raw["teacher"] = {"model": "resnet20", "checkpoint": str(teacher_file(folder))}
        return ["--config", str(write_yaml(folder / "student.yaml", raw)), "--set", f"data.root={folder / 'data'}"]

    return setup


def random_bytes(folder: Path) -> Path:
    path = folder / "teacher.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def resnet8_weights(folder: Path) -> Path:
    path = folder / "teacher.pt"
    torch.save({"model": create_model("resnet8", num_classes=10).state_dict()}, path)
    return path


def truncated_cifar100(folder: Path) -> list[str]:
    """The cifar-100-python layout, complete but for a training pickle cut off half-way."""
    args = config_with(TEACHER_CONFIG, "data.dataset=cifar100")(folder)
    cifar = folder / "data" / "cifar-100-python"
    cifar.mkdir()
    rows = np.zeros((4, 3072), dtype=np.uint8)
    blobs = {
        "train": pickle.dumps({b"data": rows, b"fine_labels": [0, 1, 2, 3]}),
        "test": pickle.dumps({b"data": rows, b"fine_labels": [0, 1, 2, 3]}),
        "meta": pickle.dumps({b"fine_label_names": [f"c{i}" for i in range(100)]}),
    }
    blobs["train"] = blobs["train"][: len(blobs["train"]) // 2]
    for name, blob in blobs.items():
        (cifar / name).write_bytes(blob)
    return args


def png_as_config(folder: Path) -> list[str]:
    """A picture given as the experiment file: bytes that are not text."""
    path = folder / "experiment.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    return ["--config", str(path)]


def config_with(config: Path, *overrides: str) -> Callable[[Path], list[str]]:
    """The experiment file ``config`` with ``--set`` overrides, reading data from an empty folder."""

    def setup(folder: Path) -> list[str]:
        (folder / "data").mkdir()
        return ["--config", str(config), "--set", f"data.root={folder / 'data'}",
                *(arg for item in overrides for arg in ("--set", item))]

    return setup


@dataclass(frozen=True)
class Case:
    id: str
    module: str  # semckd_ray.train or semckd_ray.tune
    setup: Callable[[Path], list[str]]  # writes what the case needs, returns the command's arguments
    expected: tuple[str, ...]  # each must appear in the error

    def __str__(self) -> str:
        return self.id


TRAIN, TUNE = "semckd_ray.train", "semckd_ray.tune"
NO_PARAMS = SimpleNamespace(params={})
CASES = [
    Case("unknown-model", TRAIN, config_with(TEACHER_CONFIG, "student.model=resnet9000"),
         ("student.model", "resnet9000", "valid models", "resnet8x4")),
    Case("unknown-method", TRAIN, config_with(TEACHER_CONFIG, "method.name=magic"),
         ("method", "magic", "valid methods", "semckd")),
    Case("unknown-dataset", TRAIN, config_with(TEACHER_CONFIG, "data.dataset=imagenet"),
         ("data.dataset", "'cifar100'", "'digits'")),
    Case("typo-in-a-key", TRAIN, config_with(TEACHER_CONFIG, "optim.epohcs=3"),
         ("optim.epohcs", "unknown key", "allowed keys", "epochs")),
    Case("beta-below-zero", TRAIN, config_with(SMOKE_CONFIG, "method.beta=-1"),
         ("method.beta", "greater than or equal to 0")),
    Case("factor-leaves-an-empty-embedding", TRAIN, config_with(SMOKE_CONFIG, "method.options.factor=64"),
         ("method.options", "factor 64", "empty", "factor <= 32")),
    Case("batch-below-two", TRAIN, config_with(TEACHER_CONFIG, "optim.batch_size=1"),
         ("optim.batch_size", "greater than or equal to 2")),
    Case("batch-not-divisible-by-the-workers", TRAIN,
         config_with(TEACHER_CONFIG, "optim.batch_size=33", "scaling.num_workers=2"),
         ("optim.batch_size=33", "the global batch", "scaling.num_workers=2", "32 or 34")),
    Case("validation-split-larger-than-the-training-set", TRAIN, config_with(TEACHER_CONFIG, "data.val_size=5000"),
         ("data.val_size", "[0, 1437)", "5000")),
    Case("non-finite-learning-rate", TRAIN, config_with(TEACHER_CONFIG, "optim.lr=.inf"),
         ("optim.lr", "finite")),
    Case("override-that-is-not-yaml", TRAIN, config_with(TEACHER_CONFIG, "name=:"),
         ("--set 'name=:'", "not valid YAML")),
    Case("config-file-that-is-not-text", TRAIN, png_as_config,
         ("experiment.yaml", "is not a YAML text file", "byte 0x89 at offset 0 is not UTF-8")),
    Case("boolean-for-a-number", TRAIN, config_with(TEACHER_CONFIG, "optim.epochs=true"),
         ("optim.epochs", "must be an integer", "not the boolean true")),
    Case("search-bounds-inverted", TUNE, lambda f: smoke_with_space(
        f, {"method.beta": {"type": "loguniform", "low": 300.0, "high": 5.0}}),
         ("search.space.method.beta", "inverted", "low=300.0", "high=5.0")),
    Case("search-bounds-empty", TUNE, lambda f: smoke_with_space(
        f, {"method.options.soft": {"type": "uniform", "low": 1.0, "high": 1.0}}),
         ("search.space.method.options.soft", "empty", "low=1.0")),
    Case("search-choice-empty", TUNE, lambda f: smoke_with_space(
        f, {"method.options.factor": {"type": "choice", "values": []}}),
         ("search.space.method.options.factor", "non-empty")),
    Case("search-value-out-of-range", TUNE, lambda f: smoke_with_space(
        f, {"method.beta": {"type": "uniform", "low": -5.0, "high": 5.0}}),
         ("search.space.method.beta", "-5.0", "greater than or equal to 0")),
    Case("teacher-checkpoint-missing", TRAIN, student_of(lambda folder: folder / "absent.pt"),
         ("teacher.checkpoint", "absent.pt", "does not exist")),
    Case("teacher-checkpoint-corrupt", TRAIN, student_of(random_bytes),
         ("teacher.checkpoint", "teacher.pt", "could not be read", "corrupt")),
    Case("teacher-checkpoint-of-another-architecture", TRAIN, student_of(resnet8_weights),
         ("teacher.checkpoint", "teacher.model='resnet20'", "does not fit", "missing keys", "layer1.1.conv1.weight")),
    Case("dataset-folder-missing", TRAIN, config_with(TEACHER_CONFIG, "data.dataset=cifar100"),
         ("CIFAR-100 not found", "cifar-100-python", "data.download")),
    Case("dataset-file-truncated", TRAIN, truncated_cifar100,
         ("cifar-100-python/train", "cannot be read as a CIFAR pickle", "truncated")),
]


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[str, subprocess.CompletedProcess | subprocess.TimeoutExpired]:
    """Runs every case this session selected, all at once; their results by case id."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and "case" in getattr(item, "callspec", NO_PARAMS).params]

    def run(case: Case) -> subprocess.CompletedProcess | subprocess.TimeoutExpired:
        folder = tmp_path_factory.mktemp(case.id)
        try:
            return run_command(case.module, case.setup(folder), cwd=folder)
        except subprocess.TimeoutExpired as exc:  # that case's failure, not the others'
            return exc

    # The session's temporary root, made once here: made by the first of the threads below, the
    # others' mktemp would race with it.
    tmp_path_factory.getbasetemp()
    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(zip((c.id for c in selected), pool.map(run, selected)))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_one_clear_error_before_anything_runs(case, outcomes):
    outcome = outcomes[case.id]
    if isinstance(outcome, subprocess.TimeoutExpired):
        raise outcome
    assert_user_error(outcome, *case.expected)


@pytest.mark.slow  # it has to ask a cluster how big it is
def test_more_workers_than_the_cluster_holds_is_refused_before_any_worker_starts(ray_cluster, tmp_path):
    setup = config_with(TEACHER_CONFIG, "scaling.num_workers=64", "optim.batch_size=128")  # 2 per worker
    result = run_command(TRAIN, setup(tmp_path), cwd=tmp_path,
                         env={"RAY_ADDRESS": os.environ["RAY_ADDRESS"]})
    assert_user_error(result, "64 CPUs", "scaling.num_workers=64", "the cluster has 2", "Lower scaling.num_workers",
                      ray_may_run=True)
    assert "RayTrainWorker" not in result.stdout + result.stderr
    mlflow = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()]) == []


# ------------------------------------------------------------------------------------------
# A training that diverges


def diverging_config(tmp_path, epochs: int = 3) -> dict:
    return parse_train_config({
        "name": "diverges",
        "data": {"dataset": "digits", "root": str(tmp_path / "data")},
        "student": {"model": "resnet8"},
        "method": {"name": "vanilla"},
        "optim": {"epochs": epochs, "batch_size": 64, "lr": 1e8},
        "checkpoint": {"every": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "diverges"},
    })


def test_a_diverging_run_stops_after_the_epoch_and_is_marked_failed_with_its_reason(tmp_path, monkeypatch, capsys):
    from semckd_ray import trainer
    from semckd_ray.train_loop import LocalReporter, run_worker

    cfg = diverging_config(tmp_path)
    reporter = LocalReporter(tmp_path / "checkpoints")

    class InProcessTrainer:  # what Ray Train does for one worker, without Ray
        def fit(self):
            final = run_worker(cfg.model_dump(mode="json"), reporter, run_id=run_id, tracking_uri=cfg.tracking.uri)
            saved = [m for m in reporter.metrics if (reporter.root / f"epoch_{int(m['epoch']):05d}").exists()]
            # Like Ray Train's Result: the metrics of the latest checkpoint, and what rank 0 returned.
            return SimpleNamespace(metrics=saved[-1] if saved else None, return_value=final, checkpoint=None)

    monkeypatch.setattr(trainer, "build_trainer", lambda *args, **kwargs: InProcessTrainer())
    run_id = trainer.start_run(cfg)
    result = trainer.fit(cfg, run_id=run_id)

    assert result.metrics["diverged"] == 1.0
    assert len(reporter.metrics) == result.metrics["epoch"] < cfg.optim.epochs  # no epoch after the first bad one
    assert not (reporter.root / f"epoch_{int(result.metrics['epoch']):05d}").exists()  # a diverged state is never saved
    assert "stopped: non-finite training loss" in capsys.readouterr().out
    run = client(cfg.tracking.uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert "non-finite training loss" in run.data.tags["stopped_reason"]
    assert "lower optim.lr" in run.data.tags["stopped_reason"]
    assert "diverged in epoch" in run.data.tags["failure_reason"]
    assert run.data.metrics["diverged"] == 1.0


@pytest.mark.slow
def test_a_sweep_goes_on_past_a_diverging_trial(ray_cluster, workdir):
    from semckd_ray.tune import sweep

    raw = diverging_config(workdir, epochs=2).model_dump(mode="json")
    raw["search"] = {"num_samples": 2, "seed": 0, "scheduler": {"type": "none"},
                     "space": {"optim.lr": {"type": "choice", "values": [0.05, 1e8]}}}
    summary = sweep(raw, workdir)

    mlflow = client(summary["tracking_uri"])
    trials = {row["searched.optim.lr"]: row for row in summary["trials"]}
    assert set(trials) == {"0.05", "100000000.0"}, summary["trials"]
    diverged = mlflow.get_run(trials["100000000.0"]["run_id"])
    assert diverged.info.status == "FAILED"
    assert "non-finite training loss" in diverged.data.tags["stopped_reason"]
    healthy = mlflow.get_run(trials["0.05"]["run_id"])
    assert healthy.info.status == "FINISHED" and healthy.data.metrics["epoch"] == 2
    assert summary["best"]["run_id"] == healthy.info.run_id
    assert mlflow.get_run(summary["parent_run_id"]).info.status == "FINISHED"
