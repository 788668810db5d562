"""Fixtures shared by the test suite: one Ray head for the session, a clean working directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every Ray cluster the tests start is Ray's single-machine mode (servers on 127.0.0.1 only), and
# a client must be in that mode too, from before Ray is first imported, to reach it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray head node for the session, on 127.0.0.1; this process and subprocesses join it."""
    import shutil
    import tempfile

    from servers import start_ray_head, stop_marked

    # A short path: Ray's Unix sockets live under the temp dir, and a socket path has ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="srh", dir="/tmp"))
    saved = dict(os.environ)
    try:
        head = start_ray_head(root)
        for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            os.environ[key] = head.env[key]
        import ray  # after the environment names this cluster's token

        ray.init(address=head.address, log_to_driver=True)
        yield head
    finally:
        import ray

        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        stop_marked(str(root))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A clean working directory with its own MLflow store: nothing is written into the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path
