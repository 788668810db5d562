"""MLflow at the edges: where runs go, which server is reached and how, and what never reaches it.

The driver creates the run (so a restarted worker keeps logging into the same one) and closes it,
with MLflow's own retries; rank 0 of the training workers logs into it through
``semckd_ray.spool.SpooledLogger``, which loses nothing when the server is down.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from semckd_ray.errors import UserError

log = logging.getLogger(__name__)

PARENT_RUN_TAG = "mlflow.parentRunId"
SYSTEM_PREFIX = "system/"  # MLflow's system metrics (CPU, memory, GPUs), logged on steps of their own
# Environment variables whose values must never reach params, tags or artifacts.
SECRET_MARKERS = ("PASSWORD", "TOKEN", "SECRET", "KEY", "CREDENTIAL")


# The tracking-store schemes of MLflow 3.17.2 (``mlflow.tracking._tracking_service.utils.
# _tracking_store_registry``; "" there is a bare path, refused here), written out so that a URI is
# checked before Ray starts without importing mlflow. tests/test_credentials.py keeps them in step.
MLFLOW_STORE_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file",
                        "databricks", "databricks-uc", "uc")
# The synchronous SQLAlchemy drivers of MLflow's databases (``mysql+pymysql://...``).
DB_DRIVERS = {
    "sqlite": ("pysqlite", "pysqlcipher"),
    "postgresql": ("psycopg2", "psycopg", "pg8000", "psycopg2cffi"),
    "mysql": ("mysqldb", "pymysql", "mysqlconnector", "cymysql", "mariadbconnector", "pyodbc"),
    "mssql": ("pyodbc", "pymssql"),
}
# Health is open on MLflow's basic-auth app; this read needs the credentials.
AUTH_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
CREDENTIAL_VARIABLES = "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"


def resolve_tracking_uri(uri: str | None) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else a SQLite file in the working directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # A relative SQLite path means a different file on every worker: pin it here.
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def browse_hint(uri: str) -> str:
    """How a person opens the runs of ``uri`` in the MLflow UI (credentials left out)."""
    if uri.startswith(("http://", "https://")):
        return f"open {redact(uri)} in a browser"
    return f"mlflow ui --backend-store-uri {redact(uri)} --host 127.0.0.1 --port 5000"


def _plugin_schemes() -> set[str]:
    """Schemes that installed MLflow plugins register (entry points, read without importing mlflow)."""
    from importlib.metadata import entry_points

    try:
        return {ep.name for ep in entry_points(group="mlflow.tracking_store")}
    except Exception:  # a broken distribution's metadata must not stop a training
        return set()


def check_tracking_uri(uri: str) -> None:
    """Refuse a URI that MLflow has no tracking store for, naming the schemes it has."""
    import urllib.parse

    shown = redact(uri)
    allowed = ", ".join(f"{s}:" for s in (*MLFLOW_STORE_SCHEMES, *sorted(_plugin_schemes())))
    if uri in ("databricks", "databricks-uc", "uc"):
        return
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if not scheme or len(scheme) == 1:
        raise UserError(
            f"MLflow tracking URI {shown!r} is a bare path, not a URI: write sqlite:///ABSOLUTE/PATH.db "
            f"(or http://HOST:PORT for an MLflow server); MLflow's tracking stores are {allowed}"
        )
    base, plus, driver = scheme.partition("+")
    if plus and base in DB_DRIVERS:
        if driver not in DB_DRIVERS[base]:
            raise UserError(
                f"MLflow tracking URI {shown!r}: {driver!r} is not a SQLAlchemy driver of {base} (they are "
                f"{', '.join(DB_DRIVERS[base])}); write {base}://... for the default one"
            )
        return
    if scheme not in MLFLOW_STORE_SCHEMES and scheme not in _plugin_schemes():
        raise UserError(
            f"MLflow tracking URI {shown!r}: MLflow has no tracking store for {scheme}:; its tracking "
            f"stores are {allowed} (for example sqlite:///ABSOLUTE/PATH.db or http://HOST:5000)"
        )
    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
        raise UserError(
            f"MLflow tracking URI {shown!r}: MLflow 3.17 refuses file: stores unless "
            "MLFLOW_ALLOW_FILE_STORE=true is set; set it, or use sqlite:///ABSOLUTE/PATH.db instead"
        )


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``http://user:password@host/...`` -> (``http://host/...``, user, password), percent-decoded."""
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    return (urllib.parse.urlunsplit(parts._replace(netloc=host)), urllib.parse.unquote(user),
            urllib.parse.unquote(password) if colon else None)


def _authorization(user: str | None, password: str | None) -> tuple[str | None, str]:
    """The ``Authorization`` header MLflow's client sends, and where its credentials come from.

    As MLflow's client does (requests puts a URL's userinfo above MLflow's own header): the URI's
    ``user:password@`` first, then ``MLFLOW_TRACKING_USERNAME`` with ``MLFLOW_TRACKING_PASSWORD``,
    then ``MLFLOW_TRACKING_TOKEN``.
    """
    import base64

    def basic(name: str, secret: str) -> str:
        return "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode("ascii")

    if user:
        return basic(user, password or ""), "the URI's user:password@"
    env_user, env_password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if env_user and env_password:
        return basic(env_user, env_password), "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}", "MLFLOW_TRACKING_TOKEN"
    return None, "no credentials"


