"""The spool: what a training logs while MLflow is down outlives the worker and is sent exactly once.

An outage is a client whose calls fail while a switch is off, in front of a real SQLite store; the
end-to-end outage, with a real server stopped and started, is in test_mlflow_outage.py.
"""

from __future__ import annotations

import json
import os

import pytest

from semckd_ray import spool, storage, tracking
from semckd_ray.spool import SpooledLogger, spool_dir


class Outage:
    """A switch, and MLflow clients that fail while it is on (``down``)."""

    def __init__(self, down: bool = False):
        self.down = down

    def client(self, uri):
        real = _real_client(uri)
        switch = self

        class Flaky:
            def __getattr__(self, name):
                method = getattr(real, name)

                def call(*args, **kwargs):
                    if switch.down:
                        raise ConnectionError("MLflow is down (test)")
                    return method(*args, **kwargs)

                return call

        return Flaky()


def _real_client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture
def store(workdir, monkeypatch):
    monkeypatch.setattr(spool, "RETRY_PAUSE_S", (0.05, 0.2))
    uri = os.environ["MLFLOW_TRACKING_URI"]
    mlflow = _real_client(uri)
    run_id = mlflow.create_run(mlflow.create_experiment("spool")).info.run_id
    return uri, mlflow, run_id, str(workdir / "storage")


@pytest.fixture
def outage(monkeypatch):
    """An outage in progress: every MLflow client made from now on fails until ``outage.down = False``."""
    switch = Outage(down=True)
    monkeypatch.setattr(tracking, "client", switch.client)
    return switch


def epochs(mlflow, run_id):
    return sorted(m.step for m in mlflow.get_metric_history(run_id, "epoch"))


def test_a_worker_that_dies_mid_outage_leaves_its_queue_to_the_next_one(store, outage, monkeypatch, tmp_path):
    uri, mlflow, run_id, root = store
    folder = spool_dir(root, run_id)
    first = SpooledLogger(uri, run_id, folder)
    picture = tmp_path / "attention.png"
    picture.write_bytes(b"png bytes")
    for epoch in (1, 2, 3):
        first.log_metrics({"epoch": epoch, "val_top1": 10.0 * epoch}, step=epoch)
    first.log_artifact(picture, "attention")
    first.set_tag("worker_nodes", "a")
    first.checkpoint(timeout_s=0.2)  # the checkpoint of epoch 3: the queue is now on storage
    picture.unlink()  # the worker's node is gone, with its temp files; its logger never sends again
    kept = json.loads(storage.read_text(storage.join(folder, "worker.json")))["calls"]
    assert [c["op"] for c in kept] == ["metrics"] * 3 + ["artifact", "tag"]

    monkeypatch.setattr(tracking, "client", Outage().client)  # the first logger's client stays down
    second = SpooledLogger(uri, run_id, folder)  # Ray Train restarted the worker from epoch 3
    second.log_metrics({"epoch": 3, "val_top1": 99.0}, step=3)  # recomputed: logged already, dropped
    second.log_metrics({"epoch": 4, "val_top1": 40.0}, step=4)
    assert second.close(timeout_s=30) == 0
    assert epochs(mlflow, run_id) == [1, 2, 3, 4]
    assert [m.value for m in mlflow.get_metric_history(run_id, "val_top1") if m.step == 3] == [30.0]
    assert [a.path for a in mlflow.list_artifacts(run_id, "attention")] == ["attention/attention.png"]
    assert mlflow.get_run(run_id).data.tags["worker_nodes"] == "a"
    assert not storage.exists(storage.join(folder, "worker.json"))  # sent: the spool is tidied away


def test_an_epoch_the_server_has_is_not_logged_again_by_a_restarted_worker(store):
    uri, mlflow, run_id, root = store
    for epoch in (1, 2):
        mlflow.log_metric(run_id, "epoch", epoch, step=epoch)
    logger = SpooledLogger(uri, run_id, spool_dir(root, run_id))
    for epoch in (2, 3):  # the checkpoint was of epoch 1; epoch 2 was logged before the worker died
        logger.log_metrics({"epoch": epoch}, step=epoch)
    assert logger.close(timeout_s=30) == 0
    assert epochs(mlflow, run_id) == [1, 2, 3]


