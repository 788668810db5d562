"""One short SemCKD training through the real per-worker loop on a GPU, without Ray or MLflow.

    python bench/gpu_e2e.py [--epochs 2]

Checks the GPU path end to end (device placement, pinned copies, bf16 autocast, channels_last,
evaluation) on digits with a randomly initialised resnet20 teacher, and prints the loop's own
per-epoch images/s for float32 and for bf16 + channels_last. Results go to $OUT (or bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import RESULTS_DIR, command, machine  # noqa: E402
from semckd_ray.config import parse_train_config  # noqa: E402
from semckd_ray.models import create_model  # noqa: E402
from semckd_ray.train_loop import LocalReporter, run_worker  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    work = Path(tempfile.mkdtemp(prefix="gpu-e2e-"))
    teacher = work / "teacher.pt"
    torch.save({"model": create_model("resnet20", num_classes=10).state_dict()}, teacher)
    rows = []
    for amp in (False, True):
        cfg = parse_train_config({
            "name": "gpu-e2e", "data": {"dataset": "digits", "root": str(work / "data")},
            "teacher": {"model": "resnet20", "checkpoint": str(teacher)}, "student": {"model": "resnet8"},
            "method": {"name": "semckd", "beta": 50},
            "optim": {"epochs": args.epochs, "batch_size": 64},
            "scaling": {"use_gpu": True, "bf16": amp, "channels_last": amp, "cpus_per_worker": 4},
            "checkpoint": {"every": args.epochs},
        })
        reporter = LocalReporter(work / f"ckpt-{amp}")
        started = time.perf_counter()
        final = run_worker(cfg.model_dump(mode="json"), reporter)
        row = {"bf16_channels_last": amp, "wall_s": time.perf_counter() - started,
               "images_per_s_by_epoch": [m["images_per_s"] for m in reporter.metrics],
               "train_total_last": final["train_total"], "val_top1_last": final.get("val_top1"),
               "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.reset_peak_memory_stats()
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (folder / f"gpu_e2e-{stamp}.json").write_text(json.dumps(
        {"benchmark": "gpu_e2e", "date": stamp, "command": command(), "machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
