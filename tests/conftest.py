"""Fixtures shared by the test suite: one two-node Ray cluster for the session, an S3 server, a clean
working directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from servers import S3_ENV

# A Ray instance a command starts on its own is Ray's single-machine mode (servers on 127.0.0.1
# only), and a client must be in that mode too, from before Ray is first imported, to reach it.
# The session's cluster (below) is in cluster mode, to have several nodes.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Dummy S3 credentials and region for the tests' S3 server (``s3_bucket``), in this process and
# so in every command and Ray node it starts (whose workers inherit their raylet's environment).
os.environ.update(S3_ENV)

CLUSTER_NODES = 2  # a head and one more node, one CPU each: the machine's two cores


@pytest.fixture(scope="session")
def ray_cluster():
    """A Ray cluster of two nodes for the session, on 127.0.0.1; this process and subprocesses join it.

    Two nodes of one CPU each: a two-worker training has its workers on different nodes, and a
    sweep's concurrent trials run on different nodes, as on a real cluster.
    """
    import shutil
    import tempfile

    from servers import StartError, start_ray_head, start_ray_worker_node, stop_marked, wait_until

    # A short path: Ray's Unix sockets live under the temp dir, and a socket path has ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="srh", dir="/tmp"))
    saved = dict(os.environ)
    try:
        head = start_ray_head(root, num_cpus=1)
        for k in range(1, CLUSTER_NODES):
            start_ray_worker_node(head, root / f"node{k}", num_cpus=1)
        for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            os.environ[key] = head.env[key]
        import ray  # after the environment names this cluster's token
        from ray._private import ray_constants

        # Read when Ray is first imported, which test collection may have done already.
        ray_constants.ENABLE_RAY_CLUSTER = True
        ray.init(address=head.address, log_to_driver=True)
        try:
            wait_until(lambda: sum(n["Alive"] for n in ray.nodes()) == CLUSTER_NODES, 120,
                       f"{CLUSTER_NODES} Ray nodes")
        except StartError as exc:
            pytest.fail(str(exc))
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


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1 for the session; yields its endpoint URL."""
    import shutil
    import signal
    import tempfile

    from servers import StartError, start_s3_server

    root = Path(tempfile.mkdtemp(prefix="semckd-s3-"))
    try:
        process, url = start_s3_server(root)
    except StartError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(str(exc))
    try:
        yield url
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3_bucket(s3_server):
    """A new, empty bucket on the session's S3 server: its URI, ``s3://NAME?endpoint_override=URL``."""
    import secrets

    from servers import create_bucket

    return create_bucket(s3_server, f"semckd-{secrets.token_hex(6)}")
