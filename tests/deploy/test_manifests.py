"""The cluster manifests in deploy/: valid YAML of the right shape, on the project's image and configs."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DEPENDENCIES = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
RAY_VERSION = next(d.split("==")[1] for d in DEPENDENCIES if d.startswith("ray["))


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def tune_command(command: str) -> list[str]:
    """The arguments of ``python -m semckd_ray.tune`` in a shell command line (the job's entrypoint)."""
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "semckd_ray.tune"], words
    return words[3:]


def option(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, word in enumerate(args) if word == name]


def overrides(args: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in option(args, "--set"))


def test_every_config_the_deploy_files_name_exists():
    """The RayJob's entrypoint, and the `ray job submit` the cluster launcher file shows in its comments."""
    (config,) = option(tune_command(load("kuberay-rayjob.yaml")["spec"]["entrypoint"]), "--config")
    named = {config}
    for manifest in DEPLOY.glob("*.yaml"):
        named |= set(re.findall(r"--config\s+(\S+)", manifest.read_text()))
    assert len(named) >= 1
    assert [c for c in sorted(named) if not (REPO / c).is_file()] == []


def test_rayjob_has_a_head_and_a_gpu_worker_group_on_the_project_image():
    job = load("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (workers,) = cluster["workerGroupSpecs"]
    worker = workers["template"]["spec"]["containers"]
    assert len(head) == len(worker) == 1
    assert head[0]["image"] == worker[0]["image"] and re.search(r"semckd-ray:[\w.]+$", head[0]["image"])
    assert worker[0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    assert overrides(tune_command(job["spec"]["entrypoint"]))["scaling.use_gpu"] == "true"


def test_rayjob_gives_every_pod_the_tracking_uri_and_the_shared_checkpoint_volume():
    job = load("kuberay-rayjob.yaml")
    cluster = job["spec"]["rayClusterSpec"]
    storage = overrides(tune_command(job["spec"]["entrypoint"]))["tracking.storage_path"]
    assert storage.startswith("/")
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"].startswith("http")
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = [m for m in container["volumeMounts"] if m["name"] in claims]
        assert any(storage.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), (storage, mounts)


def test_aws_cluster_has_a_head_and_gpu_workers_running_the_project_image():
    cluster = load("cluster-aws.yaml")
    assert cluster["provider"]["type"] == "aws"
    assert re.search(r"semckd-ray:[\w.]+$", cluster["docker"]["image"])
    rayjob_head = load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert cluster["docker"]["image"] == rayjob_head["containers"][0]["image"]
    assert any("MLFLOW_TRACKING_URI=" in flag for flag in cluster["docker"]["run_options"])
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert workers and all(re.match(r"(g|p)\d", t["node_config"]["InstanceType"]) for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cluster["worker_start_ray_commands"])
    assert any("semckd_ray" in c for c in cluster["setup_commands"])
