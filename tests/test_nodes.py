"""What every node must see: tracking store, shared storage, the dataset, and room for one worker.

The decisions are tested on synthetic node lists (several hosts cannot be had here); the probes
run on the session's real two-node cluster, whose nodes share this machine's folders.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from semckd_ray import nodes
from semckd_ray.config import parse_train_config
from semckd_ray.data import check_dataset, list_datasets, load_dataset, needs_files, num_classes, prepare_dataset
from semckd_ray.data import datasets as datasets_module
from semckd_ray.errors import UserError

slow = pytest.mark.slow  # the tests that use the Ray cluster


def make_node(node_id: str, host: str, ip: str = "10.0.0.1", cpu: float = 1.0, gpu: float = 0.0) -> dict:
    """One entry of ``ray.nodes()``, as much of it as the checks read."""
    return {"NodeID": node_id * 56, "Alive": True, "NodeManagerHostname": host, "NodeManagerAddress": ip,
            "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}


def config(**sections) -> object:
    return parse_train_config({"student": {"model": "resnet8"}, "method": {"name": "vanilla"}, **sections})


def write_tiny_cifar100(root: Path) -> Path:
    """The cifar-100-python layout with two images per split: enough for every check."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rows = np.zeros((2, 3072), dtype=np.uint8)
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps({b"data": rows, b"fine_labels": [0, 1]}))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}" for i in range(100)]}))
    return folder


def no_image_reads(monkeypatch) -> None:
    monkeypatch.setattr(datasets_module, "_read_cifar_batch", lambda *a: pytest.fail("read the images"))


