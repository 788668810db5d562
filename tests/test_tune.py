"""The sweep: Optuna + ASHA over Ray Train trials, logged to MLflow, resumable after its driver dies."""

import json
import os
import re
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


def test_a_grid_sweep_runs_each_combination_once_and_refuses_what_is_no_grid(tmp_path):
    raw = read_yaml(SMOKE)
    raw["search"] = {"sampler": "grid", "space": {
        "data.val_size": {"type": "choice", "values": [100, 200]}, "seed": {"type": "choice", "values": [0, 1, 2]}}}
    search, _ = parse_search(raw, SMOKE.parent)
    assert search.num_samples == 6  # every combination, from the grid's size
    names = {"val_size": "data.val_size", "seed": "seed"}
    sampler = search.optuna_sampler(names)
    import optuna

    study = optuna.create_study(sampler=sampler, direction="maximize")
    seen = []
    for _ in range(6):
        trial = study.ask({name: optuna.distributions.CategoricalDistribution(search.space[key].values)
                           for name, key in names.items()})
        seen.append((trial.params["val_size"], trial.params["seed"]))
        study.tell(trial, 0.0)
    assert sorted(seen) == [(v, s) for v in (100, 200) for s in (0, 1, 2)]
    raw["search"]["num_samples"] = 4
    with pytest.raises(UserError, match="6 combinations.*num_samples to 6"):
        parse_search(raw, SMOKE.parent)
    raw["search"].pop("num_samples")
    raw["search"]["space"]["method.beta"] = {"type": "loguniform", "low": 1.0, "high": 10.0}
    with pytest.raises(UserError, match="method.beta is a range"):
        parse_search(raw, SMOKE.parent)


