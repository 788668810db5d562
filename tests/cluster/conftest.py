"""An MLflow server, and the smoke sweep submitted to the session's Ray head node with ``ray job submit``.

Everything happens the way docs/scale_out.md tells a user to do it: a head node with token
authentication (the session's ``ray_cluster``), ``mlflow server`` proxying artifacts, and
``ray job submit --working-dir`` with the tracking URI in the runtime environment. Both tests in
this folder share one submission; every process is stopped by its id at the end, also on failure.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from servers import StartError, start_mlflow_server, stop_marked

REPO = Path(__file__).resolve().parents[2]
SWEEP_CONFIG = "tune_configs/smoke.yaml"
EPOCHS = 2  # the smoke sweep as written, with one epoch less per trial
TRIALS = 2  # and two trials, not four: one on each node, at the same time
JOB_TIMEOUT_S = 900  # the sweep takes 2-5 minutes on 2 busy cores
TEACHER_EPOCHS = 2  # the teacher the sweep trains first: tune_configs/teacher_digits.yaml, 6 epochs shorter
VAL_SIZE = 1000  # of digits' 1437 training images, for both: 437 left to train on, for short epochs


@dataclass
class MlflowServer:
    url: str

    def api(self, endpoint: str, body: dict | None = None, **query) -> dict:
        """One call of the REST API (``/api/2.0/mlflow/<endpoint>``): GET, or POST with ``body``."""
        url = f"{self.url}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def search_runs(self, experiment_id: str, filter_string: str) -> list[dict]:
        body = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1000}
        return self.api("runs/search", body).get("runs", [])


@dataclass
class SweepJob:
    config: dict  # the experiment file as submitted, with the --set number of trials
    epochs: int
    storage_path: Path
    git_commit: str
    output: str  # what `ray job submit` printed: the job's own log


@pytest.fixture(scope="package")
def mlflow_server():
    root = Path(tempfile.mkdtemp(prefix="srm", dir="/tmp"))
    try:
        _, url = start_mlflow_server(root)
        yield MlflowServer(url=url)
    except StartError as exc:
        pytest.fail(str(exc))
    finally:
        stop_marked(str(root))
        shutil.rmtree(root, ignore_errors=True)


def _git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _snapshot(repo: Path, dest: Path) -> Path:
    """The working tree as it is now, without what never travels (.git, .venv, run-time output).

    Ray hashes the working dir twice during ``ray job submit``; a file edited in between (a
    developer's editor, a concurrent test) makes the job reference a package that was never
    uploaded. A still copy keeps the submission deterministic; .gitignore and .rayignore travel
    with it, so Ray applies the same exclusions as to the repository itself.
    """
    top_level_skip = {".git", ".venv", "data", "runs", "mlruns", "mlartifacts", "ray_results", "mlflow.db"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if Path(folder) == repo:
            skip |= top_level_skip.intersection(names)
        return skip

    shutil.copytree(repo, dest, ignore=ignore, symlinks=True)
    return dest


def _job_status(head, submission_id: str) -> str | None:
    """The job's status from the dashboard's REST API, authenticated with the cluster's token."""
    request = urllib.request.Request(f"{head.dashboard_url}/api/jobs/{submission_id}",
                                     headers={"Authorization": f"Bearer {head.token()}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response).get("status")


@pytest.fixture(scope="package")
def sweep_job(ray_cluster, mlflow_server, tmp_path_factory):
    """The smoke sweep, submitted as docs/scale_out.md says; fails with the job's log unless it succeeds."""
    head = ray_cluster
    work = tmp_path_factory.mktemp("sweep_job")
    submission_id = f"semckd-smoke-{secrets.token_hex(4)}"
    commit = _git_commit()
    checkout = _snapshot(REPO, work / "checkout")
    # The sweep trains its teacher first, as a user's does; a shorter one (a file beside the others,
    # since --set reaches the student's config only) keeps the fixture's time for the sweep itself.
    teacher = yaml.safe_load((checkout / "tune_configs" / "teacher_digits.yaml").read_text())
    teacher["optim"].update(epochs=TEACHER_EPOCHS, lr_decay_epochs=[TEACHER_EPOCHS])
    teacher["data"]["val_size"] = VAL_SIZE
    (checkout / "tune_configs" / "teacher_digits_ci.yaml").write_text(yaml.safe_dump(teacher))
    runtime_env = {
        "env_vars": {"MLFLOW_TRACKING_URI": mlflow_server.url, "SEMCKD_GIT_COMMIT": commit},
        "excludes": [".git/", "/data/", "/mlruns/", "/mlartifacts/", "/ray_results/", "mlflow.db"],
    }
    command = [
        "job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
        "--working-dir", str(checkout), "--runtime-env-json", json.dumps(runtime_env),
        "--", "python", "-m", "semckd_ray.tune", "--config", SWEEP_CONFIG,
        "--set", f"tracking.storage_path={work / 'shared_storage'}",
        "--set", f"data.root={work / 'data'}",
        "--set", f"data.val_size={VAL_SIZE}",
        "--set", f"optim.epochs={EPOCHS}",
        "--set", f"search.num_samples={TRIALS}",
        "--set", "teacher.train=teacher_digits_ci.yaml",
    ]
    try:
        submitted = head.ray(*command, timeout_s=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        head.ray("job", "stop", "--address", head.dashboard_url, submission_id)
        logs = head.ray("job", "logs", "--address", head.dashboard_url, submission_id)
        pytest.fail(f"job {submission_id} did not finish in {JOB_TIMEOUT_S} s; its log:\n{logs.stdout[-20000:]}")
    status = _job_status(head, submission_id)
    if submitted.returncode != 0 or status != "SUCCEEDED":
        logs = head.ray("job", "logs", "--address", head.dashboard_url, submission_id)
        pytest.fail(f"job {submission_id} ended {status} (ray job submit exited {submitted.returncode})\n"
                    f"--- job log ---\n{logs.stdout[-20000:]}\n--- ray job submit ---\n{submitted.stderr[-5000:]}")
    config = yaml.safe_load((REPO / SWEEP_CONFIG).read_text())
    config["search"]["num_samples"] = TRIALS
    return SweepJob(config=config, epochs=EPOCHS, storage_path=work / "shared_storage", git_commit=commit, output=submitted.stdout)