def test_logging_does_not_wait_for_the_server(store, outage):
    uri, mlflow, run_id, root = store
    logger = SpooledLogger(uri, run_id, spool_dir(root, run_id))
    for epoch in range(1, 51):
        logger.log_metrics({"epoch": epoch}, step=epoch)  # returns at once: queued, sent by a thread
    assert logger.pending == 50
    outage.down = False
    assert logger.close(timeout_s=60) == 0
    assert epochs(mlflow, run_id) == list(range(1, 51))


def test_sync_sends_a_spool_and_closes_the_run_as_its_training_ended(store, outage, monkeypatch, capsys):
    from semckd_ray.sync import main

    uri, mlflow, run_id, root = store
    folder = spool_dir(root, run_id)
    logger = SpooledLogger(uri, run_id, folder)
    logger.log_metrics({"epoch": 1}, step=1)
    logger.set_tag("secret_free", "yes")
    logger.end("FINISHED")
    assert logger.close(timeout_s=0.2) == 3  # the server is still down when the training ends
    spool.spool_close(folder, "FINISHED", None)  # and when the driver closes the run
    assert mlflow.get_run(run_id).info.status == "RUNNING"

    monkeypatch.setattr(tracking, "client", _real_client)
    assert main(["--storage", root, "--tracking-uri", uri]) == 0
    assert f"run {run_id}: sent 3 logging calls; status FINISHED" in capsys.readouterr().out
    run = mlflow.get_run(run_id)
    assert (run.info.status, run.data.tags["secret_free"], epochs(mlflow, run_id)) == ("FINISHED", "yes", [1])
    assert spool.spools(root) == {}
    assert main(["--storage", root, "--tracking-uri", uri]) == 0  # twice: nothing left, nothing doubled
    assert "nothing to send" in capsys.readouterr().out
    assert epochs(mlflow, run_id) == [1]


def test_a_spool_for_a_run_the_store_does_not_have_is_a_clear_error(store):
    from semckd_ray.errors import UserError
    from semckd_ray.sync import sync

    uri, mlflow, run_id, root = store
    storage.write_text(storage.join(spool_dir(root, "0" * 32), "worker.json"), json.dumps({"calls": []}))
    with pytest.raises(UserError, match="does not have"):
        sync(root, uri)


def test_the_end_of_a_sweep_sends_what_its_stopped_trials_spooled_and_leaves_other_sweeps_spools(store, outage,
                                                                                                 monkeypatch):
    """ASHA ends a trial's process right after the report that stops it; if MLflow was down then, the
    trial's last epoch is in its spool, and the sweep's driver sends it before it summarises. A seed
    run (a trial's child) counts as the sweep's; another sweep's spool is left for its own driver or sync."""
    from semckd_ray.tune import _send_spools

    uri, mlflow, _, root = store
    experiment = mlflow.create_experiment("sweeps")

    def run(parent=None):
        tags = {"mlflow.parentRunId": parent} if parent else {}
        return mlflow.create_run(experiment, tags=tags).info.run_id

    sweep, other = run(), run()
    trial = run(sweep)
    seed, other_trial = run(trial), run(other)
    for run_id in (trial, seed, other_trial):
        logger = SpooledLogger(uri, run_id, spool_dir(root, run_id))
        logger.log_metrics({"epoch": 1, "val_top1": 9.0}, step=1)
        logger.checkpoint(timeout_s=0.2)  # what a stopped trial did before its last report
    monkeypatch.setattr(tracking, "client", _real_client)

    _send_spools(mlflow, root, sweep)
    assert epochs(mlflow, trial) == [1] and epochs(mlflow, seed) == [1]
    assert epochs(mlflow, other_trial) == []
    assert sorted(spool.spools(root)) == [other_trial]
