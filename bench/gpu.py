"""GPU measurements, run by ``bench/gpu.sh`` (one part per call, so a hang in one cannot eat the others' time).

    python bench/gpu.py nccl            # 1-process NCCL init_process_group + all_reduce sanity check
    python bench/gpu.py loader          # our input pipeline on the GPU, images/s
    python bench/gpu.py train [--budget-s 110]
                                        # images/s of SemCKD and KD training steps, resnet32x4 -> resnet8x4
    python bench/gpu.py compile [--budget-s 70]
                                        # the same with torch.compile (bf16, channels_last, batch 64)

``train`` runs ``bench/step.py``'s step (the trainer's ``train_step``) on CIFAR-100-sized random
data for batch 64 / 256 / 512 (SemCKD's query/key MLPs are as wide as the batch, so each batch
size is a different SemCKD module), float32 vs bf16 autocast, channels_last off/on; ``compile``
adds torch.compile at batch 64 while its time budget lasts. Every configuration runs in try/except,
prints its line at once and rewrites ``$OUT/gpu_<part>.json`` (or ``bench/results/``), so a
timeout keeps everything measured before it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import RESULTS_DIR, command, machine, summary  # noqa: E402

TEACHER, STUDENT = "resnet32x4", "resnet8x4"


class Results:
    """Accumulates result rows and rewrites the part's JSON file after each one."""

    def __init__(self, part: str):
        folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.path = folder / f"gpu_{part}-{stamp}.json"
        self.payload = {"benchmark": f"gpu_{part}", "date": stamp, "command": command(), "machine": machine(),
                        "settings": {"cudnn.benchmark": torch.backends.cudnn.benchmark,
                                     "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                                     "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32},
                        "rows": []}

    def add(self, row: dict) -> None:
        self.payload["rows"].append(row)
        self.path.write_text(json.dumps(self.payload, indent=1, default=str) + "\n")


def part_nccl(_args) -> None:
    import torch.distributed as dist

    results = Results("nccl")
    row = {"check": "nccl_all_reduce_world1"}
    try:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        torch.cuda.set_device(0)
        started = time.perf_counter()
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        t = torch.arange(4, dtype=torch.float32, device="cuda")
        dist.all_reduce(t)
        torch.cuda.synchronize()
        row.update(ok=bool(torch.equal(t.cpu(), torch.arange(4, dtype=torch.float32))),
                   seconds=time.perf_counter() - started, nccl_version=".".join(map(str, torch.cuda.nccl.version())))
        dist.destroy_process_group()
    except Exception as exc:  # report, never crash the suite
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    print(f"NCCL 1-process all_reduce: {row}", flush=True)
    results.add(row)


def part_loader(args) -> None:
    from semckd_ray.data import BatchLoader, Split

    results = Results("loader")
    images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 100, (50_000,))
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    variants = {
        "on_gpu": dict(keep_on_device=True),
        "on_gpu_channels_last": dict(keep_on_device=True, channels_last=True),
        "pinned_cpu_to_gpu": dict(pin_memory=True),
    }
    for name, placement in variants.items():
        row = {"loader": name, "batch": args.batch}
        try:
            loader = BatchLoader(Split(images, labels), mean, std, args.batch, augment=True, shuffle=True,
                                 device="cuda", **placement)
            rates = []
            for epoch in range(4):  # epoch 0: warm-up
                loader.set_epoch(epoch)
                torch.cuda.synchronize()
                started = time.perf_counter()
                n = 0
                for x, y, _ in loader:
                    n += len(y)
                torch.cuda.synchronize()
                if epoch:
                    rates.append(n / (time.perf_counter() - started))
            row["images_per_s"] = summary(rates)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        print(f"loader {name}: {row.get('images_per_s', row.get('error'))}", flush=True)
        results.add(row)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(method: str, batch: int, dtype: str, channels_last: bool, compile_: bool, iters: int,
              warmup: int, device: torch.device) -> dict:
    from bench.step import build, parser

    args = parser().parse_args([
        "--teacher", TEACHER, "--student", STUDENT, "--method", method, "--batch", str(batch),
        "--dtype", dtype, "--device", str(device), *(["--channels-last"] if channels_last else []),
        *(["--compile"] if compile_ else []),
    ])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    built = time.perf_counter()
    step = build(args, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 100, (batch,), device=device)
    index = torch.randint(0, 50_000, (batch,), device=device)
    first = None
    for _ in range(warmup):
        losses = step(x, y, index)
        first = first or losses
    sync(device)
    warm_s = time.perf_counter() - built
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        step(x, y, index)
        sync(device)
        times.append((time.perf_counter() - started) * 1e3)
    ms = summary(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"ms_per_iter": ms, "images_per_s": batch * 1e3 / ms["median"], "first_losses": first,
            "build_and_warmup_s": warm_s, "peak_cuda_mb": peak}


def part_train(args) -> None:
    configs = [(m, b, dt, cl, False) for b in (64, 256, 512) for m in ("semckd", "kd")
               for dt in ("float32", "bfloat16") for cl in (False, True)]
    run_configs("train", configs, args)


def part_compile(args) -> None:
    run_configs("compile", [(m, 64, "bfloat16", True, True) for m in ("semckd", "kd")], args)


def run_configs(part: str, configs, args) -> None:
    torch.backends.cudnn.benchmark = True  # as the official code (train_student.py:L340-341)
    results = Results(part)
    deadline = time.monotonic() + args.budget_s
    for method, batch, dtype, cl, compile_ in configs:
        row = {"method": method, "teacher": TEACHER, "student": STUDENT, "batch": batch, "dtype": dtype,
               "channels_last": cl, "compile": compile_}
        left = deadline - time.monotonic()
        if left < 10:
            row["skipped"] = f"time budget: {left:.0f} s left"
        else:
            try:
                row.update(time_step(method, batch, dtype, cl, compile_, args.iters, args.warmup,
                                     torch.device(args.device)))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        shown = (f"{row['images_per_s']:,.0f} img/s, {row['ms_per_iter']['median']:.1f} ms/iter, "
                 f"peak {row['peak_cuda_mb']:,.0f} MB" if "images_per_s" in row else row.get("error", row.get("skipped")))
        print(f"{method:6s} b{batch:<4d} {dtype:8s} cl={int(cl)} compile={int(compile_)}: {shown}", flush=True)
        results.add(row)
    print(f"saved {results.path}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("nccl", "loader", "train", "compile"))
    p.add_argument("--budget-s", type=float, default=110.0, help="train/compile: start no config after this")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=64, help="loader: batch size")
    p.add_argument("--device", default="cuda", help="train/compile: 'cpu' only to dry-run this script")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: bench/gpu.py measures GPUs only")
    {"nccl": part_nccl, "loader": part_loader, "train": part_train, "compile": part_compile}[args.part](args)


if __name__ == "__main__":
    main()
