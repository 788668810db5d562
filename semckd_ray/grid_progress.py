"""How far a grid of trainings has come, for a person watching it over hours.

``GridProgress`` is a Ray Tune callback of ``python -m semckd_ray.reproduce``'s grid: each time a
run starts or ends, and every ``every_s`` seconds meanwhile, it prints how many of the grid's runs
are done, running, queued and failed, with an estimate of the time left from the runs finished so
far, and logs the same counts on the grid's MLflow parent run (metrics ``grid/done``,
``grid/running``, ``grid/queued``, ``grid/failed``, ``grid/eta_s``, at the step of the runs ended so far). It lives in Tune's saved
state, so a resumed grid goes on counting, from Tune's record of the trials (a run that finished
before the driver died counts as done, with the time it took).
"""

from __future__ import annotations

import logging
import statistics
import time

from ray.tune import Callback

log = logging.getLogger(__name__)

EVERY_S = 300.0


def eta_seconds(durations: list[float], running: int, queued: int, at_once: int) -> float | None:
    """The time left: the mean duration of the finished runs, for each run not finished, ``at_once``
    at a time (the most seen running at once: between two runs fewer are). None before any run
    has finished."""
    if not durations:
        return None
    return statistics.fmean(durations) * (running + queued) / max(at_once, 1)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class GridProgress(Callback):
    def __init__(self, name: str, total: int, tracking_uri: str, parent_run_id: str, every_s: float = EVERY_S):
        self.name, self.total, self.tracking_uri, self.parent_run_id = name, total, tracking_uri, parent_run_id
        self.every_s = every_s
        self._last = 0.0
        self._at_once = 1  # the most runs seen running at once: how many the cluster holds

    def counts(self, trials, ending=None) -> dict[str, float | None]:
        """``ending``: ``(trial, status)`` of a trial Tune is ending, which it still reports as it was."""
        status = {id(t): t.status for t in trials}
        if ending is not None:
            status[id(ending[0])] = ending[1]
        done = [t for t in trials if status[id(t)] == "TERMINATED"]
        failed = sum(s == "ERROR" for s in status.values())
        running = sum(s == "RUNNING" for s in status.values())
        queued = max(self.total - len(done) - failed - running, 0)
        durations = [float(t.last_result["time_total_s"]) for t in done
                     if (t.last_result or {}).get("time_total_s") is not None]
        self._at_once = max(self._at_once, running)
        return {"done": len(done), "running": running, "queued": queued, "failed": failed,
                "eta_s": eta_seconds(durations, running, queued, self._at_once), "at_once": self._at_once,
                "mean_s": statistics.fmean(durations) if durations else None}

    def line(self, counts: dict[str, float | None]) -> str:
        text = (f"[{self.name}] grid: {counts['done']}/{self.total} done, {counts['running']} running, "
                f"{counts['queued']} queued, {counts['failed']} failed")
        if counts["eta_s"] is not None and counts["done"] < self.total:
            text += (f"; about {_duration(counts['eta_s'])} left ({_duration(counts['mean_s'])} per run, "
                     f"{counts['at_once']} at a time)")
        return text

    def report(self, trials, ending=None) -> None:
        self._last = time.monotonic()
        counts = self.counts(trials, ending)
        print(self.line(counts), flush=True)
        try:  # best effort: a watcher's view, never a reason for the grid to stop
            from semckd_ray.tracking import client

            from mlflow.entities import Metric

            metrics = {f"grid/{k}": float(v) for k, v in counts.items()
                       if v is not None and k in ("done", "running", "queued", "failed", "eta_s")}
            step, ms = int(counts["done"] + counts["failed"]), int(time.time() * 1000)  # x: the runs ended
            client(self.tracking_uri).log_batch(
                self.parent_run_id, metrics=[Metric(k, v, ms, step) for k, v in metrics.items()])
        except Exception as exc:
            log.debug("grid progress not logged to MLflow: %s", exc)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.report(trials, (trial, "RUNNING"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.report(trials, (trial, "TERMINATED"))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.report(trials, (trial, "ERROR"))

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.every_s:
            self.report(trials)
