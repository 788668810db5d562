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


EPOCHS = 8


@pytest.mark.slow
def test_training_goes_on_through_a_tracking_outage_and_logs_every_epoch_once(ray_cluster, mlflow_server, tmp_path):
    output = tmp_path / "train.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", TRAIN, "--config", str(TEACHER_CONFIG), "--set", f"optim.epochs={EPOCHS}",
               "--set", f"data.root={tmp_path / 'data'}", "--set", "tracking.experiment=outage"]
    with open(output, "w") as log:
        training = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    mlflow = client(mlflow_server.url)

    def logged_epochs() -> list[int]:
        experiment = mlflow.get_experiment_by_name("outage")
        runs = mlflow.search_runs([experiment.experiment_id]) if experiment else []
        return [m.step for m in mlflow.get_metric_history(runs[0].info.run_id, "epoch")] if runs else []

    def said(text: str) -> bool:
        return text in output.read_text(errors="replace")

    def last_printed_epoch() -> int:  # from the progress lines: "[teacher-digits] epoch 3/8 loss ..."
        return max((int(m) for m in re.findall(rf"\] epoch (\d+)/{EPOCHS} loss", output.read_text(errors="replace"))),
                   default=0)

    try:
        wait_until(lambda: logged_epochs() or training.poll() is not None, TRAIN_TIMEOUT_S, "epoch 1 in MLflow",
                 output.read_text)
        assert training.poll() is None, output.read_text()[-4000:]
        mlflow_server.stop()
        # Down for at least one whole epoch: its metrics could not be sent, and the next epoch ran.
        wait_until(lambda: said("MLflow logging failed") or training.poll() is not None, TRAIN_TIMEOUT_S,
                 "a logging call failing", output.read_text)
        next_epoch = last_printed_epoch() + 1
        wait_until(lambda: last_printed_epoch() >= next_epoch or training.poll() is not None, TRAIN_TIMEOUT_S,
                 f"epoch {next_epoch} during the outage", output.read_text)
        assert training.poll() is None, f"the training ended during the outage:\n{output.read_text()[-4000:]}"
        mlflow_server.start()
        assert training.wait(TRAIN_TIMEOUT_S) == 0, output.read_text()[-6000:]
    finally:
        if training.poll() is None:
            os.killpg(training.pid, signal.SIGKILL)
            training.wait()

    text = output.read_text()
    assert "MLflow is reachable again" in text and "Traceback" not in text, text[-6000:]
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("outage").experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert runs[0].info.status == "FINISHED"
    for key in ("epoch", "train_total", "val_top1", "lr"):
        assert [m.step for m in mlflow.get_metric_history(run_id, key)] == list(range(1, EPOCHS + 1)), key
    artifacts = {a.path for folder in (None, "checkpoints") for a in mlflow.list_artifacts(run_id, folder)}
    assert {"config.yaml", "checkpoints/last.pt", "checkpoints/best_model.pt"} <= artifacts
