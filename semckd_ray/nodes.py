"""What every node of the Ray cluster must see before a training or sweep starts on it.

A training's workers run on any node that can hold one, a sweep's trials on any node at all, and
from each of them:

- the MLflow tracking store at ``tracking.uri``: on a cluster that spans several hosts, a server
  every host reaches -- not a SQLite file, a folder, or a server on a loopback address;
- ``tracking.storage_path`` (checkpoints, a sweep's state): on several nodes, one folder that
  every node sees at the same absolute path (shared storage), or an ``s3://`` / ``gs://`` URI
  that the driver (and every node) can write a small marker to and read back;
- the dataset under ``data.root`` (or, with ``data.download``, a folder to download it into), on
  every node that can host a training worker.

``check_cluster`` checks all three from the driver before any MLflow run or trial exists. What
must be seen from the nodes themselves is checked there by one small probe task per node, all at
once; the nodes that fail are named (hostname, IP, short node id) in one ``UserError``.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlparse

from semckd_ray.errors import UserError

if TYPE_CHECKING:
    from semckd_ray.config import ScalingConfig, TrainConfig

PROBE_TIMEOUT_S = 120.0
RAY_RESULTS_DIR = "ray_results"
MARKER_PREFIX = ".semckd-shared-check-"
NAMED_TRACKING_STORES = ("databricks", "databricks-uc", "uc")  # MLflow URIs without "://"
_SEEN_SHARED: set[tuple[str, frozenset[str]]] = set()  # (folder, node ids) checked in this process


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def describe(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerHostname', '?')} ({node.get('NodeManagerAddress', '?')}, node {node['NodeID'][:8]})"


def can_host_worker(node: dict[str, Any], scaling: ScalingConfig) -> bool:
    from semckd_ray.capacity import worker_resources, workers_on

    return workers_on(node.get("Resources", {}), worker_resources(scaling)) > 0


def check_cluster(cfg: TrainConfig) -> str:
    """Check tracking, storage and data as the cluster's nodes see them; returns the storage path."""
    import ray

    from semckd_ray.data import check_dataset
    from semckd_ray.tracking import resolve_tracking_uri

    nodes = alive_nodes()
    driver = ray.get_runtime_context().get_node_id()
    own = [n for n in nodes if n["NodeID"] == driver]
    driver_host = own[0]["NodeManagerHostname"] if own else socket.gethostname()
    check_tracking(resolve_tracking_uri(cfg.tracking.uri), nodes, driver_host)
    path = storage_path(cfg, nodes)
    if [n["NodeID"] for n in nodes] == [driver]:  # the driver's machine is the whole cluster
        check_dataset(cfg.data.dataset, cfg.data.root, cfg.data.download)
    else:
        check_data(cfg, nodes)
    return path


# ------------------------------------------------------------------------------------------
# Tracking


def check_tracking(uri: str, nodes: list[dict[str, Any]], driver_host: str) -> None:
    """Refuse a tracking URI that only this host reaches when other hosts run nodes."""
    from semckd_ray.tracking import redact

    hosts = sorted({n.get("NodeManagerHostname", "?") for n in nodes})
    if len(nodes) < 2 or hosts == [driver_host] or (kind := _reached_from_here_only(uri)) is None:
        return
    raise UserError(
        f"tracking.uri {redact(uri)} is {kind}, which the training workers on the other hosts of this Ray "
        f"cluster cannot reach (the driver runs on {driver_host}; the nodes run on {', '.join(hosts)}). Run an "
        "MLflow server on a machine every node reaches (the README's \"Run an MLflow server\" shows how to "
        "share one with a cluster) and set tracking.uri (or $MLFLOW_TRACKING_URI) to http://<that host>:5000."
    )


