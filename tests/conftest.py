"""Helpers shared by the test suite: where the golden vectors of the official code live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def golden_dir() -> Path:
    """``$SEMCKD_GOLDEN_DIR``, else the ``shared/golden`` folder next to the repository."""
    env = os.environ.get("SEMCKD_GOLDEN_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def golden_files(pattern: str) -> list:
    """One ``pytest.param`` per golden file matching ``pattern``, for ``@pytest.mark.parametrize``.

    Looping over whatever the directory holds means a new vector file is checked without code
    changes; when there is nothing to check, a single skipped param says why.
    """
    directory = golden_dir()
    if not directory.is_dir():
        reason = f"golden directory {directory} not found (set SEMCKD_GOLDEN_DIR)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    files = sorted(directory.glob(pattern))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {pattern} in {directory}"))]
    return [pytest.param(path, id=path.name) for path in files]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the whole session, on 127.0.0.1; subprocesses attach through RAY_ADDRESS."""
    import ray

    if not ray.is_initialized():
        ray.init(
            _node_ip_address="127.0.0.1",
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(),
            log_to_driver=True,
        )
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A clean working directory with its own MLflow store: nothing is written into the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[1]
