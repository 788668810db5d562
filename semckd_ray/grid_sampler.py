"""Optuna's GridSampler for a sweep driven by Ray Tune's ask-and-tell.

Optuna's sampler ends a study by calling ``study.stop()`` once every combination has been tried,
which only works inside ``study.optimize``: through Tune's ``OptunaSearch`` (ask and tell) it
raises ``RuntimeError`` when the last trial is told. Here Tune stops the sweep instead, after
``num_samples`` (the grid's size) trials. Its own module, so that a saved searcher unpickles
without importing the sweep.
"""

from __future__ import annotations

from optuna.samplers import GridSampler as _OptunaGridSampler

__all__ = ["GridSampler"]


class GridSampler(_OptunaGridSampler):
    def after_trial(self, study, trial, state, values) -> None:
        pass  # Tune ends the sweep after num_samples trials; study.stop() would raise outside optimize()
