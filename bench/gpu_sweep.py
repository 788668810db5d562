"""Sharing one GPU between sweep trials, and CUDA graphs for the step: SemCKD resnet32x4 -> resnet8x4, batch 64.

    python bench/gpu_sweep.py                   # one H100/H200: under 5 minutes
    python bench/gpu_sweep.py --device cpu      # dry run of everything that needs no CUDA (tiny models, K 1 and 2)
    python bench/gpu_sweep.py --out DIR         # results folder (else $OUT, $BENCH_RESULTS_DIR, /tmp/semckd-bench-results)

It prints numbers and asserts nothing. Three parts, each step the trainer's own: eager steps are
``semckd_ray.train_loop.train_step``, graphed ones ``semckd_ray.cuda_graphs.GraphedStep`` (what
``scaling.cuda_graphs`` runs), on synthetic CIFAR-shaped batches kept on the GPU, with the trainer's GPU
settings (float32, student and teacher in channels_last, the teacher's BatchNorm folded, SGD momentum 0.9,
weight decay 5e-4, cudnn.benchmark).

1. ``graphs``: one process (K=1): the batch-64 step of SemCKD and of KD, eager and graphed, in
   interleaved rounds (ms/step, images/s), and the SemCKD/KD time ratio (KD images/s over SemCKD's).
2. ``sharing``: K = 1, 2, 4, 8 concurrent trials, each a separate process training SemCKD on its own
   data on the same GPU. Every trial builds and warms up (graph captured), waits at a file barrier, then
   trains eagerly for a window, waits again, then graphed for a window. Aggregate images/s is the sum
   of the trials'; ``overlap`` is the share of the window all K trials were running together.
3. ``sharing_mps``: part 2 again under CUDA MPS, when ``nvidia-cuda-mps-control -d`` starts a daemon
   (pipe and log folders in a temporary folder, stopped with ``quit`` afterwards); otherwise it says
   why it was skipped.

The targets are printed beside the numbers: K=4 aggregate >= 3x K=1; batch-64 SemCKD >= 8,000 images/s
with graphs; SemCKD/KD < 2.4. The JSON (rewritten after each part, so a timeout keeps what finished)
records the machine, the date, the command and every row.

This process never touches CUDA itself, so that the MPS daemon can be started between parts; every
measurement runs in a child process (``--child``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import command, summary  # noqa: E402

SCRIPT = Path(__file__).resolve()
TARGET_SHARING = 3.0  # K=4 aggregate over K=1
TARGET_GRAPHS_IPS = 8000.0  # batch-64 SemCKD with graphs, images/s
TARGET_RATIO = 2.4  # SemCKD/KD time per step
NUM_CLASSES = 100  # CIFAR-100-shaped
NUM_TRAIN = 50_000

# ---------------------------------------------------------------------------------------------
# Child processes: the measurements


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(spec: dict, method: str, seed: int):
    """Teacher, student, method and SGD as ``run_worker`` builds them on a GPU; the eager and graphed steps."""
    import torch

    from semckd_ray.cuda_graphs import GraphedStep
    from semckd_ray.distill import DistillContext, Distiller, create_method
    from semckd_ray.models import create_model
    from semckd_ray.teacher import FrozenTeacher
    from semckd_ray.train_loop import feature_shapes, train_step

    device, batch = torch.device(spec["device"]), spec["batch"]
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    torch.manual_seed(seed)
    student = create_model(spec["student"], num_classes=NUM_CLASSES).to(device, memory_format=fmt)
    teacher = FrozenTeacher(create_model(spec["teacher"], num_classes=NUM_CLASSES).to(device),
                            torch.channels_last, feature_format=fmt)
    ctx = DistillContext(student_shapes=feature_shapes(student, device), teacher_shapes=feature_shapes(teacher, device),
                         batch_size=batch, num_classes=NUM_CLASSES, num_train=NUM_TRAIN,
                         train_labels=torch.randint(0, NUM_CLASSES, (NUM_TRAIN,)))
    module = create_method(method, ctx).to(device, memory_format=fmt)
    model = Distiller(student, module)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    index_used = module.needs_index

    def eager(x, y, index):
        return train_step(model, teacher, optimizer, x, y, index if index_used else None, device, False)

    graphed = GraphedStep(model, teacher, optimizer, device, False, method=module, batch_size=batch)

    def graphed_step(x, y, index):
        return graphed(x, y, index if index_used else None)

    gen = torch.Generator().manual_seed(seed + 1)
    data = []
    for _ in range(8):  # a few distinct batches, on the device, in the student's layout
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(device, memory_format=fmt)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
        index = torch.randint(0, NUM_TRAIN, (batch,), generator=gen).to(device)
        data.append((x, y, index))
    return eager, graphed_step, graphed, data


def _run_steps(step, data, device, *, steps: int | None = None, seconds: float | None = None) -> dict:
    """``steps`` steps, or as many as fit in ``seconds``; the GPU is kept at most two steps behind."""
    import torch

    _sync(device)
    started = time.perf_counter()
    deadline = started + (seconds or 0.0)
    queued: deque = deque()
    done = 0
    wall_start = time.time()
    losses = None
    while True:
        x, y, index = data[done % len(data)]
        _, losses = step(x, y, index)
        done += 1
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            queued.append(event)
            if len(queued) > 2:
                queued.popleft().synchronize()
        if (steps is not None and done >= steps) or (seconds is not None and time.perf_counter() >= deadline):
            break
    _sync(device)
    elapsed = time.perf_counter() - started
    batch = data[0][1].shape[0]
    return {"steps": done, "seconds": elapsed, "ms_per_step": 1e3 * elapsed / done,
            "images_per_s": batch * done / elapsed, "window": [wall_start, time.time()],
            "last_total_loss": float(losses["total"])}


def _prepare(eager, graphed_step, data, device) -> None:
    """Eager steps (cuDNN autotuning), then the graphed step through warm-up and capture to a few replays."""
    from semckd_ray.cuda_graphs import WARMUP_STEPS

    _run_steps(eager, data, device, steps=3)
    _run_steps(graphed_step, data, device, steps=WARMUP_STEPS + 3)


def _barrier(folder: Path, name: str, k: int, trial: int, timeout: float) -> None:
    """Wait until all ``k`` trials have reached ``name`` (a file each); give up if one has failed."""
    (folder / f"{name}.{trial}").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(f"{name}.*"))) < k:
        if list(folder.glob("failed.*")):
            raise RuntimeError("another trial failed")
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name!r}: not all {k} trials arrived in {timeout:.0f} s")
        time.sleep(0.002)


def _child_graphs(spec: dict) -> dict:
    """Part 1: eager and graphed steps of each method in one process, interleaved rounds."""
    import torch

    device = torch.device(spec["device"])
    out = {}
    for method in spec["methods"]:
        eager, graphed_step, graphed, data = _build(spec, method, seed=0)
        _prepare(eager, graphed_step, data, device)
        runs = {"eager": [], "graphs": []}
        for r in range(spec["rounds"]):
            order = ["eager", "graphs"] if r % 2 == 0 else ["graphs", "eager"]
            for mode in order:
                runs[mode].append(_run_steps(eager if mode == "eager" else graphed_step, data, device,
                                             steps=spec["steps"]))
        row = {}
        for mode, rounds in runs.items():
            ms = summary([x["ms_per_step"] for x in rounds])
            row[mode] = {"ms_per_step": ms, "images_per_s": spec["batch"] * 1e3 / ms["median"],
                         "last_total_loss": rounds[-1]["last_total_loss"]}
        row["graph_stats"] = dict(graphed.stats)
        row["graph_fallback"] = graphed.fallback_reason
        if device.type == "cuda":
            row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
        out[method] = row
        del eager, graphed_step, graphed, data
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _child_trial(spec: dict) -> dict:
    """Part 2/3: one of K concurrent trials: build, warm up, then an eager and a graphed window at the barriers."""
    import torch

    device = torch.device(spec["device"])
    folder, k, trial = Path(spec["barrier_dir"]), spec["k"], spec["trial"]
    eager, graphed_step, graphed, data = _build(spec, "semckd", seed=trial)
    _prepare(eager, graphed_step, data, device)
    out = {"trial": trial, "pid": os.getpid()}
    for mode, step in (("eager", eager), ("graphs", graphed_step)):
        _barrier(folder, mode, k, trial, spec["barrier_timeout_s"])
        out[mode] = _run_steps(step, data, device, seconds=spec["window_s"])
    out["graph_stats"] = dict(graphed.stats)
    out["graph_fallback"] = graphed.fallback_reason
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def child_main(spec: dict) -> None:
    import torch

    from bench.common import machine

    torch.set_num_threads(spec["threads"])
    if spec["device"] == "cuda":
        torch.backends.cudnn.benchmark = True  # as run_worker sets it on a GPU
    try:
        result = (_child_graphs if spec["role"] == "graphs" else _child_trial)(spec)
    except BaseException:
        if spec.get("barrier_dir"):
            (Path(spec["barrier_dir"]) / f"failed.{spec.get('trial', 0)}").touch()
        raise
    result["machine"] = machine()
    if spec["device"] == "cuda":
        result["machine"]["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(json.dumps(result, default=str), flush=True)


# ---------------------------------------------------------------------------------------------
# This process: orchestration, MPS, printing


def _last_json(text: str) -> dict | None:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _spawn(spec: dict, env: dict | None):
    return subprocess.Popen([sys.executable, str(SCRIPT), "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=SCRIPT.parents[1])


def run_children(specs: list[dict], env: dict | None, timeout: float, barrier_dir: Path | None = None) -> list[dict]:
    """Start every spec's child at once and collect each one's JSON (or its error)."""
    procs = [_spawn(spec, env) for spec in specs]
    deadline = time.monotonic() + timeout
    outputs: list[tuple[str, str] | None] = [None] * len(procs)
    while any(o is None for o in outputs):
        for i, proc in enumerate(procs):
            if outputs[i] is None and proc.poll() is not None:
                outputs[i] = proc.communicate()
                if proc.returncode != 0 and barrier_dir is not None:
                    (barrier_dir / "failed.orchestrator").touch()  # the others stop waiting for it
        if time.monotonic() > deadline:
            for i, proc in enumerate(procs):
                if outputs[i] is None:
                    proc.kill()
                    outputs[i] = proc.communicate()
                    outputs[i] = (outputs[i][0], outputs[i][1] + f"\n[killed after {timeout:.0f} s]")
            break
        time.sleep(0.05)
    results = []
    for proc, (stdout, stderr) in zip(procs, outputs):
        parsed = _last_json(stdout) if proc.returncode == 0 else None
        results.append(parsed if parsed is not None else {"error": (stderr or stdout)[-1500:], "returncode": proc.returncode})
    return results


class Results:
    """The result file, rewritten after every part."""

    def __init__(self, folder: Path, args):
        folder.mkdir(parents=True, exist_ok=True)
        now = _dt.datetime.now(_dt.timezone.utc)
        self.path = folder / f"gpu_sweep-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
        self.payload = {"benchmark": "gpu_sweep", "date": now.isoformat(timespec="seconds"), "command": command(),
                        "settings": vars(args).copy(), "nvidia_smi": nvidia_smi(), "parts": {}}

    def save(self) -> None:
        self.path.write_text(json.dumps(self.payload, indent=1, default=str) + "\n")


def nvidia_smi() -> dict:
    """GPU name, driver and memory from nvidia-smi (no CUDA context in this process)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found"}
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total,compute_mode",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-500:]}
    first = out.stdout.strip().splitlines()[0]
    name, driver, memory, mode = (f.strip() for f in first.split(","))
    return {"name": name, "driver": driver, "memory": memory, "compute_mode": mode}


