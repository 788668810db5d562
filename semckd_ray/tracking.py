"""MLflow at the edges: where runs go, how they are created, and logging that survives outages.

The driver creates the run (so a restarted worker keeps logging into the same one) and closes it;
rank 0 of the training workers logs metrics and artifacts into it through ``RunLogger``, which
keeps whatever the server refused and sends it once the server is back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from semckd_ray.errors import UserError

log = logging.getLogger(__name__)

PARENT_RUN_TAG = "mlflow.parentRunId"
# Environment variables whose values must never reach params, tags or artifacts.
SECRET_MARKERS = ("PASSWORD", "TOKEN", "SECRET", "KEY", "CREDENTIAL")


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


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before any training, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            problem = str(getattr(exc, "reason", exc))
        raise UserError(
            f"MLflow tracking server {uri} is unreachable ({problem}). Start it (for example "
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

    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(mlflow_client, name: str) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except Exception:
        # Another trial created it meanwhile.
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


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


class RunLogger:
    """Logs into one MLflow run; what the store refuses is kept and sent when it is back.

    Training never stops because tracking is down: each failed call is queued, a warning is
    printed once per outage, and every later call first tries to send the queue in order.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        # Fail fast inside a call instead of MLflow's default minutes of retries with backoff:
        # the queue is the retry.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self.run_id = run_id
        self._client = client(tracking_uri)
        self._pending: list[tuple[str, tuple, dict]] = []
        self._outage_since: float | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        # MLflow accepts at most 1000 metrics per batch.
        for start in range(0, len(batch), 1000):
            self._call("log_batch", self.run_id, metrics=batch[start : start + 1000])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params_for_mlflow(params).items()]
        for start in range(0, len(items), 100):
            self._call("log_batch", self.run_id, params=items[start : start + 100])

    def set_tag(self, key: str, value: Any) -> None:
        self._call("set_tag", self.run_id, key, str(value))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log_artifact", self.run_id, str(path), artifact_path)

    def flush(self) -> bool:
        """Send what is queued; True when nothing is left."""
        while self._pending:
            name, args, kwargs = self._pending[0]
            try:
                getattr(self._client, name)(*args, **kwargs)
            except Exception as exc:  # any store or network error: keep it for later
                self._note_outage(exc)
                return False
            self._pending.pop(0)
        if self._outage_since is not None:
            log.warning("MLflow is reachable again; sent everything kept during the outage")
            self._outage_since = None
        return True

    def _call(self, name: str, *args, **kwargs) -> None:
        self._pending.append((name, args, kwargs))
        self.flush()

    def _note_outage(self, exc: Exception) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            warnings.warn(
                f"MLflow logging failed ({type(exc).__name__}: {str(exc)[:200]}); training goes on "
                "and the metrics are kept until the tracking server is back",
                RuntimeWarning,
                stacklevel=3,
            )


def last_logged_step(tracking_uri: str, run_id: str, key: str) -> int:
    """The last step logged for ``key`` (-1 if none): a resumed run does not log an epoch twice."""
    try:
        history = client(tracking_uri).get_metric_history(run_id, key)
    except Exception:
        return -1
    return max((m.step for m in history), default=-1)
