"""What every benchmark script shares: the machine record, summary statistics, JSON results, subprocess runs.

Every figure is summarised as min / median / max over timed repeats taken after warm-up. A result
file in ``bench/results/`` records the machine (CPU model, cores, load averages before and after),
the date, the torch / ray versions and the exact command, so that a number can be traced back to
how it was taken. Numbers taken on a shared, loaded machine are only comparable side by side.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` from anywhere imports the package and bench.*
    sys.path.insert(0, str(REPO_ROOT))


def summary(values: Sequence[float]) -> dict[str, float]:
    """min / median / max (and the count) of a list of measurements."""
    values = list(values)
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (``/proc/stat``), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMonitor:
    """How many cores *other* processes kept busy between ``start()`` and ``stop()``.

    The machine is shared: a measurement during which other processes used a core or more is
    not comparable with one taken on an idle machine. ``stop()`` returns ``foreign_cores`` (the
    average number of cores busy with other processes; 0 = we had the machine to ourselves) and
    ``own_cores`` (this process and its waited-for children).
    """

    def start(self) -> "CpuMonitor":
        self._wall, self._busy, self._own = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._wall
        busy, own = _busy_seconds(), _own_seconds() - self._own
        if busy is None or self._busy is None or wall <= 0:
            return {}
        foreign = max(0.0, (busy - self._busy) - own)
        return {"foreign_cores": round(foreign / wall, 3), "own_cores": round(own / wall, 3)}


class Interleaved:
    """Times several callables in turn -- call ``k`` of each back to back -- so that load hits all alike.

    ``times[name]`` (ms) and ``foreign[name]`` (other processes' cores, see ``CpuMonitor``) hold the
    calls after ``warmup``; ``first[name]`` is each callable's first return value. ``rotate`` starts
    round ``k`` at the ``k``-th callable.
    """

    def __init__(self, runners: dict[str, Any], iters: int, warmup: int, rotate: bool = False):
        names = list(runners)
        self.times: dict[str, list[float]] = {n: [] for n in names}
        self.foreign: dict[str, list[float]] = {n: [] for n in names}
        self.first: dict[str, Any] = {}
        self.load_start = load_avg()
        for it in range(warmup + iters):
            order = names[it % len(names):] + names[: it % len(names)] if rotate else names
            for name in order:
                monitor = CpuMonitor().start()
                started = time.perf_counter()
                out = runners[name]()
                elapsed = time.perf_counter() - started
                self.first.setdefault(name, out)
                if it >= warmup:
                    self.times[name].append(elapsed * 1e3)
                    self.foreign[name].append(monitor.stop().get("foreign_cores", float("nan")))
        self.load_end = load_avg()

    def load_line(self) -> str:
        """Load averages before / after and the median foreign cores of each callable, as one line."""
        return (f"load avg {self.load_start} -> {self.load_end}; other processes' cores (median per variant): "
                + ", ".join(f"{n} {summary(v)['median']:.2f}" for n, v in self.foreign.items()))


def wait_for_idle(max_foreign_cores: float, timeout_s: float, probe_s: float = 2.0) -> float:
    """Wait (up to ``timeout_s``) until other processes use fewer than ``max_foreign_cores`` cores.

    Returns the last probe's foreign load. ``max_foreign_cores <= 0`` does not wait.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        monitor = CpuMonitor().start()
        time.sleep(probe_s)
        foreign = monitor.stop().get("foreign_cores", 0.0)
        if max_foreign_cores <= 0 or foreign < max_foreign_cores or time.monotonic() > deadline:
            return foreign


def cpu_model() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in info.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """The machine a result was taken on; ``gpu`` only where CUDA is available."""
    import torch

    record: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_avg": load_avg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": _version("ray"),
        "torchvision": _version("torchvision"),
    }
    if torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name()
        record["cuda"] = torch.version.cuda
    return record


def command() -> str:
    """The command line that produced this result, as it could be typed again."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def save_result(name: str, result: dict[str, Any], folder: Path | None = None) -> Path:
    """Write ``result`` with machine, date and command to ``<folder>/<name>-<timestamp>.json``."""
    now = _dt.datetime.now(_dt.timezone.utc)
    payload = {
        "benchmark": name,
        "date": now.isoformat(timespec="seconds"),
        "command": command(),
        "machine": machine(),
        **result,
    }
    folder = Path(folder or os.environ.get("BENCH_RESULTS_DIR") or RESULTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def run_json(script: str, args: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``bench/<script>`` with ``args`` in a fresh Python process; return the JSON of its last stdout line.

    A fresh process per configuration keeps peak-memory figures (``ru_maxrss``) from mixing.
    On failure the returned dict holds ``error`` (the tail of stderr) instead.
    """
    cmd = [sys.executable, str(BENCH_DIR / script), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "command": shlex.join(cmd)}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-2000:], "returncode": proc.returncode, "command": shlex.join(cmd)}
    return json.loads(lines[-1])


def fmt_summary(s: dict[str, float], unit: str = "ms", digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} {unit} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f}, n={s['n']})"
