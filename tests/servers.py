"""Real servers for the tests, all on 127.0.0.1: a Ray head node, an MLflow server, an S3 server.

Each is started as a user would (``ray start --head``, ``mlflow server``) and every process it
spawns carries a marker in its environment, so that teardown stops exactly those processes and
nothing else (``ray stop`` would stop every Ray instance on the machine).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent  # ray, mlflow and the python that runs jobs
START_TIMEOUT_S = 300  # start-ups on 2 loaded cores; every wait is bounded
MARKER = "SEMCKD_TEST_SERVER"
# The test cluster's nodes register under a loopback address: in cluster mode Ray replaces
# 127.0.0.1 (and only that spelling) by the machine's network address. Ray's GCS and raylets still
# listen on every interface in cluster mode (it has no setting to narrow them); token
# authentication guards them, and every address a test uses is a loopback one.
NODE_IP = "127.0.0.2"


class StartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready, timeout_s: float, what: str, diagnose=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(1.0)
    raise StartError(f"{what} not ready after {timeout_s:.0f} s\n{diagnose()}")


def marked_pids(value: str) -> list[int]:
    """The processes whose environment carries ``MARKER=value``."""
    needle = f"{MARKER}={value}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def stop_marked(value: str, grace_s: float = 15.0) -> None:
    """SIGTERM every marked process, SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked_pids(value):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while marked_pids(value) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not marked_pids(value):
            return


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def http_status(url: str, timeout_s: float = 10.0) -> int:
    """The HTTP status of a GET of ``url``; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


# What the S3 clients of the tests use with the S3 server below (moto accepts any credentials):
# pyarrow in the tests, in the commands they start and in the Ray workers, whose environment is
# their raylet's (``base_env``). No instance metadata lookup, one fixed region.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "semckd-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "semckd-test-secret-key",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def base_env(root: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", MARKER: str(root), **S3_ENV}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@dataclass
class RayHead:
    address: str  # GCS address, what RAY_ADDRESS names
    dashboard_url: str  # where `ray job submit --address` points
    env: dict[str, str]  # what a client of this cluster needs: its address and token

    def ray(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)

    def token(self) -> str:
        return Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()


def autoscaling_config(gcs_address: str, node_types: dict[str, dict], head_cpus: int) -> dict:
    """A cluster config whose autoscaler really adds nodes, as raylets on this machine.

    ``node_types``: name -> ``{"resources": {...}, "max_workers": n}``, as in a cluster YAML.
    """
    return {
        "cluster_name": "semckd-test", "max_workers": sum(t["max_workers"] for t in node_types.values()),
        "provider": {"type": "external", "module": "loopback_provider.LoopbackNodeProvider",
                     "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **{name: {"node_config": {}, "min_workers": 0, **t} for name, t in node_types.items()},
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 30,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def start_ray_head(root: Path, num_cpus: int = 2, autoscale: dict[str, dict] | None = None) -> RayHead:
    """``ray start --head`` on a loopback address with token authentication and a token of its own.

    ``autoscale`` (node types, see ``autoscaling_config``): the head runs an autoscaler that starts
    nodes of those types on this machine when work waits for resources.
    """
    import json

    token = root / "ray_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    gcs_port, dashboard_port = free_port(), free_port()
    env = {
        **base_env(root),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        # Inherited by every Ray process: Ray Train's placement-group cleaner looks its cluster up
        # by this address and, without it, fails (and leaks the group) when other Ray instances
        # run on the machine.
        "RAY_ADDRESS": f"{NODE_IP}:{gcs_port}",
        # Cluster mode, so that more nodes can join (single-machine mode refuses them).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
    }
    extra = []
    if autoscale:
        config = root / "autoscaling.json"
        config.write_text(json.dumps(autoscaling_config(env["RAY_ADDRESS"], autoscale, num_cpus)))
        extra = ["--autoscaling-config", str(config)]
        tests = str(Path(__file__).resolve().parent)
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                   PYTHONPATH=os.pathsep.join(p for p in (tests, env.get("PYTHONPATH", "")) if p))
    started = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address", NODE_IP, "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
         "--num-cpus", str(num_cpus), "--disable-usage-stats", "--temp-dir", str(root / "ray"), *extra],
        env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S,
    )
    if started.returncode != 0:
        raise StartError(f"ray start failed ({started.returncode}):\n{started.stdout}\n{started.stderr}")
    return RayHead(address=env["RAY_ADDRESS"], dashboard_url=f"http://127.0.0.1:{dashboard_port}", env=env)


def start_ray_worker_node(head: RayHead, root: Path, num_cpus: int = 1, marker: str | None = None) -> None:
    """``ray start --address`` joining ``head`` as another node: its own CPUs, temp folder and ports.

    On one machine the nodes share the host, but each has its own raylet, object store and
    worker processes, so Ray schedules across them exactly as across hosts. Its processes carry
    the head's marker, or ``marker``: then ``stop_marked(marker)`` stops this node alone.
    """
    root.mkdir(parents=True, exist_ok=True)
    started = subprocess.run(
        [str(BIN / "ray"), "start", "--address", head.address, "--node-ip-address", NODE_IP,
         "--num-cpus", str(num_cpus), "--disable-usage-stats", "--temp-dir", str(root),
         "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())],
        env={**head.env, MARKER: marker} if marker else head.env, capture_output=True, text=True,
        timeout=START_TIMEOUT_S,
    )
    if started.returncode != 0:
        raise StartError(f"ray start --address failed ({started.returncode}):\n{started.stdout}\n{started.stderr}")


def _start_http_server(name: str, command: list[str], env: dict[str, str], log_path: Path, health_url: str
                       ) -> subprocess.Popen:
    """Start ``command`` in a process group of its own, logging to ``log_path``, and wait until
    ``health_url`` answers 200; a server that exits first is a ``StartError`` with its log's tail."""
    with open(log_path, "a") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: http_status(health_url) == 200 or process.poll() is not None,
               START_TIMEOUT_S, name, lambda: tail(log_path))
    if process.poll() is not None:
        raise StartError(f"{name} exited with {process.returncode}:\n{tail(log_path)}")
    return process


