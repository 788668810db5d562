"""A Ray Train worker killed mid-training: the run resumes from its last checkpoint and ends as if nothing happened.

The reference is the same config run straight through in-process (``run_worker`` at world size 1,
one thread, as the Ray worker runs it): the final weights must be identical, bit for bit, and
MLflow must hold one run whose every epoch is logged exactly once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from semckd_ray.config import parse_train_config
from semckd_ray.models import create_model
from semckd_ray.tracking import client
from semckd_ray.train_loop import STATE_FILE, LocalReporter, run_worker

pytestmark = pytest.mark.slow

EPOCHS = 3
TIMEOUT_S = 600


def semckd_config(workdir: Path):
    teacher = workdir / "teacher.pt"
    torch.manual_seed(1)
    torch.save({"model": create_model("resnet8", num_classes=10).state_dict()}, teacher)
    return parse_train_config({
        "name": "faults",
        "data": {"dataset": "digits", "root": str(workdir / "data"), "val_size": 1000},  # 437 to train on
        "teacher": {"model": "resnet8", "checkpoint": str(teacher)},
        "student": {"model": "resnet8"},
        "method": {"name": "semckd", "beta": 10, "options": {"factor": 4, "proj_width": 1}},
        "optim": {"epochs": EPOCHS, "batch_size": 32, "lr": 0.05, "lr_decay_epochs": [2]},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 1},
        "checkpoint": {"every": 1},
        "tracking": {"experiment": "faults"},
    })


def train_workers() -> list[int]:
    """The pids of the live Ray Train workers in the session's cluster, where only this test trains."""
    import psutil  # ships with Ray
    from ray.util.state import list_actors

    pids = []
    for actor in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]):
        try:  # the state API lags: keep only live processes that are what it says they are
            process = psutil.Process(actor.pid)
            title = " ".join(process.cmdline())
            if process.status() != psutil.STATUS_ZOMBIE and title.startswith("ray::RayTrainWorker"):
                pids.append(actor.pid)
        except psutil.Error:
            continue
    return pids


class InThread(threading.Thread):
    """Runs ``fn`` and keeps its result or its exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exc:  # re-raised in the test
            self.error = exc


def final_weights(checkpoint_dir) -> dict[str, torch.Tensor]:
    return torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=True)["model"]


def test_killed_worker_resumes_from_its_checkpoint_to_the_uninterrupted_result(ray_cluster, workdir, capfd):
    from semckd_ray.nodes import RAY_RESULTS_DIR
    from semckd_ray.trainer import train

    cfg = semckd_config(workdir)
    mlflow = client(os.environ["MLFLOW_TRACKING_URI"])
    on_ray = InThread(lambda: train(cfg))
    on_ray.start()

    def the_run():
        experiment = mlflow.get_experiment_by_name("faults")
        runs = mlflow.search_runs([experiment.experiment_id]) if experiment else []
        return runs[0] if runs else None

    def wait(ready, what: str) -> None:
        while not ready():
            assert on_ray.is_alive(), f"the training ended before {what}: {on_ray.error!r}"
            assert time.monotonic() < deadline, f"no {what} after {TIMEOUT_S} s"
            time.sleep(0.5)

    deadline = time.monotonic() + TIMEOUT_S
    wait(lambda: the_run() is not None, "MLflow run")
    run_id = the_run().info.run_id
    # Ray Train records a checkpoint in this file once it has it: killing the worker any earlier
    # would test a restart from scratch.
    snapshot = workdir / RAY_RESULTS_DIR / f"{cfg.name}-{run_id}" / "checkpoint_manager_snapshot.json"
    wait(lambda: snapshot.exists() and "epoch_00001" in snapshot.read_text(), "checkpoint of epoch 1")
    victims = train_workers()
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)

    successors = set()
    while on_ray.is_alive():
        assert time.monotonic() < deadline, "the training did not finish after its worker was killed"
        successors |= set(train_workers()) - set(victims)
        time.sleep(2)
    if on_ray.error is not None:
        raise on_ray.error
    result = on_ray.result
    assert successors, "no worker replaced the killed one"
    assert "resuming after epoch" in capfd.readouterr().out  # from a checkpoint, not from scratch

    # The reference starts only now: run_worker seeds the process-wide RNG, which the driver's own
    # model building would draw from if the two ran at the same time in this process.
    reference = LocalReporter(workdir / "reference")
    run_worker(cfg.model_dump(mode="json"), reference)
    resumed = final_weights(result.checkpoint_path)
    uninterrupted = final_weights(sorted(reference.root.glob("epoch_*"))[-1])
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key

    run = the_run()
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert len(mlflow.search_runs([run.info.experiment_id])) == 1
    for key in ("epoch", "train_total", "val_top1", "train_semckd"):
        history = sorted(mlflow.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, EPOCHS + 1)), key
        if key != "epoch":  # the values are those of the uninterrupted run, epoch by epoch
            assert [m.value for m in history] == [m[key] for m in reference.metrics], key
