"""The sweep: Optuna + ASHA over Ray Train trials, logged to MLflow, resumable after its driver dies."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from semckd_ray.config import read_yaml
from semckd_ray.errors import UserError
from semckd_ray.tracking import client
from semckd_ray.tune import parse_search

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tune_configs" / "smoke.yaml"


def smoke_raw(workdir, **optim):
    raw = read_yaml(SMOKE)
    raw["data"]["root"] = str(workdir / "data")
    raw["optim"].update(optim)
    return raw


def children(mlflow, parent_run_id):
    parent = mlflow.get_run(parent_run_id)
    return mlflow.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def test_search_space_errors_name_the_key(tmp_path):
    raw = read_yaml(SMOKE)
    raw["search"]["space"]["method.beta"] = {"type": "loguniform", "low": 100.0, "high": 10.0}
    with pytest.raises(UserError, match="search.space.method.beta.*inverted"):
        parse_search(raw, SMOKE.parent)
    raw["search"]["space"]["method.beta"] = {"type": "choice", "values": []}
    with pytest.raises(UserError, match="non-empty"):
        parse_search(raw, SMOKE.parent)
    raw["search"]["space"] = {"method.options.factor": {"type": "choice", "values": [4, 64]}}
    with pytest.raises(UserError, match="factor.*64"):
        parse_search(raw, SMOKE.parent)  # 32 // 64 leaves an empty embedding
    raw["search"]["space"] = {"optim.epohcs": {"type": "randint", "low": 1, "high": 3}}
    with pytest.raises(UserError, match="optim.epohcs"):
        parse_search(raw, SMOKE.parent)
    raw["search"]["space"] = {}
    with pytest.raises(UserError, match="empty"):
        parse_search(raw, SMOKE.parent)


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_or_duplicating(ray_cluster, workdir):
    cfg_path = workdir / "sweep.yaml"
    raw = smoke_raw(workdir)
    raw["teacher"]["train"] = str(SMOKE.parent / raw["teacher"]["train"])
    raw["search"]["scheduler"]["type"] = "none"  # every trial runs all its epochs
    import yaml

    cfg_path.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "semckd_ray.tune", "--config", str(cfg_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(workdir / "first.log", "w")
    first = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    mlflow = client(os.environ["MLFLOW_TRACKING_URI"])
    deadline = time.monotonic() + 600
    finished_before = set()
    try:
        while time.monotonic() < deadline and first.poll() is None:
            sweeps = mlflow.search_runs(mlflow.search_experiments()[0:0] or
                                        [e.experiment_id for e in mlflow.search_experiments()],
                                        filter_string="tags.role = 'sweep'")
            if sweeps:
                done = [r for r in children(mlflow, sweeps[0].info.run_id) if r.info.status == "FINISHED"]
                if done:
                    finished_before = {r.info.run_id for r in done}
                    break
            time.sleep(2)
        assert first.poll() is None, (workdir / "first.log").read_text()[-3000:]
        assert finished_before, "no trial finished in time"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    parent_run_id = sweeps[0].info.run_id
    finished_epochs = {rid: len(mlflow.get_metric_history(rid, "epoch")) for rid in finished_before}

    resumed = subprocess.run(command + ["--resume"], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    runs = children(mlflow, parent_run_id)
    assert len(runs) == 4
    assert len({r.data.tags["tune_trial_id"] for r in runs}) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    assert [r.data.tags["failure_reason"] for r in runs if "failure_reason" in r.data.tags] == []
    for rid, epochs in finished_epochs.items():  # finished trials were not trained again
        assert len(mlflow.get_metric_history(rid, "epoch")) == epochs
    assert mlflow.get_run(parent_run_id).info.status == "FINISHED"
    everything = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
    assert [r.info.run_id for r in everything if r.data.tags.get("role") == "sweep"] == [parent_run_id]
    assert len([r for r in everything if r.data.tags.get("role") == "teacher"]) == 1  # reused, not retrained
    assert [r.info.run_id for r in everything if r.info.status == "RUNNING"] == []


def test_tags_tell_the_truth_once_a_run_is_closed(workdir):
    """A trial that Tune tore down (fit() wrote an ActorDiedError) but that ran all its epochs is
    FINISHED, one that ASHA stopped is KILLED and stopped early; neither keeps a failure reason.
    A run that failed once and then finished loses its old reason too."""
    from semckd_ray.config import parse_train_config
    from semckd_ray.trainer import _terminate
    from semckd_ray.tune import summarize

    uri = os.environ["MLFLOW_TRACKING_URI"]
    mlflow = client(uri)
    experiment = mlflow.create_experiment("truth")
    parent = mlflow.create_run(experiment, run_name="sweep").info.run_id
    torn_down = "ActorDiedError: The actor died unexpectedly: placement group was removed"
    trials = {}
    for name, epochs in (("full", 3), ("stopped", 1)):
        run_id = mlflow.create_run(experiment, tags={"mlflow.parentRunId": parent, "tune_trial_id": name}).info.run_id
        for epoch in range(1, epochs + 1):
            mlflow.log_metric(run_id, "epoch", epoch, step=epoch)
        mlflow.log_metric(run_id, "best_val_top1", 50.0 + epochs)
        _terminate(mlflow, run_id, "FAILED", reason=torn_down)
        trials[name] = run_id
    base = parse_train_config({**smoke_raw(workdir), "tracking": {"uri": uri, "experiment": "truth"}})
    summarize(base, parent, None, None)
    full, stopped = (mlflow.get_run(trials[k]) for k in ("full", "stopped"))
    assert (full.info.status, stopped.info.status) == ("FINISHED", "KILLED")
    assert stopped.data.tags["stopped_early"] == "true" and "stopped_early" not in full.data.tags
    assert "failure_reason" not in full.data.tags and "failure_reason" not in stopped.data.tags

    retried = mlflow.create_run(experiment).info.run_id
    _terminate(mlflow, retried, "FAILED", reason="ConnectionError: the server went away")
    assert "failure_reason" in mlflow.get_run(retried).data.tags
    _terminate(mlflow, retried, "FINISHED")
    assert "failure_reason" not in mlflow.get_run(retried).data.tags
