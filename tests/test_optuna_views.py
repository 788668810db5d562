"""Optuna's view of a sweep (``semckd_ray.optuna_views``), from a handful of made-up trials: no Ray, no training."""

from __future__ import annotations

import csv
import math

import pytest

from semckd_ray import optuna_views
from semckd_ray.tracking import client as mlflow_client
from semckd_ray.tune import ParamSpec, short_names

SPACE = {
    "method.beta": ParamSpec(type="loguniform", low=1.0, high=1000.0),
    "method.options.factor": ParamSpec(type="choice", values=[2, 4, 8]),
    "method.options.proj_width": ParamSpec(type="randint", low=16, high=129),
}
NAMES = short_names(list(SPACE))  # {"beta": "method.beta", "factor": ..., "proj_width": ...}


def rows(n: int = 8) -> list[dict]:
    """Trials as the sweep's summary lists them: values as their tags hold them (strings), the score
    driven by beta alone, one failed and one diverged trial."""
    out = []
    for k in range(n):
        beta = 10.0 ** (k * 3 / (n - 1))
        out.append({"run_id": f"r{k}", "trial_id": f"t{k}", "searched.method.beta": str(beta),
                    "searched.method.options.factor": str([2, 4, 8][k % 3]),
                    "searched.method.options.proj_width": str([16, 100, 40, 128, 64, 20, 90, 50][k % 8]),
                    "best_val_top1": 50.0 + 10 * math.log10(beta), "epochs": 4,
                    "status": "STOPPED_EARLY" if k % 4 == 1 else "FINISHED"})
    out.append({**out[0], "run_id": "failed", "status": "FAILED", "best_val_top1": math.nan})
    out.append({**out[1], "run_id": "diverged", "status": "FINISHED", "best_val_top1": math.nan})
    return out


def test_short_names_are_what_the_tests_assume():
    assert NAMES == {"beta": "method.beta", "factor": "method.options.factor",
                     "proj_width": "method.options.proj_width"}


def test_study_holds_the_completed_trials_by_short_name_in_their_types():
    study, left_out = optuna_views.build_study(rows(), SPACE, NAMES)
    assert left_out == 2 and len(study.trials) == 8
    first = study.trials[0]
    assert first.params == {"beta": 1.0, "factor": 2, "proj_width": 16} and first.value == 50.0
    assert isinstance(first.params["factor"], int) and isinstance(first.params["proj_width"], int)
    assert study.best_trial.params["beta"] == pytest.approx(1000.0)


def test_views_are_written_with_dotted_and_short_names(tmp_path):
    study, _ = optuna_views.build_study(rows(), SPACE, NAMES)
    found, note, files = optuna_views.write_views(study, NAMES, tmp_path / "optuna")
    assert note is None
    assert sorted(p.name for p in files) == ["history.png", "param_importances.csv", "param_importances.png"]
    for path in files:
        assert path.stat().st_size > 0
    assert (tmp_path / "optuna" / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "optuna" / "param_importances.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["short"] for r in table] == list(found)
    assert {r["param"]: r["short"] for r in table} == {v: k for k, v in NAMES.items()}
    assert sum(float(r["importance"]) for r in table) == pytest.approx(1.0, abs=1e-4)
    assert table[0]["param"] == "method.beta"  # the score follows beta alone
    again, _, _ = optuna_views.write_views(study, NAMES, tmp_path / "again")
    assert again == found  # seeded


@pytest.mark.parametrize("case", ["one trial", "one param", "none"])
def test_importances_are_left_out_with_a_note_where_they_say_nothing(tmp_path, case):
    space, names, trials = SPACE, NAMES, rows()
    if case == "one trial":
        trials = trials[:1]
    elif case == "one param":
        space = {"method.beta": SPACE["method.beta"]}
        names = short_names(list(space))
    else:
        trials = [r for r in trials if r["status"] == "FAILED"]
    study, _ = optuna_views.build_study(trials, space, names)
    found, note, files = optuna_views.write_views(study, names, tmp_path / "optuna")
    assert found == {} and note.startswith("skipped: ")
    assert [p.name for p in files] == ([] if case == "none" else ["history.png"])


def test_views_land_on_the_parent_run_and_a_failure_only_warns(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow_client(uri)
    experiment = client.create_experiment("views", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment).info.run_id
    found = optuna_views.log_optuna_views(client, parent, rows(), SPACE, NAMES)
    logged = {a.path for a in client.list_artifacts(parent, "optuna")}
    assert logged == {"optuna/param_importances.csv", "optuna/param_importances.png", "optuna/history.png"}
    metrics = client.get_run(parent).data.metrics
    assert {k: v for k, v in metrics.items() if k.startswith("importance/")} == {
        f"importance/{k}": pytest.approx(v) for k, v in found.items()}

    lone = client.create_run(experiment).info.run_id
    optuna_views.log_optuna_views(client, lone, rows()[:1], SPACE, NAMES)
    assert client.get_run(lone).data.tags[optuna_views.NOTE_TAG].startswith("skipped: 1 completed trial")
    assert {a.path for a in client.list_artifacts(lone, "optuna")} == {"optuna/history.png"}

    with caplog.at_level("WARNING", logger="semckd_ray.optuna_views"):
        assert optuna_views.log_optuna_views(client, "no-such-run", rows(), SPACE, NAMES) == {}
    assert "could not log Optuna's view of the sweep" in caplog.text
