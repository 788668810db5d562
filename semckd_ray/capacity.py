"""How many trials a cluster holds: now, and once it has grown.

A worker needs ``scaling.cpus_per_worker`` CPUs and, on GPU, ``scaling.gpus_per_worker`` of one GPU
(0.25: four workers, so four one-worker trials, share a GPU). A training's workers may spread over
nodes, so a cluster holds as many trials as it has worker slots, over the workers a trial needs.

What the cluster may become depends on who runs it:

- ``fixed``: nodes started by hand (``ray start``), or Ray's read-only view of them. What is there
  now is all there will be.
- ``known``: an autoscaler that reported its node types and their maximum counts to Ray
  (``ray._private.state.state.get_cluster_config()``, which Ray Train reads as well).
- ``unknown``: an autoscaler runs the cluster (its status names node types of its own), but Ray
  was not told what it can add: a trial that fits nowhere now may fit on a node it adds.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

# Float shares (0.1 GPU x 10) are compared with this slack, as Ray does with its fixed-point units.
SLACK = 1e-6

Growth = Literal["fixed", "known", "unknown"]


def worker_resources(scaling) -> dict[str, float]:
    """What one training worker asks Ray for."""
    resources = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        resources["GPU"] = float(scaling.gpus_per_worker)
    return resources


def workers_on(resources: dict[str, float], per_worker: dict[str, float]) -> int:
    """Workers a node with ``resources`` (its totals) holds at once."""
    counts = [math.floor(resources.get(name, 0.0) / need + SLACK) for name, need in per_worker.items() if need > 0]
    return max(0, min(counts)) if counts else 0


def trials_that_fit(nodes: list[dict[str, float]], per_worker: dict[str, float], workers_per_trial: int) -> int:
    """Trials of ``workers_per_trial`` workers that nodes with these totals hold at once."""
    return sum(workers_on(n, per_worker) for n in nodes) // max(1, workers_per_trial)


@dataclass(frozen=True)
class NodeType:
    resources: dict[str, float]
    max_count: int  # nodes of this type the autoscaler may add beyond those running


@dataclass(frozen=True)
class ClusterGrowth:
    kind: Growth
    node_types: tuple[NodeType, ...] = ()

    def could_host(self, per_worker: dict[str, float]) -> bool:
        """Whether a node the autoscaler may add holds one worker (``unknown``: it may)."""
        if self.kind == "unknown":
            return True
        return any(t.max_count > 0 and workers_on(t.resources, per_worker) > 0 for t in self.node_types)

    def added_nodes(self) -> list[dict[str, float]]:
        """The totals of every node the autoscaler may add (none on a fixed or an ``unknown`` cluster)."""
        return [t.resources for t in self.node_types for _ in range(max(0, t.max_count))]

    def most_trials(self, now: list[dict[str, float]], per_worker: dict[str, float],
                    workers_per_trial: int) -> int | None:
        """Trials the cluster holds at its largest; None when nobody says how large that is."""
        if self.kind == "unknown":
            return None
        return trials_that_fit(list(now) + self.added_nodes(), per_worker, workers_per_trial)


def node_totals(nodes: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [dict(n.get("Resources", {})) for n in nodes if n.get("Alive", True)]


def cluster_growth() -> ClusterGrowth:
    """What the connected cluster may grow into (see the module's docstring)."""
    types = _reported_node_types()
    if types is not None:
        return ClusterGrowth("known", types)
    return ClusterGrowth("unknown" if _autoscaler_names_node_types() else "fixed")


def _reported_node_types() -> tuple[NodeType, ...] | None:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as exc:  # an older or unusual cluster: judge from what is running
        log.debug("no cluster config from Ray: %s", exc)
        return None
    if config is None or not config.node_group_configs:
        return None
    types = []
    for group in config.node_group_configs:
        # max_count -1: no limit given; count one node of the type, which is all a check needs.
        count = group.max_count if group.max_count >= 0 else 1
        types.append(NodeType({k: float(v) for k, v in group.resources.items()}, count))
    return tuple(types)


def _autoscaler_names_node_types() -> bool:
    """Whether an autoscaler (not Ray's read-only view of hand-started nodes) reports on the cluster.

    Ray's read-only provider calls each node ``node_<its id>``; a real autoscaler uses the node
    types of its cluster config (``ray.worker.gpu``, a KubeRay group name).
    """
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    except Exception as exc:
        log.debug("no autoscaler status: %s", exc)
        return False
    if not raw:
        return False
    try:
        mapping = json.loads(raw).get("autoscaler_report", {}).get("node_type_mapping") or {}
    except (ValueError, AttributeError):
        return False
    return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items())


@dataclass
class TrialCapacity:
    """How many trials may run (or wait for resources) at once: asked again before every new trial.

    On a fixed cluster, what its nodes hold now: a node that joins raises it without a restart. On a
    cluster whose autoscaler told Ray its node types, what the largest cluster holds, so the waiting
    trials' resource requests are the demand that makes it grow. On an autoscaling cluster that did
    not, as many trials wait as run (at least one), so demand grows with the cluster.
    ``max_concurrent`` (``search.max_concurrent``) caps every case.
    """

    per_worker: dict[str, float]
    workers_per_trial: int  # num_workers x the seeds a trial trains at once (search.repeats)
    max_concurrent: int | None = None
    refresh_s: float = 2.0
    _cached: tuple[float, int] | None = field(default=None, repr=False, compare=False)

    def __call__(self) -> int:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.refresh_s:
            return self._cached[1]
        from semckd_ray.nodes import alive_nodes

        value = self.limit(node_totals(alive_nodes()), cluster_growth())
        self._cached = (now, value)
        return value

    def limit(self, nodes: list[dict[str, float]], growth: ClusterGrowth) -> int:
        fits = trials_that_fit(nodes, self.per_worker, self.workers_per_trial)
        most = growth.most_trials(nodes, self.per_worker, self.workers_per_trial)
        if most is not None:
            limit = most
        elif growth.kind == "unknown":
            limit = fits + max(1, fits)
        else:
            limit = fits
        limit = max(1, limit)  # the driver refused a trial that can never fit, or warned about it
        return min(limit, self.max_concurrent) if self.max_concurrent else limit

    def __getstate__(self) -> dict[str, Any]:  # saved with the sweep's searcher: no stale cache
        return {**self.__dict__, "_cached": None}