def _get(url: str, authorization: str | None, timeout_s: float) -> tuple[int, str]:
    """(HTTP status, problem) of a GET of ``url``; status 0 when nothing answers."""
    request = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return exc.code, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(getattr(exc, "reason", exc))


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before any training, when the tracking store cannot be used.

    An MLflow server is asked for ``/health`` and then for one experiment, with the credentials
    MLflow's client would send, so a server that wants other credentials is refused here, not in
    the middle of a training. No error names a password.
    """
    check_tracking_uri(uri)
    shown = redact(uri)
    if uri.startswith(("http://", "https://")):
        plain, user, password = split_credentials(uri)
        base = plain.rstrip("/")
        status, problem = _get(base + "/health", None, timeout_s)
        if status == 200:
            authorization, source = _authorization(user, password)
            status, problem = _get(base + AUTH_PROBE, authorization, timeout_s)
            if status == 200:
                return
            if status in (401, 403) and authorization:
                raise UserError(
                    f"MLflow server {shown} refused the credentials ({problem}) of {source}: check "
                    f"{CREDENTIAL_VARIABLES}, or the user:password@ of tracking.uri / $MLFLOW_TRACKING_URI"
                )
            if status in (401, 403):
                raise UserError(
                    f"MLflow server {shown} requires credentials ({problem}): set {CREDENTIAL_VARIABLES}, "
                    "or write them into the URI, http://USER:PASSWORD@HOST:PORT"
                )
            # Anything else (a proxy that routes only part of the API, say) is left to MLflow's client.
            log.debug("MLflow server %s: %s answered %s", shown, AUTH_PROBE, problem)
            return
        raise UserError(
            f"MLflow tracking server {shown} is unreachable ({redact(problem)}). Start it (for example "
            f"'mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db'), "
            "or point 'tracking.uri' / $MLFLOW_TRACKING_URI at a running server or at a "
            "sqlite:///ABSOLUTE/PATH.db file."
        )
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(
                f"MLflow tracking URI {uri}: folder {folder} does not exist or is not writable; "
                "create it or set 'tracking.uri' / $MLFLOW_TRACKING_URI elsewhere."
            )


def client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")) and split_credentials(uri)[1] is not None:
        # MLflow prints "View run ... at: <the tracking URI>/#/..." when a run ends, user:password@
        # and all; the commands print their own, redacted, browse_hint instead.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=uri)


# MLflow 3's UI opens an experiment in its GenAI view unless the experiment says it trains models.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# An experiment tag that holds a runs-page view (filter, sort, columns); the UI opens it from
# ``?viewStateShareKey=<key>``, as its own "Share" button does.
SHARED_VIEW_TAG = "mlflow.sharedViewState."


def get_or_create_experiment(mlflow_client, name: str) -> str:
    """The experiment's id, created as a model-training experiment if it does not exist; an experiment
    of ours that predates the kind tag gets it, and a kind someone chose is left as it is."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return mlflow_client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except Exception:
            # Another trial created it meanwhile.
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


def share_runs_view(mlflow_client, experiment_id: str, key: str, *, search_filter: str, order_by: str,
                    columns: list[str]) -> None:
    """Store a runs-page view under ``key`` (see ``runs_view_url``): the runs that ``search_filter``
    finds, sorted by ``order_by`` (a metric, highest first), with ``columns`` shown (``params.`k` ``,
    ``metrics.`k` ``, ``tags.`k` ``) and every run drawn in the charts, not the first ten."""
    import json

    view = {"searchFilter": search_filter, "orderByKey": order_by, "orderByAsc": False,
            "selectedColumns": columns, "runsHiddenMode": "SHOW_ALL"}
    mlflow_client.set_experiment_tag(experiment_id, f"{SHARED_VIEW_TAG}{key}", json.dumps(view))


def runs_view_url(uri: str, experiment_id: str, key: str) -> str:
    """The MLflow UI's address of a view stored by ``share_runs_view``: the tracking server's own
    for an HTTP URI, else the ``mlflow ui`` that ``browse_hint`` starts."""
    base = redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={key}"


def git_commit() -> str:
    """The commit of the code being run; ``SEMCKD_GIT_COMMIT`` where ``.git`` is not uploaded (Ray jobs)."""
    if os.environ.get("SEMCKD_GIT_COMMIT"):
        return os.environ["SEMCKD_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def redact(value: Any) -> Any:
    """``value`` (a string, or dicts and lists of them) with no credential left in it.

    The userinfo of every URL (``https://user:password@host`` -> ``https://host``) is stripped, and
    any secret from the environment (a credential pasted into a config) becomes ``<redacted>``.
    """
    secrets = sorted(
        {value for name, value in os.environ.items()
         if len(value) >= 8 and any(marker in name.upper() for marker in SECRET_MARKERS)},
        key=len, reverse=True,
    )
    return _redact(value, secrets)


_URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")


def _redact(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v, secrets) for v in value]
    if not isinstance(value, str):
        return "<redacted>" if str(value) in secrets else value
    text = _URL_USERINFO.sub(r"\1", value)
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return text


def params_for_mlflow(flat: dict[str, Any]) -> dict[str, str]:
    """MLflow params are strings of at most 6000 characters."""
    return {k: str(v)[:6000] for k, v in redact(flat).items()}


def log_params(mlflow_client, run_id: str, params: dict[str, Any]) -> None:
    """Log ``params`` (redacted, as strings) in batches of MLflow's limit of 100."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params_for_mlflow(params).items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def logged_steps(mlflow_client, run_id: str, key: str) -> set[int]:
    """The steps the run has logged for ``key``: a resumed run does not log an epoch twice."""
    return {m.step for m in mlflow_client.get_metric_history(run_id, key)}
