"""A small sweep's wall time vs the time its trials spent (from the MLflow runs it logged).

    python bench/sweep_overhead.py [--config tune_configs/smoke.yaml] [--workdir DIR]

Runs ``python -m semckd_ray.tune --config CONFIG`` as a subprocess against a fresh MLflow store,
Ray storage and data folder in ``--workdir`` (a temporary folder by default). The teacher the
config names (``teacher.train``) is trained first by ``python -m semckd_ray.train`` on the same
store and timed apart, so the sweep reuses it and its wall time is the sweep alone.

From MLflow: every trial run's start-to-end time (for a trial ASHA stopped early, start to its
last logged epoch, since its run is closed only when the sweep summarises), the union of those intervals (time during
which at least one trial was running) and the sum of the ``epoch_seconds`` each trial logged
(pure training). Overhead figures: sweep wall - union (start-up, scheduling gaps, summary),
and wall / (sum of trial times / concurrency).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, CpuMonitor, load_avg, save_result  # noqa: E402


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def run(cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return time.perf_counter() - started


def trials_from_mlflow(uri: str, experiment: str) -> dict:
    from semckd_ray.tracking import client

    mlflow = client(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    parents = mlflow.search_runs([exp.experiment_id], filter_string="tags.role = 'sweep'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    parent = parents[0]
    children = mlflow.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=1000)
    trials = []
    for run in children:
        history = mlflow.get_metric_history(run.info.run_id, "epoch_seconds")
        epochs = [m.value for m in history]
        start, end = run.info.start_time / 1e3, (run.info.end_time or run.info.start_time) / 1e3
        if run.info.status != "FINISHED" and history:
            # A trial ASHA stopped is closed only when the sweep summarises: it ended at its last report.
            end = max(m.timestamp for m in history) / 1e3
        trials.append({"run_id": run.info.run_id, "trial_id": run.data.tags.get("tune_trial_id"),
                       "status": run.info.status, "start": start, "end": end, "seconds": end - start,
                       "epochs": len(epochs), "epoch_seconds_sum": sum(epochs)})
    parent_span = ((parent.info.end_time or parent.info.start_time) - parent.info.start_time) / 1e3
    return {"parent_run_id": parent.info.run_id, "parent_seconds": parent_span, "trials": trials}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tune_configs/smoke.yaml")
    p.add_argument("--workdir", type=Path, default=None, help="keep the store here (default: a temporary folder)")
    args = p.parse_args()

    from semckd_ray.config import read_yaml
    from semckd_ray.tune import parse_search

    config = (REPO_ROOT / args.config).resolve() if not Path(args.config).is_absolute() else Path(args.config)
    raw = read_yaml(config)
    search, base = parse_search(raw, config.parent)
    concurrency = search.max_concurrent or 1
    load_start = load_avg()

    with tempfile.TemporaryDirectory(prefix="semckd-sweep-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        sets = ["--set", f"tracking.uri={uri}", "--set", f"tracking.storage_path={work / 'ray_results'}",
                "--set", f"data.root={work / 'data'}"]
        teacher_s = None
        if base.teacher is not None and base.teacher.train:
            teacher_file = (config.parent / base.teacher.train).resolve()
            teacher_s = run([sys.executable, "-m", "semckd_ray.train", "--config", str(teacher_file), *sets],
                            work / "teacher.log")
            print(f"  teacher trained in {teacher_s:.1f} s", flush=True)
        monitor = CpuMonitor().start()
        wall = run([sys.executable, "-m", "semckd_ray.tune", "--config", str(config), *sets], work / "sweep.log")
        load = monitor.stop()
        found = trials_from_mlflow(uri, base.tracking.experiment)

    trials = found["trials"]
    trial_sum = sum(t["seconds"] for t in trials)
    busy = union_seconds([(t["start"], t["end"]) for t in trials])
    epoch_sum = sum(t["epoch_seconds_sum"] for t in trials)
    result = {
        "config": {"config": str(args.config), "num_samples": search.num_samples, "max_concurrent": concurrency},
        "sweep_wall_seconds": wall, "teacher_wall_seconds": teacher_s, "parent_run_seconds": found["parent_seconds"],
        "trial_seconds_sum": trial_sum, "trials_busy_seconds": busy, "epoch_seconds_sum": epoch_sum,
        "outside_trials_seconds": wall - busy, "wall_over_trial_sum_per_slot": wall / (trial_sum / concurrency),
        "trials": trials, "foreign_cores": load.get("foreign_cores"),
        "load_avg_start": load_start, "load_avg_end": load_avg(),
    }
    print(f"sweep {args.config}: {len(trials)} trials, {concurrency} at a time")
    print(f"  sweep wall {wall:.1f} s (MLflow parent run {found['parent_seconds']:.1f} s)")
    print(f"  trials: sum {trial_sum:.1f} s, at least one running {busy:.1f} s, training epochs sum {epoch_sum:.1f} s")
    for t in trials:
        print(f"    {t['trial_id']}: {t['seconds']:.1f} s, {t['epochs']} epochs ({t['epoch_seconds_sum']:.1f} s), {t['status']}")
    print(f"  outside any trial: {wall - busy:.1f} s ({(wall - busy) / wall:.0%} of the wall); "
          f"wall / (trial sum / {concurrency}) = {result['wall_over_trial_sum_per_slot']:.2f}")
    print(f"  load avg {load_start} -> {result['load_avg_end']}")
    print(f"  saved {save_result('sweep_overhead', result)}")


if __name__ == "__main__":
    main()
