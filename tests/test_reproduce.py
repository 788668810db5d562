"""``python -m semckd_ray.reproduce``: a paper's table as one grid of trainings, then the report.

The file is checked before anything runs (every run's config included); the grid's runs are the
cross product of pairs, methods and seeds, the student alone once per student and seed; the
progress line counts what is done, running, queued and failed, with the time left. The digits
version runs through the CLI on the session's two-node cluster: its driver is killed once a run has
finished, and ``--resume`` trains nothing twice and ends with the table at n = 2 per cell.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from semckd_ray.config import read_yaml
from semckd_ray.errors import UserError
from semckd_ray.reproduce import grid_cells, parse_reproduce, sweep_raw
from semckd_ray.tracking import client

REPO = Path(__file__).resolve().parents[1]
PAPER_DIGITS = REPO / "tune_configs" / "paper_digits.yaml"
PAPER_CIFAR = REPO / "tune_configs" / "paper_cifar100.yaml"


def test_the_cifar_grid_is_the_papers_table():
    spec = parse_reproduce(read_yaml(PAPER_CIFAR))
    cells = grid_cells(spec)
    students = {pair.split("->")[1] for pair in spec.pairs}
    distilling = [c for c in cells if c["set"]["teacher"] is not None]
    alone = [c for c in cells if c["set"]["teacher"] is None]
    assert len(distilling) == len(spec.pairs) * (len(spec.methods) - 1) * len(spec.seeds) == 147
    assert len(alone) == len(students) * len(spec.seeds) == 15  # once per student and seed, not per pair
    labels = [tuple(sorted(c["label"].items())) for c in cells]
    assert len(set(labels)) == len(labels)
    # Each method's official weight unless the file gives one: the config leaves beta to the method.
    assert {c["set"]["method"].get("beta") for c in cells if c["label"]["method.name"] == "at"} == {None}
    assert {c["set"]["method"]["beta"] for c in cells if c["label"]["method.name"] == "semckd"} == {400}
    raw = sweep_raw(spec)
    assert raw["search"]["sampler"] == "grid" and raw["search"]["scheduler"] == {"type": "none"}
    assert raw["tracking"]["experiment"] == "paper-cifar100"


def test_a_vary_key_crosses_the_grid():
    raw = read_yaml(PAPER_DIGITS)
    raw["vary"] = {"data.train_fraction": [0.5, 1.0]}
    cells = grid_cells(parse_reproduce(raw))
    assert len(cells) == 2 * 10  # each value of the key: the whole grid
    assert sorted({c["label"]["data.train_fraction"] for c in cells}) == [0.5, 1.0]


@pytest.mark.parametrize("change, message", [
    (lambda r: r["pairs"].append("resnet32->resnet8"), r"pair resnet32->resnet8: no entry for its teacher.*resnet20"),
    (lambda r: r["pairs"].append("resnet20 resnet8"), r"a pair is 'teacher->student'"),
    (lambda r: r["pairs"].append("resnet20->resnet8"), r"a pair is listed twice: resnet20->resnet8"),
    (lambda r: r["methods"].update(semkd={}), r"unknown method 'semkd'.*valid methods: at, crd"),
    (lambda r: r["methods"]["kd"].update(name="kd"), r"methods.kd: the key is the method's name"),
    (lambda r: r["recipe"].update(method={"name": "kd"}), r"recipe.method is set per run by the grid"),
    (lambda r: r.update(seeds=[0, 0]), r"a seed is listed twice"),
    (lambda r: r.update(seeds=[]), r"seeds"),
    (lambda r: r["teachers"].update(resnet20={}), r"teachers.resnet20.*'train'.*'checkpoint'"),
    (lambda r: r.update(vary={"seed": [1, 2]}), r"'seed' is set by the grid itself"),
    (lambda r: r.update(pairs="resnet20->resnet8"), r"pairs"),
    (lambda r: r.update(sedes=[0]), r"sedes"),
])
def test_a_wrong_file_is_one_clear_error_naming_the_key(change, message):
    raw = read_yaml(PAPER_DIGITS)
    change(raw)
    with pytest.raises(UserError, match=message):
        parse_reproduce(raw)


def test_every_runs_config_is_checked_before_anything_runs(tmp_path):
    """A key of the recipe that one method refuses (here: SemCKD's factor above the batch) stops the
    command at once, naming that run, before a teacher trains or Ray starts (neither torch, Ray nor
    MLflow is imported), as does a --set of a key the grid sets itself."""
    from test_fast_config import run_module

    raw = read_yaml(PAPER_DIGITS)
    raw["methods"]["semckd"]["options"] = {"factor": 64}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, stderr, imported = run_module("semckd_ray.reproduce", "--config", str(path))
    assert code == 2 and imported == [], (stderr, imported)
    assert stderr.startswith("error: the grid's run teacher.model=resnet20, student.model=resnet8, "
                             "method.name=semckd, seed=0: invalid configuration:"), stderr
    assert "batch size 32 // factor 64 = 0" in stderr and "Traceback" not in stderr
    code, stderr, imported = run_module("semckd_ray.reproduce", "--config", str(PAPER_DIGITS),
                                        "--set", "recipe.student={model: resnet8}")
    assert code == 2 and imported == [], (stderr, imported)
    assert "recipe.student is set per run by the grid" in stderr, stderr


class _Trial:
    def __init__(self, status, seconds=None):
        self.status = status
        self.last_result = {"time_total_s": seconds} if seconds is not None else {}


def test_progress_counts_the_grid_and_estimates_the_time_left():
    from semckd_ray.grid_progress import GridProgress, eta_seconds

    progress = GridProgress("paper", 10, "sqlite:///unused.db", "no-parent")
    trials = [_Trial("TERMINATED", 100.0), _Trial("TERMINATED", 140.0), _Trial("RUNNING"), _Trial("RUNNING"),
              _Trial("ERROR"), _Trial("PENDING")]
    counts = progress.counts(trials)
    assert (counts["done"], counts["running"], counts["queued"], counts["failed"]) == (2, 2, 5, 1)
    assert counts["eta_s"] == eta_seconds([100.0, 140.0], 2, 5, 2) == 120.0 * 7 / 2
    assert progress.line(counts) == ("[paper] grid: 2/10 done, 2 running, 5 queued, 1 failed; "
                                     "about 7 min left (2 min per run, 2 at a time)")
    # The trial Tune is ending still says RUNNING when the callback hears of it.
    ending = progress.counts(trials, (trials[2], "TERMINATED"))
    assert (ending["done"], ending["running"]) == (3, 1)
    # Between two runs fewer run: the estimate goes by the most seen at once.
    assert progress.line(ending).endswith("(2 min per run, 2 at a time)")
    assert progress.line(progress.counts([])) == "[paper] grid: 0/10 done, 0 running, 10 queued, 0 failed"


@pytest.mark.slow
def test_the_digits_table_reproduces_through_a_driver_kill_and_resume(ray_cluster, workdir):
    """The digits version through the CLI: the teachers' finished runs reused, 10 runs on the two
    nodes, the driver killed once a run has finished, ``--resume`` training only what had not
    finished, and the report's table with n = 2 per cell (seeds 0 and 1)."""
    from test_tune import children, trained_teacher

    uri = os.environ["MLFLOW_TRACKING_URI"]
    raw = read_yaml(PAPER_DIGITS)
    teachers = {}
    for model, source in raw["teachers"].items():
        source["train"] = str(PAPER_DIGITS.parent / source["train"])
        teachers[model] = trained_teacher(Path(source["train"]), uri, workdir)
        client(uri).log_metric(teachers[model], "test_top1_at_best_val", 50.0)  # what the teacher row shows
    raw["recipe"]["data"].update(root=str(workdir / "data"), val_size=1000)  # 437 images to train on
    raw["recipe"]["optim"].update(epochs=1, lr_decay_epochs=[])
    raw["methods"]["semckd"]["beta"] = 10.0  # far from where digits' 8x8 images diverge, on any CPU
    path = workdir / "paper.yaml"
    path.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "semckd_ray.reproduce", "--config", str(path), "--out", str(workdir / "report")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    mlflow = client(uri)
    with open(workdir / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline, finished_before, parents = time.monotonic() + 600, {}, []
    try:
        while time.monotonic() < deadline and first.poll() is None and not finished_before:
            experiment = mlflow.get_experiment_by_name("paper-digits")
            if experiment is not None:
                parents = mlflow.search_runs([experiment.experiment_id], filter_string="tags.role = 'sweep'")
            if parents:
                finished_before = {r.info.run_id: len(mlflow.get_metric_history(r.info.run_id, "epoch"))
                                   for r in children(mlflow, parents[0].info.run_id) if r.info.status == "FINISHED"}
            time.sleep(1)
        first_log = (workdir / "first.log").read_text()
        assert first.poll() is None, first_log[-3000:]
        assert finished_before, "no run of the grid finished in time: " + first_log[-3000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert all(f"reusing teacher run {run_id}" in first_log for run_id in teachers.values()), first_log[-3000:]
    assert "paper-digits: 10 runs (2 pairs, 3 methods, 2 seeds)" in first_log
    assert "[paper-digits] grid: 0/10 done, 1 running, 9 queued, 0 failed" in first_log

    resumed = subprocess.run(command + ["--resume"], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-4000:]
    assert all(f"reusing teacher run {run_id}" in resumed.stdout for run_id in teachers.values())
    assert "resuming sweep paper-digits-" in resumed.stdout
    assert "[paper-digits] grid: 10/10 done, 0 running, 0 queued, 0 failed" in resumed.stdout

    (parent,) = [r for r in mlflow.search_runs([parents[0].info.experiment_id]) if r.data.tags.get("role") == "sweep"]
    runs = children(mlflow, parent.info.run_id)
    assert [r.info.status for r in runs] == ["FINISHED"] * 10
    labels = {tuple(sorted((k, v) for k, v in r.data.tags.items() if k.startswith("searched."))) for r in runs}
    expected = {tuple(sorted({f"searched.{k}": str(v) for k, v in cell["label"].items()}.items()))
                for cell in grid_cells(parse_reproduce(raw))}
    assert labels == expected  # every cell once
    for run in runs:  # nothing trained twice: each epoch logged once
        assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "epoch")] == [1]
    for run_id, epochs in finished_before.items():
        assert len(mlflow.get_metric_history(run_id, "epoch")) == epochs
    assert {r.data.tags.get("teacher_run_id") for r in runs if r.data.tags.get("method") != "vanilla"} == \
        set(teachers.values())
    everything = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
    assert [r for r in everything if r.data.params.get("student.model") in teachers] == []  # no teacher trained
    assert mlflow.get_run(parent.info.run_id).data.metrics["grid/done"] == 10

    # The table: the student alone, KD and SemCKD for both pairs, each at n = 2 (seeds 0 and 1).
    with open(workdir / "report" / "table.csv") as f:
        lines = {(line["pair"], line["row"]): line for line in csv.DictReader(f)}
    for teacher, run_id in teachers.items():
        pair = f"{teacher}->resnet8"
        for row in ("student", "kd", "semckd"):
            assert (lines[(pair, row)]["n"], lines[(pair, row)]["seeds"]) == ("2", "0 1"), lines[(pair, row)]
        assert lines[(pair, "teacher")]["run_ids"] == run_id
    assert "| Method | resnet14->resnet8 | resnet20->resnet8 | ARI |" in resumed.stdout
    # The grid is the table, not a search: no score-against-cell plot, no Optuna section.
    assert not list((workdir / "report").glob("sweep_*.png"))
    assert "Optuna" not in (workdir / "report" / "report.md").read_text()
    assert "logged to MLflow run" in resumed.stdout


def test_resume_refuses_a_grid_that_changed_before_anything_runs(workdir):
    """The sweep's marker holds the grid's digest: a file changed since (here one more seed) is
    refused, naming the sweep, before a teacher trains or Ray starts; so is a missing sweep."""
    import json

    from semckd_ray import reproduce
    from semckd_ray.tune import SWEEP_FILE

    raw = read_yaml(PAPER_DIGITS)
    raw["teachers"]["resnet20"]["train"] = str(REPO / "tune_configs" / "teacher_digits.yaml")
    path = workdir / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="no sweep named 'paper-digits'"):
        reproduce.main(["--config", str(path), "--resume"])
    folder = workdir / "ray_results" / "paper-digits-20261203-120000"
    folder.mkdir(parents=True)
    (folder / SWEEP_FILE).write_text(json.dumps({"parent_run_id": "p", "sweep_name": folder.name,
                                                 "grid_sha256": "0" * 64}))
    with pytest.raises(UserError, match="the sweep paper-digits-20261203-120000 ran another grid"):
        reproduce.main(["--config", str(path), "--resume"])