def no_download(monkeypatch) -> None:
    monkeypatch.setattr(datasets_module, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded"))


# ------------------------------------------------------------------------------------------
# The dataset, checked without loading it


def test_num_classes_reads_no_file_and_unknown_names_list_the_valid_ones(tmp_path):
    """num_classes answers from the name alone (a folder tree: from its class folders, no image read),
    and an unknown name gets load_dataset's error."""
    in_memory = [n for n in list_datasets() if n != "imagefolder"]
    assert [num_classes(n) for n in in_memory] == [10, 100, 10, 10, 200]  # cifar10, cifar100, digits, stl10, tiny_imagenet
    with pytest.raises(ValueError, match="counts its classes from its folders"):
        num_classes("imagefolder")
    for split, classes in (("train", "abc"), ("val", "ab")):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            (tmp_path / split / c / "0.JPEG").write_bytes(b"")  # listed, never read
    assert num_classes("imagefolder", str(tmp_path)) == 3
    assert (needs_files("cifar100"), needs_files("digits")) == (True, False)
    with pytest.raises(UserError, match="unknown dataset 'imagenet'; valid datasets: cifar10, cifar100, digits"):
        num_classes("imagenet")


def test_check_dataset_refuses_missing_files_with_the_message_loading_gives(tmp_path):
    """Missing CIFAR files give the very UserError loading gives: the files, the folder, how to provide them."""
    with pytest.raises(UserError) as checked:
        check_dataset("cifar100", tmp_path, download=False)
    with pytest.raises(UserError) as loaded:
        load_dataset("cifar100", tmp_path)
    assert str(checked.value) == str(loaded.value)
    assert f"missing train, test, meta in {tmp_path}/cifar-100-python" in str(checked.value)
    assert "data.download: true" in str(checked.value)


def test_check_dataset_passes_on_present_files_without_reading_images(tmp_path, monkeypatch):
    """Present files pass, the images unread; digits needs no folder at all."""
    write_tiny_cifar100(tmp_path)
    no_image_reads(monkeypatch)
    check_dataset("cifar100", tmp_path, download=False)
    check_dataset("digits", tmp_path / "absent", download=False)


def test_check_dataset_finds_a_file_cut_short_from_its_last_byte(tmp_path, monkeypatch):
    """A truncated pickle is refused as loading would refuse it, still without reading the images."""
    folder = write_tiny_cifar100(tmp_path)
    blob = (folder / "train").read_bytes()
    (folder / "train").write_bytes(blob[: len(blob) // 2])
    no_image_reads(monkeypatch)
    with pytest.raises(UserError, match="cannot be read as a CIFAR pickle.*truncated") as info:
        check_dataset("cifar100", tmp_path)
    assert str(info.value).startswith(str(folder / "train"))


def test_check_dataset_with_download_needs_only_a_writable_root(tmp_path, monkeypatch):
    """With download on, missing files pass when data.root could be created, and nothing is fetched
    or created; a data.root below a file cannot be, and is refused."""
    no_download(monkeypatch)
    check_dataset("cifar100", tmp_path / "new" / "data", download=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"data.root .*a_file/data cannot be written"):
        check_dataset("cifar100", tmp_path / "a_file" / "data", download=True)


def test_prepare_dataset_downloads_only_what_is_missing(tmp_path, monkeypatch):
    """Present files: no download and no image read; missing ones: one download into data.root."""
    write_tiny_cifar100(tmp_path / "present")
    no_image_reads(monkeypatch)
    no_download(monkeypatch)
    prepare_dataset("cifar100", tmp_path / "present", download=True)

    fetched = []
    monkeypatch.setattr(datasets_module, "download_and_extract_archive",
                        lambda url, root, **kw: fetched.append(root) or write_tiny_cifar100(Path(root)))
    prepare_dataset("cifar100", tmp_path / "missing", download=True)
    assert fetched == [str(tmp_path / "missing")]
    with pytest.raises(UserError, match="CIFAR-100 not found"):
        prepare_dataset("cifar100", tmp_path / "elsewhere", download=False)


# ------------------------------------------------------------------------------------------
# Decisions on synthetic node lists

TWO_HOSTS = [make_node("a", "gpu-1", "10.0.0.1"), make_node("b", "gpu-2", "10.0.0.2")]
ONE_HOST = [make_node("a", "gpu-1", "10.0.0.1"), make_node("b", "gpu-1", "10.0.0.1")]
HERE_ONLY = ["sqlite:////home/me/mlflow.db", "file:///home/me/mlruns", "mlruns", "/home/me/mlruns",
             "http://127.0.0.1:5000", "http://localhost:5000", "http://[::1]:5000", "http://0.0.0.0:5000"]
REACHABLE = ["http://10.0.0.5:5000", "https://mlflow.example.com", "databricks", "postgresql://db.example.com/mlflow"]


@pytest.mark.parametrize("uri", HERE_ONLY)
def test_a_tracking_uri_only_this_host_reaches_is_refused_when_nodes_are_on_other_hosts(uri):
    """Across two hosts, a store on the driver's disk or loopback is refused: URI, hosts and the fix named."""
    with pytest.raises(UserError) as info:
        nodes.check_tracking(uri, TWO_HOSTS, driver_host="gpu-1")
    message = str(info.value)
    for needle in (f"tracking.uri {uri} ", "gpu-1, gpu-2", "Run an MLflow server",
                   "http://<that host>:5000", "$MLFLOW_TRACKING_URI"):
        assert needle in message, message


@pytest.mark.parametrize("uri", REACHABLE)
def test_a_tracking_uri_other_hosts_reach_is_accepted_across_hosts(uri):
    """A server on a routable address, a DNS name or Databricks is what a multi-host cluster needs."""
    nodes.check_tracking(uri, TWO_HOSTS, driver_host="gpu-1")


@pytest.mark.parametrize("uri", HERE_ONLY + REACHABLE)
def test_every_tracking_uri_is_accepted_when_all_nodes_share_the_driver_host(uri):
    """On one host, local stores are reachable from every worker: all are accepted."""
    nodes.check_tracking(uri, ONE_HOST, driver_host="gpu-1")


def test_a_refused_tracking_uri_is_shown_without_its_credentials():
    """The error never prints the password of a URI with userinfo."""
    with pytest.raises(UserError) as info:
        nodes.check_tracking("http://alice:hunter2@localhost:5000", TWO_HOSTS, driver_host="gpu-1")
    assert "hunter2" not in str(info.value) and "http://localhost:5000" in str(info.value)


def test_a_node_that_does_not_see_the_marker_is_named_and_the_marker_removed(tmp_path, monkeypatch):
    """Storage: a probe result with one node blind to the marker makes an error naming that node only
    (hostname, IP, short id), the folder and the fix; the marker is gone afterwards."""
    seen = []

    def probe(targets, fn, marker, token):
        seen.append((fn, Path(marker).read_text() == token))
        return {TWO_HOSTS[0]["NodeID"]: None, TWO_HOSTS[1]["NodeID"]: f"no {Path(marker).name} in {tmp_path}"}

    monkeypatch.setattr(nodes, "probe_nodes", probe)
    with pytest.raises(UserError) as info:
        nodes.check_shared(str(tmp_path), TWO_HOSTS)
    message = str(info.value)
    assert seen == [(nodes.read_marker, True)]
    assert "on gpu-2 (10.0.0.2, node bbbbbbbb)" in message and "gpu-1" not in message
    assert f"tracking.storage_path {tmp_path} " in message and "1 of the 2 nodes" in message
    assert "NFS" in message and "s3://bucket/prefix" in message
    assert list(tmp_path.iterdir()) == []


def test_storage_paths_on_several_nodes(tmp_path, monkeypatch):
    """Relative paths are refused, object storage is taken as it is (``check=False``; checked in
    tests/test_storage.py against an S3 server), and one node needs no probe."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(nodes, "probe_nodes", lambda *a, **k: pytest.fail("probed"))
    with pytest.raises(UserError, match=r"tracking.storage_path='runs' is a relative path.*2 nodes.*s3://"):
        nodes.storage_path(config(tracking={"storage_path": "runs"}), ONE_HOST)
    for uri in ("s3://bucket/semckd", "gs://bucket/semckd"):
        assert nodes.storage_path(config(tracking={"storage_path": uri}), ONE_HOST, check=False) == uri
    assert nodes.storage_path(config(tracking={"storage_path": "runs"}), ONE_HOST[:1]) == str(tmp_path / "runs")
    assert nodes.storage_path(config(), ONE_HOST[:1]) == str(tmp_path / "ray_results")
    assert nodes.storage_path(config(tracking={"storage_path": "file:///srv/runs"}), ONE_HOST[:1]) == "file:///srv/runs"


def test_the_dataset_is_probed_only_on_nodes_that_can_host_a_worker(tmp_path, monkeypatch):
    """A head without CPUs is not asked for the data, nor a CPU node when workers need GPUs; digits
    asks nobody; failures of several nodes are one error naming each and the reason."""
    cluster = [make_node("h", "head", cpu=0), make_node("c", "cpu-1", "10.0.0.3"),
               make_node("g", "gpu-1", "10.0.0.4", cpu=8, gpu=1)]
    asked = []

    def probe(targets, fn, *args):
        asked.append([n["NodeManagerHostname"] for n in targets])
        return {n["NodeID"]: "CIFAR-100 not found: missing train" for n in targets}

    monkeypatch.setattr(nodes, "probe_nodes", probe)
    data = {"dataset": "cifar100", "root": str(tmp_path)}
    with pytest.raises(UserError) as info:
        nodes.check_data(config(data=data), cluster)
    assert asked == [["cpu-1", "gpu-1"]]
    assert (f"(data.root={tmp_path})" in str(info.value) and "2 of the 2 nodes" in str(info.value)
            and "on cpu-1 (10.0.0.3, node cccccccc), gpu-1 (10.0.0.4, node gggggggg): CIFAR-100 not found"
            in str(info.value))
    with pytest.raises(UserError):
        nodes.check_data(config(data=data, scaling={"use_gpu": True}), cluster)
    assert asked[-1] == ["gpu-1"]
    nodes.check_data(config(data={"dataset": "digits"}), cluster)
    assert len(asked) == 2


def test_a_worker_no_single_node_holds_is_refused_naming_the_largest_node():
    """Enough GPUs in total but none on a node with the CPUs one worker needs: refused, with that node's size."""
    from semckd_ray.trainer import check_resources

    cluster = [make_node("a", "cpu-1", cpu=16), make_node("b", "gpu-1", cpu=2, gpu=4)]
    cfg = config(scaling={"num_workers": 2, "cpus_per_worker": 4, "use_gpu": True})
    with pytest.raises(UserError, match=r"4 CPUs and 1 GPU on one node for each worker \(scaling.cpus_per_worker=4, "
                                        r"scaling.use_gpu=true\) but the largest node has 2 CPUs and 4 GPUs"):
        check_resources(cfg, {"CPU": 18, "GPU": 4}, nodes=cluster)
    check_resources(config(scaling={"num_workers": 2, "cpus_per_worker": 2, "use_gpu": True}),
                    {"CPU": 18, "GPU": 4}, nodes=cluster)


# ------------------------------------------------------------------------------------------
# On the real two-node cluster


@slow
def test_the_storage_marker_is_read_back_on_both_nodes(ray_cluster, tmp_path, monkeypatch):
    """A local absolute folder passes the shared-storage check, after a probe that ran on each node."""
    answers = []
    probe = nodes.probe_nodes
    monkeypatch.setattr(nodes, "probe_nodes", lambda *a, **k: answers.append(probe(*a, **k)) or answers[-1])
    folder = tmp_path / "shared"
    assert nodes.storage_path(config(tracking={"storage_path": str(folder)}), nodes.alive_nodes()) == str(folder)
    node_ids = {n["NodeID"] for n in nodes.alive_nodes()}
    assert len(node_ids) == 2 and answers == [dict.fromkeys(node_ids)]  # both nodes answered: no problem
    assert list(folder.iterdir()) == []  # the marker is removed


@slow
def test_a_relative_storage_path_is_refused_on_the_cluster(ray_cluster, workdir):
    """Workers run in other directories: a relative tracking.storage_path cannot mean one folder."""
    from semckd_ray.trainer import storage_path

    with pytest.raises(UserError, match="tracking.storage_path='ray_results' is a relative path"):
        storage_path(config(tracking={"storage_path": "ray_results"}))


@slow
def test_missing_data_is_one_error_naming_both_nodes(ray_cluster, workdir):
    """cifar100 in an empty folder: check_cluster raises one UserError in the driver naming both nodes
    (hostname, IP, short id), the folder and why -- no worker traceback."""
    import socket

    root = workdir / "empty"
    root.mkdir()
    with pytest.raises(UserError) as info:
        nodes.check_cluster(config(data={"dataset": "cifar100", "root": str(root)}))
    message = str(info.value)
    assert f"(data.root={root})" in message and "2 of the 2 nodes" in message
    assert f"CIFAR-100 not found: missing train, test, meta in {root}/cifar-100-python" in message
    for node in nodes.alive_nodes():
        assert f"{socket.gethostname()} (127.0.0.2, node {node['NodeID'][:8]})" in message


@slow
def test_present_data_and_shared_storage_pass_the_cluster_check(ray_cluster, workdir):
    """With the CIFAR files in data.root, check_cluster passes and returns the checked storage folder."""
    write_tiny_cifar100(workdir / "data")
    assert nodes.check_cluster(config(data={"dataset": "cifar100", "root": str(workdir / "data")})) == \
        str(workdir / "ray_results")


@slow
def test_a_node_that_does_not_answer_in_time_is_named(ray_cluster):
    """A probe still running at the timeout counts as that node's problem, and the call returns."""
    started = time.monotonic()
    answers = nodes.probe_nodes(nodes.alive_nodes(), time.sleep, 120, timeout_s=3)
    assert time.monotonic() - started < 60
    assert set(answers.values()) == {"no answer within 3 s"} and len(answers) == 2


@slow
def test_a_worker_bigger_than_every_node_is_refused_on_the_cluster(ray_cluster):
    """cpus_per_worker=2 on nodes of 1 CPU: 2 CPUs in total but no node holds one worker."""
    from semckd_ray.trainer import check_resources, cluster_capacity

    cfg = config(scaling={"num_workers": 1, "cpus_per_worker": 2})
    with pytest.raises(UserError, match=r"2 CPUs on one node for each worker \(scaling.cpus_per_worker=2\) "
                                        r"but the largest node has 1 CPUs and 0 GPUs"):
        check_resources(cfg, cluster_capacity(), nodes=nodes.alive_nodes())
    with pytest.raises(UserError, match="64 CPUs .* but the cluster has 2"):
        check_resources(config(scaling={"num_workers": 64}), cluster_capacity(), nodes=nodes.alive_nodes())
