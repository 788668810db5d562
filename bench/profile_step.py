"""Where one training iteration's time goes: torch.profiler over a few iterations of ``bench/step.py``'s step.

    python bench/profile_step.py --teacher resnet32x4 --student resnet8x4 --method semckd --batch 64 [--dtype bfloat16]

Prints the operators by self CPU time (top ``--rows``) and the share of the main groups
(convolution, batch norm, matmul, pooling, elementwise), and saves them as JSON.
"""

from __future__ import annotations

import sys
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
    path = save_result("profile", {
        "config": vars(args), "self_cpu_ms_per_iter": per_iter_ms, "group_share_percent": shares,
        "top_ops": [{"op": e.key, "self_cpu_ms_per_iter": e.self_cpu_time_total / 1e3 / args.iters,
                     "calls_per_iter": e.count / args.iters} for e in top],
        "load_avg_start": load_start,
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
