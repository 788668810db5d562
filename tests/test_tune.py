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
    raw = smoke_raw(workdir, epochs=2)
    raw["teacher"]["train"] = str(SMOKE.parent / raw["teacher"]["train"])
    raw["search"]["scheduler"]["type"] = "none"  # every trial runs all its epochs
    # Two at a time: when the first finishes and the driver dies, one trial is mid-way and one waits.
    raw["search"]["num_samples"] = 3
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
    assert len(runs) == 3
    assert len({r.data.tags["tune_trial_id"] for r in runs}) == 3
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


@pytest.mark.slow
def test_repeats_train_at_once_and_asha_stops_a_poor_trial_after_its_first_rung(ray_cluster, workdir):
    """Two seeds per trial, trained at the same time (one per node); the trial reports their mean
    every epoch, so ASHA stops the poor second trial at its first rung instead of after both seeds
    have trained to the end."""
    from semckd_ray.tune import sweep

    epochs = 3
    raw = {
        "name": "repeats", "seed": 0, "data": {"dataset": "digits", "root": str(workdir / "data")},
        "method": {"name": "vanilla"}, "student": {"model": "resnet8"},
        "optim": {"epochs": epochs, "batch_size": 32, "lr_decay_epochs": [3]},
        "checkpoint": {"every": 1}, "tracking": {"experiment": "repeats"},
        # Optuna's TPE with this seed samples the good lr first and the poor one second. After one
        # epoch the good one's seeds score 23 and 12 % (validation top-1), the poor one's about 9.
        "search": {"num_samples": 2, "repeats": 2, "seed": 10,
                   "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
                   "space": {"optim.lr": {"type": "choice", "values": [0.1, 1e-5]}}},
    }
    summary = sweep(raw, workdir)

    mlflow = client(summary["tracking_uri"])
    rows = sorted(summary["trials"], key=lambda r: mlflow.get_run(r["run_id"]).info.start_time)
    assert [r["searched.optim.lr"] for r in rows] == ["0.1", "1e-05"], rows  # the premise
    good, poor = (mlflow.get_run(r["run_id"]) for r in rows)
    assert good.info.status == "FINISHED" and good.data.metrics["epoch"] == epochs
    assert poor.info.status == "KILLED" and poor.data.tags["stopped_early"] == "true"
    assert [m.step for m in mlflow.get_metric_history(poor.info.run_id, "val_top1")] == [1]  # the rung

    def seeds(trial):
        return sorted(mlflow.search_runs([trial.info.experiment_id],
                                         filter_string=f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'"),
                      key=lambda r: r.data.tags["tune_trial_id"])

    for trial in (good, poor):
        pair = seeds(trial)
        assert [r.data.params["seed"] for r in pair] == ["0", "1"]
        assert pair[0].info.start_time < pair[1].info.end_time and pair[1].info.start_time < pair[0].info.end_time
        # The trial's curve is the seeds' mean, epoch by epoch.
        for step in [m.step for m in mlflow.get_metric_history(trial.info.run_id, "val_top1")]:
            per_seed = [{m.step: m.value for m in mlflow.get_metric_history(r.info.run_id, "val_top1")}[step]
                        for r in pair]
            assert [m.value for m in mlflow.get_metric_history(trial.info.run_id, "val_top1")
                    if m.step == step] == [pytest.approx(sum(per_seed) / 2)]
    assert [r.info.status for r in seeds(good)] == ["FINISHED", "FINISHED"]
    # Stopped with their trial, before their last epoch, and closed as such.
    stopped = [(r.info.status, r.data.metrics["epoch"], r.data.tags.get("failure_reason")) for r in seeds(poor)]
    assert all(status == "KILLED" and epoch < epochs and reason is None for status, epoch, reason in stopped), stopped
    assert [r.info.run_id for r in mlflow.search_runs([good.info.experiment_id])
            if r.info.status == "RUNNING"] == []
