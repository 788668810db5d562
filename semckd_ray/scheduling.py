"""Tune's side of ``semckd_ray.capacity``: new trials only while the cluster can hold them.

Kept apart from ``semckd_ray.tune`` because it imports Ray Tune, which a config check does not need.
"""

from __future__ import annotations

from typing import Callable

from ray.tune.search import ConcurrencyLimiter, Searcher


class ClusterLimiter(ConcurrencyLimiter):
    """Tune's ``ConcurrencyLimiter`` whose limit is asked again before every suggestion.

    Tune fixes ``max_concurrent_trials`` when the sweep starts; this limit follows the cluster
    (``semckd_ray.capacity.TrialCapacity``): a node that joins lets another trial start, and the
    searcher still sees only as many trials in flight as can run, so TPE keeps learning from the
    finished ones instead of proposing every sample up front.
    """

    def __init__(self, searcher: Searcher, capacity: Callable[[], int]):
        self.capacity = capacity
        super().__init__(searcher, max_concurrent=max(1, int(capacity())))

    def suggest(self, trial_id: str):
        self.max_concurrent = max(1, int(self.capacity()))
        return super().suggest(trial_id)