def trained_teacher(teacher_yaml: Path, tracking_uri: str, workdir: Path, steps: int = 10) -> str:
    """The finished teacher run that ``ensure_teacher`` reuses for ``teacher.train: teacher_yaml``,
    made here in seconds (a few SGD steps on digits, no Ray) instead of by the sweep, which would
    train it for 8 epochs first: the resumed sweep has to find it, not retrain it, all the same."""
    import torch
    import torch.nn.functional as F

    from semckd_ray.config import load_train_config
    from semckd_ray.data import load_dataset
    from semckd_ray.models import create_model
    from semckd_ray.tracking import get_or_create_experiment, sha256_file
    from semckd_ray.trainer import config_digest

    cfg = load_train_config(teacher_yaml)
    data = load_dataset(cfg.data.dataset, workdir / "data")
    torch.manual_seed(0)
    model = create_model(cfg.student.model, num_classes=data.num_classes).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=0.9)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (data.mean, data.std))
    order = torch.randperm(len(data.train))
    for k in range(steps):
        index = order[k * 64:(k + 1) * 64]
        logits, _ = model((data.train.images[index].float() / 255 - mean) / std)
        loss = F.cross_entropy(logits, data.train.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = workdir / "teacher_best.pth"
    torch.save({"model": model.state_dict()}, path)
    mlflow = client(tracking_uri)
    experiment = get_or_create_experiment(mlflow, cfg.tracking.experiment)
    run_id = mlflow.create_run(experiment, run_name=cfg.name, tags={
        "role": "teacher", "config_sha256": config_digest(cfg),
        "checkpoint.best.path": f"checkpoints/{path.name}", "checkpoint.best.sha256": sha256_file(path),
    }).info.run_id
    mlflow.log_artifact(run_id, str(path), "checkpoints")
    mlflow.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_or_duplicating(ray_cluster, workdir, s3_bucket):
    """The sweep keeps its state in an S3 bucket (moto's server): its driver is killed once a trial
    has finished (one more is mid-way, one waits), and ``--resume`` finds the sweep there, trains
    no trial twice and finishes every one."""
    from semckd_ray import storage
    from semckd_ray.tune import SWEEP_FILE

    cfg_path = workdir / "sweep.yaml"
    raw = smoke_raw(workdir, epochs=2)
    raw["data"]["val_size"] = 1000  # 437 images to train on: short epochs
    raw["teacher"]["train"] = str(SMOKE.parent / raw["teacher"]["train"])
    teacher_run = trained_teacher(Path(raw["teacher"]["train"]), os.environ["MLFLOW_TRACKING_URI"], workdir)
    sweeps_uri = storage.join(s3_bucket, "sweeps")
    raw["tracking"]["storage_path"] = sweeps_uri
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
    # A trial may diverge on one CPU and not another (see the job test): FAILED with its reason.
    diverged = [r for r in runs if r.data.metrics.get("diverged")]
    assert all(r.info.status == "FAILED" and r.data.tags["failure_reason"].startswith("training loss diverged")
               for r in diverged)
    assert all(r.info.status == "FINISHED" for r in runs if r not in diverged)
    assert [r.data.tags["failure_reason"] for r in runs if "failure_reason" in r.data.tags and r not in diverged] == []
    for rid, epochs in finished_epochs.items():  # finished trials were not trained again
        assert len(mlflow.get_metric_history(rid, "epoch")) == epochs
    assert mlflow.get_run(parent_run_id).info.status == "FINISHED"
    everything = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
    assert [r.info.run_id for r in everything if r.data.tags.get("role") == "sweep"] == [parent_run_id]
    assert len([r for r in everything if r.data.tags.get("role") == "teacher"]) == 1  # reused, not retrained
    assert [r.info.run_id for r in everything if r.info.status == "RUNNING"] == []
    assert f"reusing teacher run {teacher_run}" in resumed.stdout
    # Everything the sweep keeps is in the bucket: Tune's state and the marker --resume found it by.
    (name,) = [n for n in storage.list_dir(sweeps_uri) if re.fullmatch(r"smoke-\d{8}-\d{6}", n)]  # not its trials
    marker = json.loads(storage.read_text(storage.join(sweeps_uri, name, SWEEP_FILE)))
    assert (marker["parent_run_id"], marker["sweep_name"]) == (parent_run_id, name)
    assert storage.exists(storage.join(sweeps_uri, name, "tuner.pkl"))
    assert f"resuming sweep {name} ({storage.join(sweeps_uri, name)})" in resumed.stdout
    assert not (workdir / "ray_results").exists()  # nothing on the local disk


def test_tags_tell_the_truth_once_a_run_is_closed(workdir):
    """A trial that Tune tore down (fit() wrote an ActorDiedError) but that ran all its epochs is
    FINISHED, one that ASHA stopped is FINISHED and tagged stopped early (MLflow's KILLED reads as a
    failure in its UI); neither keeps a failure reason. One whose loss diverged, and that Tune tore
    down after its last report, is FAILED because it diverged, not because of the teardown.
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
    for name, epochs in (("full", 3), ("stopped", 1), ("diverged", 2), ("diverged_closed", 1)):
        run_id = mlflow.create_run(experiment, tags={"mlflow.parentRunId": parent, "tune_trial_id": name}).info.run_id
        for epoch in range(1, epochs + 1):
            mlflow.log_metric(run_id, "epoch", epoch, step=epoch)
        mlflow.log_metric(run_id, "best_val_top1", 50.0 + epochs)
        if name.startswith("diverged"):  # what the worker logs, and then fit() may write the teardown over it
            mlflow.log_metric(run_id, "diverged", 1.0, step=epochs)
            mlflow.set_tag(run_id, "stopped_reason", f"non-finite training loss (nan) in epoch {epochs}")
        closed = f"training loss diverged in epoch {epochs}" if name == "diverged_closed" else torn_down
        _terminate(mlflow, run_id, "FAILED", reason=closed)
        trials[name] = run_id
    base = parse_train_config({**smoke_raw(workdir), "tracking": {"uri": uri, "experiment": "truth"}})
    summarize(base, parent, None, None)
    full, stopped = (mlflow.get_run(trials[k]) for k in ("full", "stopped"))
    assert (full.info.status, stopped.info.status) == ("FINISHED", "FINISHED")
    assert stopped.data.tags["stopped_early"] == "true" and "stopped_early" not in full.data.tags
    assert "failure_reason" not in full.data.tags and "failure_reason" not in stopped.data.tags
    for name, epochs in (("diverged", 2), ("diverged_closed", 1)):  # closed by the teardown, or as it should be
        diverged = mlflow.get_run(trials[name])
        assert diverged.info.status == "FAILED" and "stopped_early" not in diverged.data.tags
        assert diverged.data.tags["failure_reason"] == f"training loss diverged in epoch {epochs}"

    retried = mlflow.create_run(experiment).info.run_id
    _terminate(mlflow, retried, "FAILED", reason="ConnectionError: the server went away")
    assert "failure_reason" in mlflow.get_run(retried).data.tags
    _terminate(mlflow, retried, "FINISHED")
    assert "failure_reason" not in mlflow.get_run(retried).data.tags


@pytest.mark.slow
def test_repeats_train_at_once_and_asha_stops_a_poor_trial_after_its_first_rung(ray_cluster, workdir):
    """Two seeds per trial, trained at the same time (one per node); the trial reports their mean
    every epoch, so ASHA stops the poor second trial at its first rung instead of after both seeds
    have trained to the end.

    The trial judges a rung once its slower seed has reached it, and the faster seed trains on
    meanwhile (on 2 busy cores one seed's start-up can lag the other's by an epoch or more), so a
    2-epoch run let the faster seed finish before the stop arrived. Four epochs leave the stop three
    epochs to arrive in: the seeds' lead and Tune's stop take seconds, an epoch here about 3.5 s.
    """
    from semckd_ray.tune import sweep

    epochs = 4
    raw = {
        "name": "repeats", "seed": 0, "data": {"dataset": "digits", "root": str(workdir / "data")},
        "method": {"name": "vanilla"}, "student": {"model": "resnet8"},
        "optim": {"epochs": epochs, "batch_size": 32, "lr_decay_epochs": [2]},
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
    assert poor.info.status == "FINISHED" and poor.data.tags["stopped_early"] == "true"
    assert "stopped_early" not in good.data.tags
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
    # Stopped with their trial, before their last epoch (the faster may be a little past the rung),
    # and closed as such.
    stopped = [(r.info.status, r.data.metrics["epoch"], r.data.tags.get("failure_reason")) for r in seeds(poor)]
    assert all(status == "FINISHED" and epoch < epochs and reason is None for status, epoch, reason in stopped), stopped
    assert all(r.data.tags.get("stopped_early") == "true" for r in seeds(poor))
    assert all("stopped_early" not in r.data.tags for r in seeds(good))
    assert [r.info.run_id for r in mlflow.search_runs([good.info.experiment_id])
            if r.info.status == "RUNNING"] == []


# ------------------------------------------------------------------------------------------
# --resume: the sweep's marker, found through the storage path's own filesystem (no Ray)


@pytest.fixture(params=["local", "s3"])
def sweeps_root(request, tmp_path):
    from semckd_ray import storage

    if request.param == "local":
        return str(tmp_path / "ray_results")
    return storage.join(request.getfixturevalue("s3_bucket"), "sweeps")


def test_the_latest_sweep_of_the_config_is_found_by_its_marker(sweeps_root):
    """What a killed driver leaves behind is what --resume finds: the newest sweep of this config
    with a marker, not another config's (whose name starts the same) nor a folder without one."""
    from semckd_ray import storage
    from semckd_ray.tune import SWEEP_FILE, _find_sweep, _write_sweep

    for name in ("smoke-20240101-000000", "smoke-20240102-000000", "smoke-x-20250101-000000"):
        _write_sweep(storage.join(sweeps_root, name), json.dumps({"parent_run_id": f"p-{name}", "sweep_name": name}))
    storage.write_text(storage.join(sweeps_root, "smoke-20250101-000000", "tuner.pkl"), "no marker")  # died first
    storage.write_text(storage.join(sweeps_root, "smoke-0123abcd", "semckd_train.json"), "{}")  # a training
    newest = storage.join(sweeps_root, "smoke-20240102-000000")
    assert _find_sweep(sweeps_root, "smoke", "latest") == (
        newest, {"parent_run_id": "p-smoke-20240102-000000", "sweep_name": "smoke-20240102-000000"})
    older = storage.join(sweeps_root, "smoke-20240101-000000")
    assert _find_sweep(sweeps_root, "smoke", older)[1]["sweep_name"] == "smoke-20240101-000000"
    assert _find_sweep(sweeps_root, "smoke-x", "latest")[1]["sweep_name"] == "smoke-x-20250101-000000"
    with pytest.raises(UserError, match=rf"--resume {re.escape(storage.join(sweeps_root, 'smoke-20250101-000000'))}: "
                                        rf"no sweep there \(missing {SWEEP_FILE}\)"):
        _find_sweep(sweeps_root, "smoke", storage.join(sweeps_root, "smoke-20250101-000000"))
    with pytest.raises(UserError, match="no sweep named 'other' under"):
        _find_sweep(sweeps_root, "other", "latest")
    storage.write_text(storage.join(older, SWEEP_FILE), "not json")
    with pytest.raises(UserError, match="is not a sweep's marker"):
        _find_sweep(sweeps_root, "smoke", older)


def test_a_relative_local_sweep_folder_comes_back_absolute(tmp_path, monkeypatch):
    from semckd_ray.tune import _find_sweep, _write_sweep

    monkeypatch.chdir(tmp_path)
    _write_sweep(str(tmp_path / "runs" / "smoke-20240101-000000"), json.dumps({"parent_run_id": "p", "sweep_name": "s"}))
    folder, _ = _find_sweep("runs", "smoke", "runs/smoke-20240101-000000")
    assert folder == str(tmp_path / "runs" / "smoke-20240101-000000")
    assert _find_sweep("runs", "smoke", "latest")[0] == folder


@pytest.mark.parametrize("where", ["local", "bucket", "no-bucket", "endpoint"])
def test_a_wrong_resume_path_is_refused_before_ray_or_a_teacher_starts(where, workdir, monkeypatch, request):
    """``--resume PATH`` naming no sweep, on the disk or in object storage, is one clear error, and
    nothing has started yet (Ray, the teacher's training, the tracking check)."""
    import semckd_ray.teacher
    import semckd_ray.trainer
    from semckd_ray import storage, tune

    for module, name in ((semckd_ray.trainer, "ensure_ray"), (semckd_ray.teacher, "ensure_teacher"),
                         (tune.tracking, "check_reachable")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("started before the --resume check"))
    if where == "local":
        path = str(workdir / "nothing-here")
    elif where == "bucket":
        path = storage.join(request.getfixturevalue("s3_bucket"), "sweeps", "smoke-20240101-000000")
    elif where == "no-bucket":
        endpoint = request.getfixturevalue("s3_server")
        path = f"s3://KEYID1234:hunter2hunter2@no-such-bucket-x/sweeps/smoke-1?endpoint_override={endpoint}"
    else:
        path = "s3://bucket/sweeps/smoke-1?endpoint_override=http://127.0.0.1:1"
    with pytest.raises(UserError) as info:
        tune.main(["--config", str(SMOKE), "--set", f"data.root={workdir / 'data'}", "--resume", path])
    message = str(info.value)
    assert message.startswith("--resume") and "hunter2" not in message and "KEYID1234" not in message
    if where in ("local", "bucket", "no-bucket"):
        assert "no sweep there (missing semckd_sweep.json)" in message, message
    else:
        assert "cannot read" in message and "127.0.0.1" in message, message
