"""A sweep on a cluster that grows while it runs, and trials that share one GPU.

The cluster is Ray's own autoscaler on this machine: a head with no CPUs and node types that the
autoscaler starts (as local raylets) when work waits for resources. At the start no node holds a
worker, so a fixed cluster would refuse the sweep; this one says so, waits, and uses the node it
gets. The GPU is declared, not real: what is shown is Ray's scheduling of four trials with a
quarter of a GPU each at once, the fifth waiting for one of them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from servers import StartError, start_ray_head, stop_marked

from semckd_ray.tracking import client

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NODE_TYPES = {
    "cpu2": {"resources": {"CPU": 2}, "max_workers": 1},
    "gpu1": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 1},
}
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def growing_cluster():
    root = Path(tempfile.mkdtemp(prefix="sra", dir="/tmp"))
    try:
        yield start_ray_head(root, num_cpus=0, autoscale=NODE_TYPES)
    except StartError as exc:
        pytest.fail(str(exc))
    finally:
        stop_marked(str(root))
        shutil.rmtree(root, ignore_errors=True)


def nodes(head) -> list[dict]:
    out = head.ray("list", "nodes", "--format", "json", "--detail", "--limit", "100")
    assert out.returncode == 0, out.stderr
    return [n for n in json.loads(out.stdout) if n["state"] == "ALIVE"]


def test_a_sweep_waits_for_the_node_the_autoscaler_adds_and_uses_it(growing_cluster, tmp_path):
    head = growing_cluster
    head_node = {n["node_id"] for n in nodes(head)}
    config = {
        "name": "growing", "seed": 0, "data": {"dataset": "digits", "root": str(tmp_path / "data")},
        "method": {"name": "vanilla"}, "student": {"model": "resnet8"},
        "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05, "lr_decay_epochs": [2]},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1}, "checkpoint": {"every": 1},
        "tracking": {"experiment": "growing", "storage_path": str(tmp_path / "ray_results")},
        "search": {"num_samples": 2, "seed": 0, "scheduler": {"type": "none"},
                   "space": {"optim.lr": {"type": "uniform", "low": 0.02, "high": 0.08}}},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**head.env, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([sys.executable, "-m", "semckd_ray.tune", "--config", str(tmp_path / "sweep.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    # Not refused: the cluster autoscales, so the driver warned and waited.
    assert "holds no worker of this run now" in output and "waits for nodes it adds" in output

    added = [n for n in nodes(head) if n["node_id"] not in head_node]
    assert [n["resources_total"].get("CPU") for n in added] == [2.0], added  # the CPU node type, once
    mlflow = client(uri)
    experiment = mlflow.get_experiment_by_name("growing")
    trials = mlflow.search_runs([experiment.experiment_id], filter_string="tags.tune_trial_id != ''")
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    for r in trials:  # trained on the added node, from the first epoch to the last
        assert r.data.tags["worker_nodes"].split("/")[1] == added[0]["node_id"][:12]
        assert int(r.data.metrics["epoch"]) == 2
    # Both at once once the node had joined: the sweep's limit rose with the cluster (it was one
    # trial, waiting, when the sweep started on a head with no CPUs).
    first, second = sorted(trials, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time


def test_four_trials_with_a_quarter_gpu_each_share_one_gpu(growing_cluster, tmp_path):
    head = growing_cluster
    env = {**head.env, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(Path(__file__).parent / "gpu_share_trials.py"), str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert len(records) == 5
    gpu_nodes = [n for n in nodes(head) if n["resources_total"].get("GPU")]
    assert len(gpu_nodes) == 1  # added for these trials, once
    assert {r["node"] for r in records} == {gpu_nodes[0]["node_id"]}
    assert {tuple(r["gpu_ids"]) for r in records} == {("0",)}  # one GPU, shared

    def running_at(t: float) -> int:
        return sum(r["start"] <= t < r["end"] for r in records)

    most = max(running_at(r["start"]) for r in records)
    assert most == 4, records  # four at once (each held its share until four had started) ...
    last = max(records, key=lambda r: r["start"])
    assert last["start"] >= min(r["end"] for r in records if r is not last), records  # ... the fifth waited
