"""Safe by default: checkpoints are data, services stay on 127.0.0.1, credentials never reach MLflow."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from paths import REPO
from semckd_ray import tracking
from semckd_ray.config import parse_train_config, read_yaml
from test_bad_input import SMOKE_CONFIG, TRAIN, assert_user_error, run_command, write_yaml

PACKAGE = REPO / "semckd_ray"


def test_every_torch_load_in_the_package_refuses_pickled_code():
    calls, offenders = 0, []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in {a.name for a in node.names}:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: 'from torch import load' hides the call")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                calls += 1
                weights_only = [k.value for k in node.keywords if k.arg == "weights_only"]
                if not (len(weights_only) == 1 and isinstance(weights_only[0], ast.Constant)
                        and weights_only[0].value is True):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: torch.load without weights_only=True")
    assert calls > 0, "no torch.load found: the scan itself is broken"
    assert offenders == []


class _OpensAFile:
    """Unpickling this creates ``path``: what a malicious checkpoint would run instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_teacher_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": _OpensAFile(marker)}, teacher)
    # The payload is real: loaded the unsafe way, it runs.
    witness = tmp_path / "witness"
    torch.save({"model": _OpensAFile(witness)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert witness.exists()

    raw = read_yaml(SMOKE_CONFIG)
    raw["teacher"] = {"model": "resnet20", "checkpoint": str(teacher)}
    config = write_yaml(tmp_path / "student.yaml", raw)
    result = run_command(TRAIN, ["--config", str(config), "--set", f"data.root={tmp_path / 'data'}"], cwd=tmp_path)

    assert_user_error(result, "teacher.checkpoint", "refused for safety", "open")
    assert not marker.exists()


# Ray imported before ensure_ray runs, as semckd_ray.tune does.
LISTENERS = """
import json, os
import ray
from semckd_ray.trainer import ensure_ray
ensure_ray()
import psutil
from ray._private.worker import global_worker
me = psutil.Process()
listening = sorted({(p.name(), c.laddr.ip) for p in [me, *me.children(recursive=True)]
                    for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})
print(json.dumps({"nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
                  "gcs": ray.get_runtime_context().gcs_address,
                  "dashboard": global_worker.node.address_info["webui_url"],
                  "listening": listening}))
ray.shutdown()
"""
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.mark.slow
def test_a_cluster_started_here_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    result = subprocess.run([sys.executable, "-c", LISTENERS], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["nodes"] == ["127.0.0.1"]
    assert found["gcs"].startswith("127.0.0.1:")
    assert found["dashboard"].startswith("127.0.0.1:")
    assert found["listening"], "no listening socket found: the scan itself is broken"
    assert [entry for entry in found["listening"] if entry[1] not in LOOPBACK] == []


MLFLOW_COMMAND = re.compile(r"mlflow\s+(?:server|ui)\b[^\n`'\"]*")


def test_every_mlflow_command_we_print_or_document_binds_loopback_unless_shared_on_purpose():
    from click import Context
    from mlflow.cli import cli

    server = cli.get_command(Context(cli), "server")
    assert next(p.default for p in server.params if p.name == "host") == "127.0.0.1"  # when --host is left out
    sources = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted(PACKAGE.rglob("*.py"))]
    commands = [(path.relative_to(REPO), match.group(0)) for path in sources if path.exists()
                for match in MLFLOW_COMMAND.finditer(path.read_text())]
    assert commands, "no mlflow command found: the scan itself is broken"
    for where, command in commands:
        if "--allowed-hosts" in command:
            continue  # a team's server, shared on purpose, and only under the host names it lists
        hosts = re.findall(r"(?:--host|-h)[ =](\S+)", command)
        assert all(host in ("127.0.0.1", "localhost") for host in hosts), f"{where}: {command}"


# ------------------------------------------------------------------------------------------
# Credentials


SECRETS = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY",
           "MLFLOW_TRACKING_PASSWORD": "correct-horse-battery-staple"}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A SQLite store behind whatever tracking URI a config names; the environment holds secrets."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(tracking, "client", lambda _uri: MlflowClient(tracking_uri=uri))
    return MlflowClient(tracking_uri=uri)


def config_with_credentials(tmp_path):
    raw = read_yaml(SMOKE_CONFIG)
    raw["teacher"] = {"model": "resnet20", "checkpoint": "runs:/0123456789abcdef"}
    raw["data"]["root"] = str(tmp_path / "data")
    raw["tracking"].update(
        uri=f"https://alice:{SECRETS['MLFLOW_TRACKING_PASSWORD']}@mlflow.example.org:5000",
        storage_path=f"s3://ckpt-bucket/runs?secret={SECRETS['AWS_SECRET_ACCESS_KEY']}",
    )
    return raw


def everything_logged(store: MlflowClient, run_id: str, artifact: str) -> str:
    run = store.get_run(run_id)
    local = Path(store.download_artifacts(run_id, artifact))
    return json.dumps([run.data.params, run.data.tags]) + local.read_text()


def assert_no_credentials(text: str) -> None:
    for secret in SECRETS.values():
        assert secret not in text
    assert "alice" not in text


def test_credentials_never_reach_a_runs_params_tags_or_config_artifact(tmp_path, store):
    from semckd_ray.trainer import _terminate, start_run

    cfg = parse_train_config(config_with_credentials(tmp_path))
    run_id = start_run(cfg)
    _terminate(store, run_id, "FAILED", reason=f"ConnectionError: {cfg.tracking.uri}/api refused the request")

    logged = everything_logged(store, run_id, "config.yaml")
    assert_no_credentials(logged)
    params = store.get_run(run_id).data.params
    assert params["tracking.uri"] == "https://mlflow.example.org:5000"  # the rest of the URL stays useful
    assert params["tracking.storage_path"] == "s3://ckpt-bucket/runs?secret=<redacted>"
    artifact = yaml.safe_load(Path(store.download_artifacts(run_id, "config.yaml")).read_text())
    assert artifact["tracking"]["uri"] == "https://mlflow.example.org:5000"
    assert "mlflow.example.org:5000/api refused" in store.get_run(run_id).data.tags["failure_reason"]


def test_credentials_never_reach_a_sweeps_params_or_experiment_artifact(tmp_path, store):
    from semckd_ray.tune import _start_parent, parse_search

    raw = config_with_credentials(tmp_path)
    search, base = parse_search(raw, SMOKE_CONFIG.parent)
    parent_run_id = _start_parent(base, search, "sweep-with-secrets", raw)

    assert_no_credentials(everything_logged(store, parent_run_id, "experiment.yaml"))
    assert store.get_run(parent_run_id).data.params["base.tracking.uri"] == "https://mlflow.example.org:5000"