class Mps:
    """An MPS control daemon of our own: pipe and log folders in a temporary folder, stopped with ``quit``."""

    def __init__(self, root: Path):
        self.exe = shutil.which("nvidia-cuda-mps-control")
        self.env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=str(root / "mps-pipe"),
                        CUDA_MPS_LOG_DIRECTORY=str(root / "mps-log"))
        self.log_dir = root / "mps-log"
        self.running = False

    def start(self) -> str | None:
        """None when started, else why not."""
        if self.exe is None:
            return "nvidia-cuda-mps-control not found on PATH"
        for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
            Path(self.env[key]).mkdir(parents=True, exist_ok=True)
        try:
            out = subprocess.run([self.exe, "-d"], env=self.env, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"nvidia-cuda-mps-control -d: {exc}"
        if out.returncode != 0:
            return f"nvidia-cuda-mps-control -d exited {out.returncode}: {(out.stderr or out.stdout).strip()[-300:]}"
        self.running = True
        time.sleep(1.0)
        return None

    def query(self, what: str) -> str:
        out = subprocess.run([self.exe], input=what + "\n", env=self.env, capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    def stop(self) -> None:
        if self.running:
            try:
                self.query("quit")
            finally:
                self.running = False
            time.sleep(1.0)

    def log_tail(self) -> str:
        path = self.log_dir / "control.log"
        return path.read_text()[-1500:] if path.exists() else ""


def sharing_part(args, base_spec: dict, env: dict | None, work: Path, deadline: float) -> list[dict]:
    rows = []
    for k in args.ks:
        needed = args.setup_estimate_s + 2 * args.window_s
        left = deadline - time.monotonic()
        if left < needed:
            rows.append({"k": k, "skipped": f"time budget: {left:.0f} s left, about {needed:.0f} s needed"})
            print(f"  K={k}: skipped ({rows[-1]['skipped']})", flush=True)
            continue
        barrier_dir = Path(tempfile.mkdtemp(prefix=f"barrier-k{k}-", dir=work))
        specs = [dict(base_spec, role="trial", k=k, trial=t, barrier_dir=str(barrier_dir), window_s=args.window_s,
                      barrier_timeout_s=args.setup_allowance_s * 2) for t in range(k)]
        started = time.monotonic()
        trials = run_children(specs, env, timeout=min(left, args.setup_allowance_s * 3 + 2 * args.window_s),
                              barrier_dir=barrier_dir)
        row = {"k": k, "wall_s": time.monotonic() - started, "trials": trials}
        ok = [t for t in trials if "error" not in t]
        if len(ok) < k:
            row["error"] = f"{k - len(ok)} of {k} trials failed: " + next(t["error"] for t in trials if "error" in t)
        for mode in ("eager", "graphs"):
            if not ok:
                break
            rates = [t[mode]["images_per_s"] for t in ok]
            starts = [t[mode]["window"][0] for t in ok]
            ends = [t[mode]["window"][1] for t in ok]
            longest = max(e - s for s, e in zip(starts, ends))
            row[mode] = {"aggregate_images_per_s": sum(rates), "per_trial_images_per_s": rates,
                         "overlap": max(0.0, min(ends) - max(starts)) / longest if longest > 0 else 0.0}
        rows.append(row)
        print_sharing_row(row)
    return rows


def print_sharing_row(row: dict) -> None:
    if "eager" not in row:
        print(f"  K={row['k']}: {row.get('error', row.get('skipped'))}", flush=True)
        return
    parts = []
    for mode in ("eager", "graphs"):
        m = row[mode]
        per = ", ".join(f"{r:,.0f}" for r in m["per_trial_images_per_s"])
        parts.append(f"{mode}: aggregate {m['aggregate_images_per_s']:,.0f} img/s (per trial {per}; "
                     f"overlap {m['overlap']:.0%})")
    fallback = {t.get("graph_fallback") for t in row["trials"] if "error" not in t} - {None}
    note = f"  [graphs fell back: {fallback.pop()}]" if fallback else ""
    print(f"  K={row['k']}: " + " | ".join(parts) + note + (f"  ERROR {row['error']}" if "error" in row else ""),
          flush=True)


def verdict(value: float | None, ok: bool) -> str:
    return "n/a" if value is None else ("met" if ok else "NOT met")


def print_targets(payload: dict, cpu: bool) -> None:
    print("== targets" + (" (CPU dry run: these numbers say nothing about a GPU)" if cpu else ""), flush=True)
    for part in ("sharing", "sharing_mps"):
        rows = {r["k"]: r for r in payload["parts"].get(part, {}).get("rows", []) if isinstance(r, dict)}
        label = "no MPS" if part == "sharing" else "MPS"
        for mode in ("eager", "graphs"):
            one, four = rows.get(1, {}).get(mode), rows.get(4, {}).get(mode)
            if one and four:
                ratio = four["aggregate_images_per_s"] / one["aggregate_images_per_s"]
                print(f"  K=4 aggregate >= {TARGET_SHARING:g}x K=1 ({label}, {mode}): {ratio:.2f}x "
                      f"({four['aggregate_images_per_s']:,.0f} vs {one['aggregate_images_per_s']:,.0f} img/s)  "
                      f"{verdict(ratio, ratio >= TARGET_SHARING)}", flush=True)
            else:
                print(f"  K=4 aggregate >= {TARGET_SHARING:g}x K=1 ({label}, {mode}): not measured", flush=True)
    graphs = payload["parts"].get("graphs", {}).get("rows", {})
    semckd, kd = graphs.get("semckd"), graphs.get("kd")
    if semckd and "graphs" in semckd:
        ips = semckd["graphs"]["images_per_s"]
        print(f"  batch-{payload['settings']['batch']} SemCKD with graphs >= {TARGET_GRAPHS_IPS:,.0f} img/s: {ips:,.0f} "
              f"(eager {semckd['eager']['images_per_s']:,.0f})  {verdict(ips, ips >= TARGET_GRAPHS_IPS)}", flush=True)
    if semckd and kd and "graphs" in semckd and "graphs" in kd:
        for mode in ("eager", "graphs"):
            ratio = kd[mode]["images_per_s"] / semckd[mode]["images_per_s"]
            print(f"  SemCKD/KD time per step < {TARGET_RATIO:g} ({mode}): {ratio:.2f}  "
                  f"{verdict(ratio, ratio < TARGET_RATIO)}", flush=True)


def print_graphs(rows: dict) -> None:
    for method, row in rows.items():
        if "eager" not in row:
            print(f"  {method}: {row.get('error')}", flush=True)
            continue
        e, g = row["eager"], row["graphs"]
        fallback = f"  [graphs fell back: {row['graph_fallback']}]" if row.get("graph_fallback") else ""
        print(f"  {method:6s} eager {e['images_per_s']:9,.0f} img/s ({e['ms_per_step']['median']:.2f} ms/step) | "
              f"graphs {g['images_per_s']:9,.0f} img/s ({g['ms_per_step']['median']:.2f} ms/step) | "
              f"x{g['images_per_s'] / e['images_per_s']:.2f}; {row['graph_stats']}{fallback}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a dry run with tiny models and step counts, K in {1, 2}, no MPS")
    p.add_argument("--out", default=None,
                   help="results folder (default: $OUT, else $BENCH_RESULTS_DIR, else /tmp/semckd-bench-results)")
    p.add_argument("--budget-s", type=float, default=250.0,
                   help="start no sharing run that would not end within this many seconds of the start")
    p.add_argument("--ks", default=None, help="concurrent trials, e.g. 1,2,4,8 (cpu: 1,2)")
    p.add_argument("--window-s", type=float, default=None, help="timed window per mode and trial (cuda 4, cpu 1)")
    p.add_argument("--steps", type=int, default=None, help="graphs part: steps per round (cuda 100, cpu 2)")
    p.add_argument("--rounds", type=int, default=None, help="graphs part: rounds (cuda 3, cpu 2)")
    p.add_argument("--teacher", default=None, help="(cuda resnet32x4, cpu resnet14)")
    p.add_argument("--student", default=None, help="(cuda resnet8x4, cpu resnet8)")
    p.add_argument("--batch", type=int, default=None, help="(cuda 64, cpu 16)")
    p.add_argument("--no-mps", action="store_true", help="skip part 3")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child_main(json.loads(args.child))
        return

    cpu = args.device == "cpu"
    defaults = ({"ks": "1,2", "window_s": 1.0, "steps": 2, "rounds": 2, "teacher": "resnet14", "student": "resnet8",
                 "batch": 16} if cpu else
                {"ks": "1,2,4,8", "window_s": 4.0, "steps": 100, "rounds": 3, "teacher": "resnet32x4",
                 "student": "resnet8x4", "batch": 64})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ks = [int(k) for k in str(args.ks).split(",")]
    # A trial's start-up, build, cuDNN autotuning and capture: what the budget expects, and what it may take.
    args.setup_estimate_s, args.setup_allowance_s = (15.0, 60.0) if cpu else (20.0, 45.0)
    if not cpu and shutil.which("nvidia-smi") is None:
        print("warning: nvidia-smi not found; is there a GPU?", flush=True)
    folder = Path(args.out or os.environ.get("OUT") or os.environ.get("BENCH_RESULTS_DIR")
                  or Path(tempfile.gettempdir()) / "semckd-bench-results")
    results = Results(folder, args)
    payload = results.payload
    deadline = time.monotonic() + args.budget_s
    work = Path(tempfile.mkdtemp(prefix="gpu-sweep-"))
    base = {"device": args.device, "teacher": args.teacher, "student": args.student, "batch": args.batch,
            "channels_last": not cpu, "threads": 1 if cpu else 2}

    smi = payload["nvidia_smi"]
    print(f"== machine: {smi.get('name', '?')}, driver {smi.get('driver', '?')}, {smi.get('memory', '?')}, "
          f"compute mode {smi.get('compute_mode', '?')} ({smi['error'] if 'error' in smi else 'nvidia-smi'}); "
          f"{payload['date']}", flush=True)
    print(f"   {args.teacher} -> {args.student}, batch {args.batch}, float32, "
          f"{'channels_last' if base['channels_last'] else 'contiguous'}, device {args.device}", flush=True)

    # ---- 1. eager vs graphs, one process
    print(f"== 1. one process (K=1): eager train_step vs GraphedStep, {args.rounds} rounds x {args.steps} steps",
          flush=True)
    spec = dict(base, role="graphs", methods=["semckd", "kd"], steps=args.steps, rounds=args.rounds)
    (graphs,) = run_children([spec], None, timeout=max(60.0, deadline - time.monotonic()))
    machine = graphs.pop("machine", None)
    payload["machine"] = machine
    payload["parts"]["graphs"] = {"rows": graphs}
    results.save()
    if machine:
        print(f"   torch {machine.get('torch')} (CUDA {machine.get('cuda')}), GPU {machine.get('gpu', 'none')}, "
              f"CPU {machine.get('cpu')}", flush=True)
    if "error" in graphs:
        print(f"  ERROR {graphs['error']}", flush=True)
    else:
        print_graphs(graphs)

    # ---- 2. K concurrent trials
    print(f"== 2. K concurrent SemCKD trials (separate processes), {args.window_s:g} s windows, no MPS", flush=True)
    payload["parts"]["sharing"] = {"rows": sharing_part(args, base, None, work, deadline)}
    results.save()

    # ---- 3. the same under MPS
    print("== 3. K concurrent SemCKD trials under CUDA MPS", flush=True)
    if cpu or args.no_mps:
        why = "--device cpu: MPS shares a GPU" if cpu else "--no-mps"
        payload["parts"]["sharing_mps"] = {"skipped": why}
        print(f"  skipped ({why})", flush=True)
    else:
        mps = Mps(work)
        why = mps.start()
        if why is not None:
            payload["parts"]["sharing_mps"] = {"skipped": f"MPS not available: {why}"}
            print(f"  skipped: MPS not available: {why}", flush=True)
        else:
            try:
                rows = sharing_part(args, base, mps.env, work, deadline)
                payload["parts"]["sharing_mps"] = {"rows": rows, "server_list": mps.query("get_server_list"),
                                                   "control_log_tail": mps.log_tail()}
                if not payload["parts"]["sharing_mps"]["server_list"]:
                    print("  note: the MPS daemon lists no server: the trials may not have run under MPS", flush=True)
            except Exception:
                payload["parts"]["sharing_mps"] = {"error": traceback.format_exc()[-1500:]}
                print(f"  ERROR {payload['parts']['sharing_mps']['error']}", flush=True)
            finally:
                mps.stop()
    results.save()

    print_targets(payload, cpu)
    print(f"saved {results.path}", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
