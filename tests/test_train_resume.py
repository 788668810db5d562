"""``python -m semckd_ray.train --resume``: a standalone training whose driver died continues.

The driver is killed (SIGKILL, with everything in its process group) after a checkpoint; the
resumed command continues in the same MLflow run from that checkpoint, and every epoch is logged
exactly once. Bad ``--resume`` paths are refused before Ray starts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from servers import wait_until
from semckd_ray.tracking import client
from test_bad_input import TEACHER_CONFIG, TRAIN, assert_user_error, run_command
from test_mlflow_outage import SHORT_EPOCHS

EPOCHS = 4
TIMEOUT_S = 600


def test_a_resume_path_without_a_training_is_refused_before_ray_starts(tmp_path):
    result = run_command(TRAIN, ["--config", str(TEACHER_CONFIG), "--set", f"data.root={tmp_path / 'data'}",
                                 "--resume", str(tmp_path / "nowhere")], cwd=tmp_path)
    assert_user_error(result, "--resume", str(tmp_path / "nowhere"), "semckd_train.json")


@pytest.mark.slow
def test_a_killed_standalone_training_resumes_in_its_run_from_its_checkpoint(ray_cluster, workdir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", TRAIN, "--config", str(TEACHER_CONFIG), "--set", f"optim.epochs={EPOCHS}",
               *SHORT_EPOCHS, "--set", f"data.root={workdir / 'data'}", "--set", "checkpoint.every=1",
               "--set", "tracking.experiment=resume"]
    mlflow = client(os.environ["MLFLOW_TRACKING_URI"])

    def runs():
        experiment = mlflow.get_experiment_by_name("resume")
        return mlflow.search_runs([experiment.experiment_id]) if experiment else []

    def logged() -> list[int]:
        found = runs()
        return sorted(m.step for m in mlflow.get_metric_history(found[0].info.run_id, "epoch")) if found else []

    first_log = workdir / "first.log"
    with open(first_log, "w") as log:
        first = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        wait_until(lambda: len(logged()) >= 2 or first.poll() is not None, TIMEOUT_S, "epoch 2 in MLflow",
                   first_log.read_text)
        assert first.poll() is None, first_log.read_text()[-4000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    (run,) = runs()
    assert run.info.status == "RUNNING"

    resumed = subprocess.run(command + ["--resume"], cwd=workdir, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-6000:]
    assert f"resuming run {run.info.run_id}" in output, output[-6000:]
    after = re.search(r"resuming after epoch (\d+)", output)
    assert after and int(after.group(1)) >= 1, output[-6000:]  # from its checkpoint, not from scratch
    (final,) = runs()  # the same run: none started anew
    assert final.info.run_id == run.info.run_id and final.info.status == "FINISHED"
    for key in ("epoch", "train_total", "val_top1"):
        assert sorted(m.step for m in mlflow.get_metric_history(run.info.run_id, key)) == list(range(1, EPOCHS + 1))
    assert "checkpoint.last.sha256" in final.data.tags
