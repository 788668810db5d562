"""How long a wrong config takes to be reported: process start to the ``error:`` line on stderr.

    python bench/config_errors.py [--repeats 5] [--idle 0.3] [--only train-typo,...]

Each case runs the command line in a fresh Python process (the repository's interpreter, from the
repository root) and times it from just before the process is started to the moment its stderr
shows ``error: ...``; it must then exit with status 2. The cases are interleaved (one run of each
in turn, the order rotated every round), so that load from other processes hits them alike, and
each run records how many cores other processes kept busy meanwhile (``foreign_cores``: a figure
taken with more than a few tenths of a core busy elsewhere is not one of an idle machine). With
``--idle X`` every run first waits (up to a minute) until other processes use fewer than X cores.

Printed: min / median / max seconds per case, the median foreign cores, and which of torch,
torchvision, ray and mlflow the process had imported when it reported the error (``-X importtime``
of one extra run). The result is written as JSON to ``bench/results/`` (or ``$BENCH_RESULTS_DIR``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO_ROOT, CpuMonitor, load_avg, save_result, summary, wait_for_idle  # noqa: E402

SMOKE = "tune_configs/smoke.yaml"
CASES: dict[str, list[str]] = {
    # A key typo in a training: the error names the key and the keys allowed there.
    "train-typo": ["-m", "semckd_ray.train", "--config", SMOKE, "--set", "optim.batchsize=64"],
    # The same typo in a sweep of the default experiment file.
    "tune-typo": ["-m", "semckd_ray.tune", "--set", "optim.batchsize=64"],
    "unknown-model": ["-m", "semckd_ray.train", "--config", SMOKE, "--set", "student.model=resnet9"],
    "unknown-method": ["-m", "semckd_ray.train", "--config", SMOKE, "--set", "method.name=semckdd"],
}
HEAVY = ("torch", "torchvision", "ray", "mlflow")


def time_to_error(args: list[str]) -> tuple[float, str]:
    """Seconds from starting ``python ARGS`` to its ``error:`` line on stderr, and the error (its first lines)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    elapsed, error = None, []
    for line in proc.stderr:
        if elapsed is None and line.startswith("error:"):
            elapsed = time.perf_counter() - started
        if elapsed is not None:
            error.append(line.strip())
    code = proc.wait()
    if elapsed is None or code != 2:
        raise SystemExit(f"python {' '.join(args)}: exit status {code}, no 'error:' line on stderr")
    return elapsed, " ".join(error[:2])


def imported_heavy(args: list[str]) -> list[str]:
    """Which of ``HEAVY`` the command imported before it exited (``-X importtime`` names every import)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=REPO_ROOT, capture_output=True, text=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in HEAVY if m in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (default 5)")
    parser.add_argument("--idle", type=float, default=0.0, metavar="CORES",
                        help="before each run, wait until other processes use fewer than CORES cores (0: never)")
    parser.add_argument("--only", default=",".join(CASES), help="comma-separated cases (default: all)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(CASES)}")

    times: dict[str, list[float]] = {n: [] for n in names}
    foreign: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    load_start = load_avg()
    time_to_error(CASES[names[0]])  # warm-up: the page cache holds the interpreter and the packages
    for round_ in range(args.repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            if args.idle > 0:
                wait_for_idle(args.idle, timeout_s=60)
            monitor = CpuMonitor().start()
            seconds, errors[name] = time_to_error(CASES[name])
            times[name].append(seconds)
            foreign[name].append(monitor.stop().get("foreign_cores", float("nan")))
    load_end = load_avg()
    heavy = {name: imported_heavy(CASES[name]) for name in names}

    print(f"process start to the error, {args.repeats} runs each (load avg {load_start} -> {load_end})")
    print(f"{'case':16s} {'min':>6s} {'median':>7s} {'max':>6s}  {'foreign':>7s}  imported")
    for name in names:
        s = summary(times[name])
        print(f"{name:16s} {s['min']:6.2f} {s['median']:7.2f} {s['max']:6.2f}  "
              f"{summary(foreign[name])['median']:7.2f}  {', '.join(heavy[name]) or '-'}")
    for name in names:
        print(f"  {name}: {errors[name][:160]}")
    path = save_result("config_errors", {
        "cases": {name: {"argv": CASES[name], "seconds": summary(times[name]), "runs": times[name],
                         "foreign_cores": foreign[name], "imported": heavy[name], "error": errors[name]}
                  for name in names},
        "load_avg_start": load_start, "load_avg_end": load_end,
    })
    print(f"written to {path}")


if __name__ == "__main__":
    main()
