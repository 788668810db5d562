"""MLflow out of reach: refused up front when it is down at the start, survived when it goes down later."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from servers import free_port, http_status, start_mlflow_server, wait_until
from semckd_ray.tracking import client
from test_bad_input import SMOKE_CONFIG, TEACHER_CONFIG, TRAIN, TUNE, assert_user_error, run_command

TRAIN_TIMEOUT_S = 600


def closed_port_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there once free_port has closed it


def test_an_unreachable_tracking_server_is_refused_before_ray_starts(tmp_path):
    uri = closed_port_uri()

    def run(module: str, config: Path):
        folder = tmp_path / module
        folder.mkdir()
        return run_command(module, ["--config", str(config), "--set", f"data.root={folder / 'data'}"], cwd=folder,
                           env={"MLFLOW_TRACKING_URI": uri})

    with ThreadPoolExecutor(2) as pool:  # both commands at once: each mostly waits for its imports
        results = list(pool.map(run, (TRAIN, TUNE), (TEACHER_CONFIG, SMOKE_CONFIG)))
    for result in results:
        assert_user_error(result, uri, "unreachable", "mlflow server --host 127.0.0.1", "MLFLOW_TRACKING_URI")


# ------------------------------------------------------------------------------------------
# An outage in the middle of a training


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 that a test stops and starts again on the same port and store."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process, _ = start_mlflow_server(self.root, self.port)

    def stop(self) -> None:
        """Stop the server and the uvicorn process it runs: the process group it leads."""
        if self.process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(20)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            if http_status(f"{self.url}/health", timeout_s=2) == 0:
                break
        wait_until(lambda: http_status(f"{self.url}/health", timeout_s=2) == 0, 60, "the MLflow server to stop")
        self.process = None


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


EPOCHS = 6
# A resnet8 on 437 training images (1000 held out): a few seconds an epoch, most of them the epoch's
# own evaluation and checkpoint, so the outage still begins with epochs left to train.
SHORT_EPOCHS = ("--set", "student.model=resnet8", "--set", "data.val_size=1000")


@pytest.mark.slow
def test_a_training_that_ends_during_an_outage_loses_nothing_and_sync_sends_it(ray_cluster, mlflow_server, tmp_path):
    """The server goes down after epoch 1 and is still down when the training ends: the training goes
    on without waiting for it, the worker spools what it could not send (metrics, checkpoint files),
    the driver spools the run's close, and ``python -m semckd_ray.sync`` sends all of it once."""
    output = tmp_path / "train.log"
    # The driver gives up after one retry instead of MLflow's default minutes of them (the workers,
    # whose environment is the cluster's, keep the default: they never wait for the server).
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "PYTHONUNBUFFERED": "1",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    storage_root = tmp_path / "ray_results"
    command = [sys.executable, "-m", TRAIN, "--config", str(TEACHER_CONFIG), "--set", f"optim.epochs={EPOCHS}",
               *SHORT_EPOCHS, "--set", f"data.root={tmp_path / 'data'}", "--set", "tracking.experiment=outage",
               "--set", f"tracking.storage_path={storage_root}"]
    with open(output, "w") as log:
        training = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    mlflow = client(mlflow_server.url)

    def logged_epochs() -> list[int]:
        experiment = mlflow.get_experiment_by_name("outage")
        runs = mlflow.search_runs([experiment.experiment_id]) if experiment else []
        return [m.step for m in mlflow.get_metric_history(runs[0].info.run_id, "epoch")] if runs else []

    try:
        wait_until(lambda: logged_epochs() or training.poll() is not None, TRAIN_TIMEOUT_S, "epoch 1 in MLflow",
                   output.read_text)
        assert training.poll() is None, output.read_text()[-4000:]
        mlflow_server.stop()
        assert training.wait(TRAIN_TIMEOUT_S) == 0, output.read_text()[-6000:]
    finally:
        if training.poll() is None:
            os.killpg(training.pid, signal.SIGKILL)
            training.wait()
    text = output.read_text()
    assert "Traceback" not in text and "python -m semckd_ray.sync" in text, text[-6000:]
    printed = [int(k) for k in re.findall(rf"\] epoch (\d+)/{EPOCHS} loss", text)]
    # Every epoch trained (none waited for MLflow), and said so in one line, not in Ray Train's dumps too.
    assert printed == list(range(1, EPOCHS + 1)), text[-6000:]
    assert "Reporting training result" not in text, text[-6000:]

    mlflow_server.start()
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("outage").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "RUNNING" and logged_epochs() != list(range(1, EPOCHS + 1))
    synced = subprocess.run([sys.executable, "-m", "semckd_ray.sync", "--storage", str(storage_root),
                             "--tracking-uri", mlflow_server.url], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert f"run {run_id}: sent" in synced.stdout and "status FINISHED" in synced.stdout, synced.stdout

    assert mlflow.get_run(run_id).info.status == "FINISHED"
    for key in ("epoch", "train_total", "val_top1", "lr"):
        assert [m.step for m in mlflow.get_metric_history(run_id, key)] == list(range(1, EPOCHS + 1)), key
    artifacts = {a.path for folder in (None, "checkpoints") for a in mlflow.list_artifacts(run_id, folder)}
    assert {"config.yaml", "checkpoints/last.pt", "checkpoints/best_model.pt"} <= artifacts
    assert not (storage_root / "mlflow-spool" / run_id).exists()
