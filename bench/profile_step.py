"""Where one training iteration's time goes: torch.profiler over a few iterations of ``bench/step.py``'s step.

    python bench/profile_step.py --teacher resnet32x4 --student resnet8x4 --method semckd --batch 64 [--dtype bfloat16]

Prints the operators by self CPU time (top ``--rows``) and the share of the main groups
(convolution, batch norm, matmul, pooling, elementwise), then the iteration's work floor: its
convolution and matmul multiply-accumulates (``torch.utils.flop_counter``) over this CPU's peak for a
large float32 matrix product at the same thread count -- the time the iteration would take if those
ran at GEMM peak and everything else were free. Saves it all as JSON.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.common import load_avg, save_result  # noqa: E402
from bench.step import build, parser  # noqa: E402

GROUPS = {
    "convolution": ("conv", "mkldnn_convolution", "convolution_backward"),
    "batch_norm": ("batch_norm",),
    "matmul": ("mm", "bmm", "addmm", "matmul", "linear"),
    "pooling": ("pool",),
    "optimizer": ("_foreach", "sgd"),
}


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, keys in GROUPS.items():
        if any(k in lowered for k in keys):
            return group
    return "other"


def gemm_peak_gmac_s(n: int = 2048, repeats: int = 5) -> float:
    """Multiply-accumulates per second of one large float32 matrix product at the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return n**3 * repeats / (time.perf_counter() - started) / 1e9


def work_floor(step, x, y, index, per_iter_ms: float, groups: dict[str, float], iters: int) -> dict:
    """The iteration's convolution and matmul work (FlopCounterMode) against this CPU's GEMM peak.

    ``floor_ms`` is the time the counted work would take at the peak of a large matrix product,
    with everything else (BatchNorm, ReLU, pooling, the optimizer) free: no exact rewrite that keeps
    the work can go below it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(x, y, index)
    by_op = {str(op): flops / 2e9 for op, flops in counter.get_flop_counts()["Global"].items()}
    gmac = sum(by_op.values())
    peak = gemm_peak_gmac_s()
    conv_ms = groups.get("convolution", 0.0) / 1e3 / iters
    conv_gmac = sum(v for k, v in by_op.items() if "conv" in k)
    floor = {"gmac_per_iter": gmac, "gmac_by_op": by_op, "gemm_peak_gmac_s": peak, "floor_ms": gmac / peak * 1e3,
             "convolution_ms_per_iter": conv_ms, "convolution_gmac_s": conv_gmac / conv_ms * 1e3 if conv_ms else None}
    print(f"work: {gmac:.1f} GMAC per iteration ({', '.join(f'{k} {v:.1f}' for k, v in by_op.items())}); "
          f"GEMM peak at {torch.get_num_threads()} threads {peak:.1f} GMAC/s -> floor {floor['floor_ms']:.0f} ms "
          f"(measured {per_iter_ms:.0f} ms); convolutions ran at {floor['convolution_gmac_s'] or 0:.1f} GMAC/s")
    return floor


def main() -> None:
    p = parser()
    p.add_argument("--rows", type=int, default=25)
    p.set_defaults(iters=3, warmup=2)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    step = build(args, device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, 32, 32).to(device, memory_format=memory_format)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    index = torch.randint(0, 50_000, (args.batch,), device=device)
    for _ in range(args.warmup):
        step(x, y, index)
    load_start = load_avg()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.iters):
            step(x, y, index)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[group_of(e.key)] += e.self_cpu_time_total
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    shares = {g: round(100 * t / total, 1) for g, t in sorted(groups.items(), key=lambda kv: -kv[1])}
    per_iter_ms = total / 1e3 / args.iters
    print(f"self CPU time per iteration {per_iter_ms:.0f} ms; shares (%): {shares}; load avg {load_start} -> {load_avg()}")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]
    floor = work_floor(step, x, y, index, per_iter_ms, groups, args.iters)
    path = save_result("profile", {
        "config": vars(args), "self_cpu_ms_per_iter": per_iter_ms, "group_share_percent": shares, "floor": floor,
        "top_ops": [{"op": e.key, "self_cpu_ms_per_iter": e.self_cpu_time_total / 1e3 / args.iters,
                     "calls_per_iter": e.count / args.iters} for e in top],
        "load_avg_start": load_start,
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
