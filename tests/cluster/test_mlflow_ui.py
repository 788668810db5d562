"""The submitted sweep shows in the MLflow UI, as rendered by a headless Chromium.

The UI is a React app: ``--dump-dom`` after a virtual-time budget gives the page as a user sees
it, once its REST calls are answered.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


@pytest.fixture(scope="module")
def browser() -> str:
    """Chromium; installed with .ci/install_browser.sh (what CI runs) when missing."""
    if find_browser() is None:
        installed = subprocess.run(["bash", str(REPO / ".ci" / "install_browser.sh")],
                                   capture_output=True, text=True, timeout=900)
        if find_browser() is None:
            pytest.skip("no Chromium, and .ci/install_browser.sh could not install it "
                        f"(exit {installed.returncode}): {(installed.stdout + installed.stderr)[-500:]}")
    return find_browser()


def page_text(browser: str, url: str, home: Path, expected: list[str]) -> str:
    """The visible text of ``url``; waits longer (in virtual time) until every ``expected`` string shows.

    Chromium keeps its profile and crash reports under ``home``, none in the user's home.
    """
    text = ""
    for budget_ms in (15_000, 30_000, 60_000):
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={home / 'profile'}", f"--virtual-time-budget={budget_ms}",
             # The runs table renders only the columns that fit in the window.
             "--window-size=2400,1200",
             "--dump-dom", url],
            capture_output=True, text=True, timeout=180, env={**os.environ, "XDG_CONFIG_HOME": str(home / "config")},
        ).stdout
        text = " ".join(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)).split())
        if all(s in text for s in expected):
            break
    return text


def test_sweep_runs_show_in_the_mlflow_ui(mlflow_server, sweep_job, browser, tmp_path):
    experiment = mlflow_server.api("experiments/get-by-name",
                                    experiment_name=sweep_job.config["tracking"]["experiment"])["experiment"]
    eid = experiment["experiment_id"]
    (parent,) = mlflow_server.search_runs(eid, "tags.role = 'sweep'")
    (teacher,) = mlflow_server.search_runs(eid, "tags.role = 'teacher'")
    (best,) = mlflow_server.search_runs(eid, "tags.best_trial = 'true'")
    experiment_url = f"{mlflow_server.url}/#/experiments/{eid}"

    names = [experiment["name"], parent["info"]["run_name"], teacher["info"]["run_name"]]
    runs_page = page_text(browser, f"{experiment_url}/runs", tmp_path, names)
    for name in names:
        assert name in runs_page, f"{name!r} not on the runs page: {runs_page[:2000]}"

    best_url = f"{experiment_url}/runs/{best['info']['run_id']}"
    expected = [best["info"]["run_name"], "best_trial", parent["info"]["run_name"]]  # name, tag, parent link
    run_page = page_text(browser, best_url, tmp_path, expected)
    for text in expected:
        assert text in run_page, f"{text!r} not on the best trial's page: {run_page[:2000]}"

    artifacts_page = page_text(browser, f"{best_url}/artifacts", tmp_path, ["checkpoints"])
    assert "checkpoints" in artifacts_page, artifacts_page[:2000]


def test_the_sweeps_runs_view_shows_its_trials_best_first_with_their_values(mlflow_server, sweep_job, browser,
                                                                             tmp_path):
    """The experiment opens in the model-training view, and the view the sweep stored (the link its
    summary prints) lists the trials with the searched keys and the score as columns."""
    from semckd_ray import tracking

    experiment = mlflow_server.api("experiments/get-by-name",
                                    experiment_name=sweep_job.config["tracking"]["experiment"])["experiment"]
    tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    assert tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING
    eid = experiment["experiment_id"]
    (parent,) = mlflow_server.search_runs(eid, "tags.role = 'sweep'")
    parent_id = parent["info"]["run_id"]
    assert f"{tracking.SHARED_VIEW_TAG}{parent_id}" in tags
    url = tracking.runs_view_url(mlflow_server.url, eid, parent_id)
    assert url in sweep_job.output  # the summary printed it

    trials = mlflow_server.search_runs(eid, f"tags.`mlflow.parentRunId` = '{parent_id}'")
    names = [t["info"]["run_name"] for t in trials]
    searched = list(sweep_job.config["search"]["space"])
    expected = [*names, *searched, "best_val_top1", "test_top1_at_best_val"]
    page = page_text(browser, url, tmp_path, expected)
    for text in expected:
        assert text in page, f"{text!r} not in the sweep's runs view: {page[:3000]}"
    assert parent["info"]["run_name"] not in page  # the view lists the trials, not the parent
    for trial in trials:  # each trial's name says its sweep, its number and its values
        assert trial["info"]["run_name"].startswith(sweep_job.config["name"] + " ")
        assert " #0" in trial["info"]["run_name"] and "beta=" in trial["info"]["run_name"]
