"""Screenshots of the MLflow UI after a sweep, as a headless Chromium renders them.

    .venv/bin/python docs/screenshots.py [--tracking-uri sqlite:///$PWD/mlflow.db] [--experiment semckd-digits]
                                         [--out docs/img]

Takes the experiment's newest sweep and writes two PNG files into ``--out``:

- ``mlflow_sweep_runs.png``: the runs view the sweep stores and its summary prints a link to (its
  trials best first, the searched values and the scores as columns);
- ``mlflow_best_trial.png``: the best trial's run page (params, metrics, tags, its parent sweep).

A tracking URI that is not an HTTP server (a SQLite file) is served for the occasion by
``mlflow server`` on 127.0.0.1, stopped afterwards. Chromium: ``bash .ci/install_browser.sh``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from semckd_ray import tracking

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ui_server(uri: str):
    """The UI's base URL for ``uri``: the server itself, or an ``mlflow server`` started on it."""
    if uri.startswith(("http://", "https://")):
        yield uri.rstrip("/")
        return
    port = free_port()
    artifacts = tempfile.mkdtemp(prefix="mlflow-ui-")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", uri, "--default-artifact-root", artifacts],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"mlflow server on {uri} did not start (exit {server.poll()})")
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(artifacts, ignore_errors=True)


def screenshot(browser: str, url: str, path: Path, profile: Path, size: str = "1920,1000") -> Path:
    """``url`` rendered into ``path``, after 20 s of virtual time for the UI's REST calls."""
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size}", "--virtual-time-budget=20000",
         f"--screenshot={path}", url],
        check=True, capture_output=True, timeout=300, env={**os.environ, "XDG_CONFIG_HOME": str(profile / "config")})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or ./mlflow.db")
    parser.add_argument("--experiment", default="semckd-digits")
    parser.add_argument("--out", default="docs/img")
    args = parser.parse_args(argv)
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        raise SystemExit("no Chromium: install it with bash .ci/install_browser.sh")
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {tracking.redact(uri)}")
    eid = experiment.experiment_id
    sweeps = client.search_runs([eid], "tags.role = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1)
    if not sweeps:
        raise SystemExit(f"experiment {args.experiment!r} has no sweep: run python -m semckd_ray.tune first")
    parent = sweeps[0]
    best = client.search_runs([eid], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.best_trial = 'true'")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile, ui_server(uri) as url:
        view = tracking.runs_view_url(url, eid, parent.info.run_id)
        print(screenshot(browser, view, out / "mlflow_sweep_runs.png", Path(profile)), view)
        if best:
            page = f"{url}/#/experiments/{eid}/runs/{best[0].info.run_id}?workflowType=machine_learning"
            print(screenshot(browser, page, out / "mlflow_best_trial.png", Path(profile), size="1920,1200"), page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