def start_mlflow_server(root: Path, port: int | None = None, *, extra_args: tuple[str, ...] = (),
                        extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` with a SQLite store in ``root``, proxying artifacts; returns (process, url).

    It leads a process group of its own (``start_new_session``): stop it with ``os.killpg``.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start_http_server(
        "mlflow server",
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "mlartifacts"), "--workers", "1", *extra_args],
        {**base_env(root), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})},
        root / f"mlflow_server_{port}.log", f"{url}/health",
    )
    return process, url


AUTH_ADMIN = "admin"  # the admin user MLflow's basic-auth app creates (its basic_auth.ini)


def start_mlflow_auth_server(root: Path, admin_password: str, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """``mlflow server --app-name basic-auth``: every API call needs HTTP Basic credentials (its
    ``/health`` does not), and user ``admin`` has ``admin_password``; returns (process, url).

    Its users live in ``root/auth/basic_auth.db``, apart from the tracking store in ``root``. Needs
    Flask-WTF (``mlflow[auth]``, in this project's ``dev`` extra).
    """
    auth = root / "auth"
    auth.mkdir(parents=True, exist_ok=True)
    ini = auth / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{auth / 'basic_auth.db'}\n"
        f"admin_username = {AUTH_ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
    )
    return start_mlflow_server(root, port, extra_args=("--app-name", "basic-auth"), extra_env={
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,  # read only when it creates the admin user
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    })


def start_s3_server(root: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """moto's standalone S3-compatible server (``python -m moto.server``); returns (process, endpoint URL).

    Buckets live in its memory only. It leads a process group of its own: stop it with
    ``os.killpg(process.pid, ...)``. Its clients need ``S3_ENV`` (any credentials do).
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start_http_server("S3 server (moto)", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                 base_env(root), root / f"s3_server_{port}.log", f"{url}/moto-api/")
    return process, url


def create_bucket(endpoint: str, name: str) -> str:
    """A new bucket on the S3 server at ``endpoint``; returns its URI, which names the endpoint."""
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(f"s3://{name}?endpoint_override={endpoint}&allow_bucket_creation=true")
    fs.create_dir(name)
    return f"s3://{name}?endpoint_override={endpoint}"
