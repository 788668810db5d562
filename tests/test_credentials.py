"""Credentials work and never leak: a tracking server that wants a password, and URIs MLflow has no store for.

The unit tests (no server, no Ray) check how ``check_reachable`` sends credentials and which URIs
``check_tracking_uri`` refuses. The end-to-end test starts ``mlflow server --app-name basic-auth``,
plants a fresh password, trains through the real command line with ``user:password@`` in the URI,
then scans everything the training wrote (its output, working folder, storage, Ray's session
logs, the server's stores) for that password.
"""

from __future__ import annotations

import base64
import json
import http.server
import io
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest

from paths import REPO
from semckd_ray import tracking
from semckd_ray.errors import UserError

TEACHER_CONFIG = REPO / "tune_configs" / "teacher_digits.yaml"

# ------------------------------------------------------------------------------------------
# check_reachable against a tiny server that wants HTTP Basic credentials


class _AuthHandler(http.server.BaseHTTPRequestHandler):
    """``/health`` open, the rest Basic-protected, like MLflow's basic-auth app; records what it got."""

    expected = ""  # the Authorization header that passes
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        header = self.headers.get("Authorization")
        type(self).seen.append((self.path, header))
        ok = self.path == "/health" or header == self.expected
        self.send_response(200 if ok else 401)
        if not ok:
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def basic_server():
    """(url, handler class): ``http://127.0.0.1:PORT`` that accepts user ``alice`` with a fresh password."""
    password = "p@ss:" + secrets.token_hex(8)  # characters that must be percent-encoded in a URI
    handler = type("Handler", (_AuthHandler,), {
        "expected": "Basic " + base64.b64encode(f"alice:{password}".encode()).decode(), "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.password = password
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_mlflow_credentials(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def _encoded(password: str) -> str:
    from urllib.parse import quote

    return quote(password, safe="")


def test_userinfo_is_sent_as_basic_auth_and_not_as_part_of_the_host(basic_server, no_mlflow_credentials):
    url, handler = basic_server
    tracking.check_reachable(url.replace("http://", f"http://alice:{_encoded(handler.password)}@"))
    paths = [path for path, _ in handler.seen]
    assert paths == ["/health", tracking.AUTH_PROBE]
    assert handler.seen[1][1] == handler.expected


def test_mlflow_username_and_password_variables_are_sent(basic_server, no_mlflow_credentials, monkeypatch):
    url, handler = basic_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", handler.password)
    tracking.check_reachable(url)
    assert handler.seen[-1] == (tracking.AUTH_PROBE, handler.expected)


def test_a_token_is_sent_as_bearer(basic_server, no_mlflow_credentials, monkeypatch):
    url, handler = basic_server
    token = secrets.token_hex(16)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    with pytest.raises(UserError) as err:  # this server wants Basic
        tracking.check_reachable(url)
    assert handler.seen[-1] == (tracking.AUTH_PROBE, f"Bearer {token}")
    assert token not in str(err.value) and "MLFLOW_TRACKING_TOKEN" in str(err.value)


def test_wrong_or_missing_credentials_are_a_clear_error_without_the_password(basic_server, no_mlflow_credentials,
                                                                              monkeypatch):
    url, handler = basic_server
    wrong = "wrong-" + secrets.token_hex(8)
    with pytest.raises(UserError) as err:
        tracking.check_reachable(url.replace("http://", f"http://alice:{wrong}@"))
    message = str(err.value)
    assert f"MLflow server {url} refused the credentials (HTTP 401)" in message
    assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert wrong not in message and "alice" not in message

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", wrong)
    with pytest.raises(UserError, match="refused the credentials") as err:
        tracking.check_reachable(url)
    assert wrong not in str(err.value)

    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(UserError, match=r"requires credentials \(HTTP 401\).*MLFLOW_TRACKING_PASSWORD"):
        tracking.check_reachable(url)


def test_an_unreachable_server_with_credentials_does_not_print_them(no_mlflow_credentials):
    from servers import free_port

    password = secrets.token_hex(12)
    uri = f"http://bob:{password}@127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match="unreachable") as err:
        tracking.check_reachable(uri, timeout_s=2)
    assert password not in str(err.value) and "bob" not in str(err.value)
    assert "@" not in str(err.value).split("unreachable")[0]


def test_split_credentials():
    assert tracking.split_credentials("https://u:p%40ss@host:5000/x") == ("https://host:5000/x", "u", "p@ss")
    assert tracking.split_credentials("http://host:5000") == ("http://host:5000", None, None)
    assert tracking.split_credentials("http://tok@host") == ("http://host", "tok", None)


# ------------------------------------------------------------------------------------------
# Which URIs MLflow has a tracking store for


@pytest.mark.parametrize("uri, needles", [
    ("foo://x", ["no tracking store for foo:", "sqlite:", "http:"]),
    ("mysql+bogus://u:secretpass1@db/x", ["'bogus' is not a SQLAlchemy driver of mysql", "pymysql"]),
    ("mlruns", ["bare path", "sqlite:///ABSOLUTE/PATH.db"]),
    ("/abs/mlruns", ["bare path"]),
    ("file:///tmp/mlruns", ["MLFLOW_ALLOW_FILE_STORE=true"]),
    ("a+b+c://x", ["no tracking store"]),
])
def test_a_uri_mlflow_has_no_store_for_is_refused(uri, needles, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(UserError) as err:
        tracking.check_reachable(uri)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert "secretpass1" not in str(err.value)


@pytest.mark.parametrize("uri", ["sqlite:////tmp/x.db", "postgresql://u@h/db", "postgresql+psycopg2://h/db",
                                 "mysql+pymysql://h/db", "mssql+pyodbc://h/db", "databricks", "databricks://profile",
                                 "uc", "databricks-uc"])
def test_the_uris_mlflow_has_stores_for_pass_the_scheme_check(uri):
    tracking.check_tracking_uri(uri)


def test_a_file_store_passes_with_mlflow_allow_file_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracking.check_tracking_uri("file:///tmp/mlruns")


def test_the_scheme_list_is_mlflows_own():
    """``MLFLOW_STORE_SCHEMES`` is written out (no mlflow import at check time): it must not drift."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    registered = set(_tracking_store_registry._registry) - {""}  # "": a bare path, refused on purpose
    assert registered == set(tracking.MLFLOW_STORE_SCHEMES) | tracking._plugin_schemes()
    from mlflow.store.db.db_types import DATABASE_ENGINES

    assert set(DATABASE_ENGINES) == set(tracking.DB_DRIVERS)


def test_every_listed_database_driver_is_a_sqlalchemy_dialect():
    from sqlalchemy.dialects import registry

    for database, drivers in tracking.DB_DRIVERS.items():
        for driver in drivers:
            registry.load(f"{database}.{driver}")  # the dialect class; its DBAPI need not be installed


def test_checking_a_uri_does_not_import_mlflow():
    code = ("import sys; from semckd_ray import tracking; tracking.check_tracking_uri('sqlite:////tmp/x.db'); "
            "tracking.redact('http://a:b@h'); assert 'mlflow' not in sys.modules, 'mlflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------------------
# A real training against a server that wants a password


def _files(*roots: Path):
    for root in roots:
        if root.is_file():
            yield root
        for path in sorted(root.rglob("*")) if root.is_dir() else ():
            if path.is_file() and not path.is_symlink():
                yield path


def _holds(path: Path, needles: list[bytes]) -> bool:
    """Whether ``path``'s bytes, or those of any member of it as a zip (torch files are), hold a needle."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if any(n in data for n in needles):
        return True
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return any(any(n in archive.read(m) for n in needles) for m in archive.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            return False
    return False


def _masked(text: str, needles: list[bytes]) -> str:
    for n in needles:
        text = text.replace(n.decode(), "<PASSWORD>")
    return text


def _context(path: Path, needles: list[bytes]) -> str:
    """Where in ``path`` a needle is (masked), for a failure message."""
    data = path.read_bytes()
    at = next((data.find(n) for n in needles if n in data), -1)
    return f"{path}: " + (_masked(data[max(0, at - 200):at + 100].decode(errors="replace"), needles)
                          if at >= 0 else "(inside a zip member)")


def _needles(password: str) -> list[bytes]:
    from urllib.parse import quote

    forms = {password, quote(password, safe=""), base64.b64encode(f"admin:{password}".encode()).decode()}
    return [f.encode() for f in forms]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """(url, admin password, its folder): ``mlflow server --app-name basic-auth`` on 127.0.0.1, shared by
    this file's tests and stopped by its process group."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (pip install 'mlflow[auth]')")
    from servers import start_mlflow_auth_server

    password = "Pw-" + secrets.token_hex(16)
    root = tmp_path_factory.mktemp("auth_server")
    process, url = start_mlflow_auth_server(root, password)
    try:
        yield url, password, root
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
                process.wait(20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def _sweep_config(work: Path, storage: Path) -> Path:
    """A one-trial sweep whose teacher the sweep trains first (a standalone training of one epoch):
    one command writes what a training and a sweep write. Short epochs (437 training images)."""
    import yaml

    data = {"dataset": "digits", "root": str(work / "data"), "val_size": 1000}
    teacher = {"name": "cred-teacher", "seed": 0, "data": data, "student": {"model": "resnet8"},
               "method": {"name": "vanilla"}, "optim": {"epochs": 1, "batch_size": 32, "lr_decay_epochs": []},
               "checkpoint": {"every": 1}, "tracking": {"experiment": "credentials"}}
    (work / "teacher.yaml").write_text(yaml.safe_dump(teacher))
    sweep = {"name": "cred-sweep", "seed": 0, "data": data, "student": {"model": "resnet8"},
             "teacher": {"model": "resnet8", "train": "teacher.yaml"}, "method": {"name": "kd"},
             "optim": {"epochs": 1, "batch_size": 32, "lr_decay_epochs": []}, "checkpoint": {"every": 1},
             "tracking": {"experiment": "credentials", "storage_path": str(storage)},
             "search": {"num_samples": 1, "seed": 0, "scheduler": {"type": "none"},
                        "space": {"optim.lr": {"type": "choice", "values": [0.05]}}}}
    path = work / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.slow
def test_a_password_server_logs_a_training_and_a_sweep_and_the_password_is_nowhere(auth_server, tmp_path, monkeypatch):
    """The sweep trains its teacher (a training of its own, with its checkpoints and marker), then its
    trial; the password planted in the tracking URI is in nothing either wrote or printed: files under
    the working folder, the storage path (checkpoints, Tune's state, the sweep's marker, spools), Ray's
    session folder (logs of every worker), the MLflow server's store and every artifact."""
    from servers import MARKER, stop_marked

    url, password, server_root = auth_server
    work, storage = tmp_path / "work", tmp_path / "storage"
    work.mkdir()
    # Ray's Unix sockets live under its temp dir: a short path, of this test's own.
    ray_tmp = Path(tempfile.mkdtemp(prefix="scr", dir="/tmp"))
    marker = f"credentials-{secrets.token_hex(4)}"
    uri = url.replace("http://", f"http://admin:{password}@")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                        "MLFLOW_TRACKING_TOKEN")}
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1", **{MARKER: marker})
    command = [sys.executable, "-m", "semckd_ray.tune", "--config", str(_sweep_config(work, storage)),
               "--set", f"tracking.uri={uri}"]
    try:
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop_marked(marker)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    # The runs are there, logged with the password the URI carried.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    mlflow = tracking.client(url)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("credentials").experiment_id])
    roles = sorted(r.data.tags.get("role") for r in runs)
    assert roles == ["student", "sweep", "teacher"], roles  # the trial's run is the student's
    assert all(r.info.status == "FINISHED" for r in runs), [(r.data.tags.get("role"), r.info.status) for r in runs]
    for run in runs:
        if run.data.tags.get("role") != "sweep":
            assert run.data.metrics.get("epoch") == 1
            assert run.data.params["tracking.uri"] == url  # the URI, without its credentials

    # ... and the password is in none of what the training and the sweep wrote or said.
    needles = _needles(password)
    said = [line for line in output.splitlines() if any(n.decode() in line for n in needles)]
    assert not said, "the password is in the command's output:\n" + _masked("\n".join(said[:20]), needles)
    checkpoints = [p for p in _files(storage) if p.name == "state.pt"]
    assert len(checkpoints) >= 2, f"no checkpoint of both trainings under {storage}: {checkpoints}"
    import torch

    for path in checkpoints:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        assert saved["config"]["tracking"]["uri"] == url, path
    from semckd_ray.trainer import TRAIN_FILE
    from semckd_ray.tune import SWEEP_FILE

    markers = {p.name: json.loads(p.read_text()) for p in _files(storage) if p.name in (SWEEP_FILE, TRAIN_FILE)}
    assert set(markers) == {SWEEP_FILE, TRAIN_FILE}, sorted(p.name for p in _files(storage))
    assert markers[SWEEP_FILE]["tracking_uri"] == url
    artifacts = Path(tempfile.mkdtemp(dir=tmp_path))
    for run in runs:
        mlflow.download_artifacts(run.info.run_id, "", str(artifacts / run.info.run_id))
    everything = (work, storage, ray_tmp, server_root / "mlflow.db", server_root / "mlartifacts", artifacts)
    leaks = [str(p) for p in _files(*everything) if _holds(p, needles)]
    assert not leaks, f"the password is in {leaks}:\n" + "\n".join(_context(Path(p), needles) for p in leaks[:10])
    texts = [repr(r.data.params) + repr(r.data.tags) + (r.info.run_name or "") for r in runs]
    assert not any(n.decode() in t for t in texts for n in needles)
    assert any(_files(ray_tmp)), "the sweep's Ray wrote no session files where RAY_TMPDIR pointed"
    assert list(artifacts.rglob("*.pt")), "no checkpoint among the runs' artifacts"


@pytest.mark.slow
def test_mlflow_credential_variables_work_and_a_wrong_password_is_refused(auth_server, monkeypatch):
    url, password, server_root = auth_server
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    tracking.check_reachable(url)
    mlflow = tracking.client(url)
    experiment = tracking.get_or_create_experiment(mlflow, "credentials-env")
    run = mlflow.create_run(experiment, tags=tracking.redact({"note": f"uri {url}"}))
    tracking.log_params(mlflow, run.info.run_id, {"tracking.uri": url})
    mlflow.log_metric(run.info.run_id, "epoch", 1.0, step=1)
    mlflow.set_terminated(run.info.run_id)
    assert mlflow.get_run(run.info.run_id).data.metrics["epoch"] == 1.0

    wrong = "Wrong-" + secrets.token_hex(8)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", wrong)
    with pytest.raises(UserError) as err:
        tracking.check_reachable(url)
    message = str(err.value)
    assert f"MLflow server {url} refused the credentials (HTTP 401)" in message
    assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert wrong not in message and password not in message
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(UserError) as err:
        tracking.check_reachable(url.replace("http://", f"http://admin:{wrong}@"))
    assert "refused the credentials" in str(err.value) and wrong not in str(err.value)
    leaks = [str(p) for p in _files(server_root / "mlflow.db", server_root / "mlartifacts")
             if _holds(p, _needles(password))]
    assert not leaks, leaks
