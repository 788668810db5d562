"""Ray Train's overhead: one epoch through ``TorchTrainer`` (one worker) vs the same loop called directly.

    python bench/ray_overhead.py [--train-images 10000] [--epochs 1] [--repeats 3] [--cpus 2]

Both run ``semckd_ray.train_loop.run_worker`` on the same config: a synthetic CIFAR-100-format
dataset (random images written as the official pickles, ``--train-images`` of them), SemCKD from a
randomly initialised resnet20 teacher checkpoint to resnet8, batch 64, ``--cpus`` torch threads.
"direct" calls it in this process with a ``LocalReporter``; "ray" runs it in a one-worker
``TorchTrainer`` built by ``semckd_ray.trainer.build_trainer`` (no MLflow run in either). The two
alternate (direct, ray, direct, ray, ...). Ray is started once, before any timing.

Figures: the ``epoch_seconds`` each run reports for its last epoch (the training epoch alone, as
the trainer logs it: no start-up, evaluation or checkpointing; with ``--epochs 2`` the first
epoch's warm-up is left out), and the whole call's wall time (for Ray: worker
group start-up, the controller, reporting and checkpoint transfer included).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import CpuMonitor, load_avg, save_result, summary  # noqa: E402


def write_synthetic_cifar100(root: Path, train_images: int, test_images: int, seed: int = 0) -> None:
    """Random images in the official CIFAR-100 python layout (the loader warns that MD5s differ)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", train_images), ("test", test_images)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": rng.integers(0, 100, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{k}" for k in range(100)]}, f)


def make_config(work: Path, args) -> dict:
    import torch

    from semckd_ray.config import parse_train_config
    from semckd_ray.models import create_model

    write_synthetic_cifar100(work / "data", args.train_images, args.test_images)
    torch.manual_seed(0)
    teacher_path = work / "teacher.pth"
    torch.save({"model": create_model(args.teacher, num_classes=100).state_dict()}, teacher_path)
    raw = {
        "name": "ray-overhead",
        "data": {"dataset": "cifar100", "root": str(work / "data"), "val_size": args.val_images},
        "teacher": {"model": args.teacher, "checkpoint": str(teacher_path)},
        "student": {"model": args.student},
        "method": {"name": args.method, "beta": args.beta},
        "optim": {"epochs": args.epochs, "batch_size": args.batch},
        "scaling": {"num_workers": 1, "cpus_per_worker": args.cpus},
        "checkpoint": {"every": 1000},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "storage_path": str(work / "ray_results")},
    }
    return parse_train_config(raw).model_dump(mode="json")


def run_direct(config: dict, work: Path, k: int) -> tuple[list[float], float, dict]:
    from semckd_ray.train_loop import LocalReporter, run_worker

    reporter = LocalReporter(work / f"direct-{k}", resume=False)
    monitor = CpuMonitor().start()
    started = time.perf_counter()
    final = run_worker(config, reporter)
    wall = time.perf_counter() - started
    if final.get("diverged"):
        raise RuntimeError("the direct run diverged; lower --beta")
    return [reporter.metrics[-1]["epoch_seconds"]], wall, monitor.stop()


def run_ray(config: dict, k: int) -> tuple[list[float], float, dict]:
    from semckd_ray.config import TrainConfig
    from semckd_ray.trainer import build_trainer

    cfg = TrainConfig.model_validate(config)
    trainer = build_trainer(cfg, run_id=None, train_run_name=f"ray-overhead-{k}-{time.time_ns()}")
    monitor = CpuMonitor().start()
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    if result.error:
        raise result.error
    if not result.metrics or result.metrics.get("diverged"):
        raise RuntimeError(f"the Ray run reported no usable metrics: {result.metrics}")
    # Ray keeps the last report's metrics (the last epoch's); with one epoch that is the epoch.
    return [result.metrics["epoch_seconds"]], wall, monitor.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--method", default="semckd")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--beta", type=float, default=50.0, help="SemCKD weight (400 diverges on random data)")
    p.add_argument("--train-images", type=int, default=10_000)
    p.add_argument("--val-images", type=int, default=500)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpus", type=float, default=2)
    args = p.parse_args()

    from semckd_ray.trainer import ensure_ray

    load_start = load_avg()
    with tempfile.TemporaryDirectory(prefix="semckd-ray-overhead-") as tmp:
        work = Path(tmp)
        config = make_config(work, args)
        started = time.perf_counter()
        ensure_ray()
        ray_start_s = time.perf_counter() - started
        epochs: dict[str, list[float]] = {"direct": [], "ray": []}
        walls: dict[str, list[float]] = {"direct": [], "ray": []}
        foreign: dict[str, list[float]] = {"direct": [], "ray": []}
        for k in range(args.repeats):
            for name in ("direct", "ray"):
                seconds, wall, load = run_direct(config, work, k) if name == "direct" else run_ray(config, k)
                epochs[name] += seconds
                walls[name].append(wall)
                # For "ray" this counts the Ray processes (worker, controller, raylet) as foreign too.
                foreign[name].append(load.get("foreign_cores", float("nan")))
                print(f"  round {k} {name}: epoch_seconds {[round(s, 2) for s in seconds]}, wall {wall:.1f} s, "
                      f"other processes' cores {load.get('foreign_cores')}", flush=True)

    stats = {n: summary(v) for n, v in epochs.items()}
    wall_stats = {n: summary(v) for n, v in walls.items()}
    overhead = stats["ray"]["median"] / stats["direct"]["median"] - 1
    paired = [r / d - 1 for r, d in zip(epochs["ray"], epochs["direct"])]
    result = {
        "config": vars(args), "epoch_seconds": stats, "epoch_seconds_all": epochs, "wall_seconds": wall_stats,
        "wall_seconds_all": walls, "ray_start_seconds": ray_start_s, "epoch_overhead_median": overhead,
        "epoch_overhead_paired": summary(paired), "foreign_cores_all": foreign,
        "load_avg_start": load_start, "load_avg_end": load_avg(),
    }
    print(f"Ray Train overhead: {args.teacher} -> {args.student} {args.method}, {args.train_images} synthetic "
          f"CIFAR-100 images, batch {args.batch}, {args.cpus:g} CPUs, {args.epochs} epoch(s) x {args.repeats}")
    for n in ("direct", "ray"):
        e, w = stats[n], wall_stats[n]
        print(f"  {n:6s} epoch {e['median']:.2f} s (min {e['min']:.2f}, max {e['max']:.2f}); "
              f"whole call {w['median']:.1f} s (min {w['min']:.1f}, max {w['max']:.1f})")
    print(f"  epoch-time overhead of Ray Train: {overhead:+.1%} (medians; paired per round: "
          f"{', '.join(f'{x:+.1%}' for x in paired)}); Ray start-up (excluded) {ray_start_s:.1f} s")
    print(f"  load avg {load_start} -> {result['load_avg_end']}")
    print(f"  saved {save_result('ray_overhead', result)}")


if __name__ == "__main__":
    main()