def _reached_from_here_only(uri: str) -> str | None:
    """What makes ``uri`` reachable from this machine only; None when other hosts may reach it."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "sqlite":
        return "a SQLite file on this machine"
    if scheme == "file" or (not scheme and uri not in NAMED_TRACKING_STORES):
        return "a folder on this machine"
    host = parsed.hostname
    if host and _is_loopback(host):
        return f"a server on this machine's own address ({host})"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


# ------------------------------------------------------------------------------------------
# Storage


def storage_path(cfg: TrainConfig, nodes: list[dict[str, Any]], check: bool = True) -> str:
    """Where Ray keeps checkpoints; on several nodes a local folder must be one that all of them see.

    ``check=False`` only resolves the path: for a training whose driver checked it already.
    """
    from semckd_ray import storage

    configured = cfg.tracking.storage_path
    if configured and storage.is_uri(configured):  # object storage (s3://, gs://)
        if check:
            check_object_store(configured, nodes)
        return configured
    local = configured.removeprefix("file://") if configured else None
    if local and len(nodes) > 1 and not Path(local).expanduser().is_absolute():
        raise UserError(
            f"tracking.storage_path={configured!r} is a relative path, but this Ray cluster has {len(nodes)} "
            "nodes, whose workers run in other working directories: set tracking.storage_path to an "
            "absolute path on shared storage that every node mounts (NFS), or to s3://bucket/prefix (or gs://)."
        )
    path = str(Path(local).expanduser().resolve()) if local else str(Path.cwd().resolve() / RAY_RESULTS_DIR)
    if check and len(nodes) > 1:
        check_shared(path, nodes)
    return configured if configured and configured.startswith("file://") else path


def check_shared(path: str, nodes: list[dict[str, Any]]) -> None:
    """Every node sees the folder ``path`` the driver sees: a marker written here is read back there."""
    key = (path, frozenset(n["NodeID"] for n in nodes))
    if key in _SEEN_SHARED:
        return
    token = secrets.token_hex(16)
    marker = Path(path) / f"{MARKER_PREFIX}{token[:12]}"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    except OSError as exc:
        raise UserError(f"tracking.storage_path {path}: cannot create that folder or write into it ({exc})") from None
    try:
        failed = {k: v for k, v in probe_nodes(nodes, read_marker, str(marker), token).items() if v}
    finally:
        marker.unlink(missing_ok=True)
    if failed:
        raise UserError(
            f"tracking.storage_path {path} is not one folder shared by every node of this Ray cluster: the "
            f"driver wrote {marker.name} into it, and {len(failed)} of the {len(nodes)} nodes cannot read it back "
            f"({_by_problem(failed, nodes)}). Ray Train writes checkpoints from every node: set "
            "tracking.storage_path to a folder on shared storage that every node mounts at the same path "
            "(an NFS path), or to s3://bucket/prefix (or gs://bucket/prefix)."
        )
    _SEEN_SHARED.add(key)


def check_object_store(uri: str, nodes: list[dict[str, Any]]) -> None:
    """The driver writes a small marker at the object-store URI ``uri`` and reads it back, and so
    does every node when there are several (each with its own credentials); the marker is removed.

    A problem is a UserError naming the URI and pyarrow's error, without credentials.
    """
    from semckd_ray import storage

    key = (uri, frozenset(n["NodeID"] for n in nodes))
    if key in _SEEN_SHARED:
        return
    token = secrets.token_hex(16)
    name = f"{MARKER_PREFIX}{token[:12]}"
    marker = storage.join(uri, name)
    fix = ("Check the bucket's name and that it exists, the endpoint (an S3-compatible server's: "
           "?endpoint_override=http://HOST:PORT in the URI), and the credentials of this machine "
           "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or GOOGLE_APPLICATION_CREDENTIALS for gs://).")
    try:
        storage.write_text(marker, token)
        found = storage.read_text(marker)
    except Exception as exc:  # pyarrow: OSError (unreachable, no bucket, denied), ArrowInvalid (bad URI)
        raise UserError(storage.redact(
            f"tracking.storage_path {uri}: the driver cannot write a small file there and read it back "
            f"({type(exc).__name__}: {str(exc).strip()[:500]}). {fix}")) from None
    try:
        if found != token:
            raise UserError(storage.redact(f"tracking.storage_path {uri}: a file the driver wrote there "
                                           f"reads back as something else ({found!r:.80}). {fix}"))
        failed = {k: v for k, v in probe_nodes(nodes, read_marker, marker, token).items() if v} if len(nodes) > 1 else {}
    finally:
        try:
            storage.delete(marker)
        except Exception:  # written, maybe not deletable: a marker left behind harms nothing
            pass
    if failed:
        raise UserError(storage.redact(
            f"tracking.storage_path {uri}: the driver wrote {name} there, "
            f"and {len(failed)} of the {len(nodes)} nodes cannot read it back ({_by_problem(failed, nodes)}). "
            "Ray Train writes checkpoints from every node: each needs the same access to the bucket "
            "(the credentials in the environment of its Ray processes, the endpoint reachable from it)."))
    _SEEN_SHARED.add(key)


def read_marker(path: str, token: str) -> None:
    """On a node: the marker ``path`` (a local path or an object-store URI) is there and holds ``token``."""
    from semckd_ray import storage

    try:
        found = storage.read_text(path)
    except Exception as exc:  # an object store this node cannot reach
        raise UserError(storage.redact(f"cannot read {path} ({type(exc).__name__}: {str(exc).strip()[:300]})")) from None
    if found is None:
        if storage.is_uri(path):
            raise UserError(storage.redact(f"no {path}"))
        raise UserError(f"no {Path(path).name} in {Path(path).parent}")
    if found != token:
        raise UserError(storage.redact(f"{path} holds something else: another folder of the same name"))


# ------------------------------------------------------------------------------------------
# Data


def check_data(cfg: TrainConfig, nodes: list[dict[str, Any]]) -> None:
    """The dataset is usable (or downloadable) on every node that can host a training worker."""
    from semckd_ray.data import check_dataset, needs_files

    data = cfg.data
    if not needs_files(data.dataset):
        return
    hosts = [n for n in nodes if can_host_worker(n, cfg.scaling)]
    failed = {k: v for k, v in probe_nodes(hosts, check_dataset, data.dataset, data.root, data.download).items() if v}
    if failed:
        raise UserError(
            f"the dataset {data.dataset} (data.root={data.root}) is not usable on {len(failed)} of the "
            f"{len(hosts)} nodes that can host a training worker: {_by_problem(failed, hosts)}. Every node "
            "that hosts workers reads the dataset from data.root: provide it there on each, or on shared "
            "storage mounted at that path on all of them."
        )


# ------------------------------------------------------------------------------------------
# Probes


def probe_nodes(nodes: list[dict[str, Any]], fn: Callable[..., None], *args: Any,
                timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, str | None]:
    """Run ``fn(*args)`` on every node at once; what went wrong (None: nothing) by node id.

    Keyed by the node each probe found itself on; a node whose probe did not answer within
    ``timeout_s`` is there with that as its problem.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not nodes:
        return {}
    task = ray.remote(num_cpus=0, max_retries=0)(_run_here)
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(fn, args): n["NodeID"] for n in nodes}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    results: dict[str, str | None] = {}
    for ref in ready:
        try:
            node_id, problem = ray.get(ref)
        except Exception as exc:  # the probe could not run there: node lost, package missing
            node_id, problem = refs[ref], f"the probe failed ({type(exc).__name__}: {str(exc).strip()[:300]})"
        results[node_id] = problem
    for ref in pending:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # it ended meanwhile, or its node is gone: nothing left to stop
            pass
    for node_id in refs.values():
        results.setdefault(node_id, f"no answer within {timeout_s:g} s")
    return results


def _run_here(fn: Callable[..., None], args: tuple) -> tuple[str, str | None]:
    """A probe, inside its task: (this node's id, what went wrong or None)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    try:
        fn(*args)
    except UserError as exc:
        return node_id, str(exc)
    except Exception as exc:  # anything else is a problem of that node too
        return node_id, f"{type(exc).__name__}: {exc}"
    return node_id, None


def _by_problem(failed: dict[str, str], nodes: list[dict[str, Any]]) -> str:
    """``node, node: problem; node: problem``: the failed nodes, grouped by what went wrong."""
    names = {n["NodeID"]: describe(n) for n in nodes}
    groups: dict[str, list[str]] = {}
    for node_id, problem in failed.items():
        groups.setdefault(problem, []).append(names.get(node_id, f"node {node_id[:8]}"))
    return "; ".join(f"on {', '.join(sorted(where))}: {problem}" for problem, where in groups.items())
