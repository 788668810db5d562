"""SemCKD's per-pair, per-sample MSE alone, forward + backward: the official expression against the written-out one.

    python bench/pair_mse.py [--batch 64 --iters 20 --warmup 3]

For the pair shapes of resnet32x4 -> resnet8x4 (a projection's output against a teacher map: 64 x
32 x 32, 128 x 16 x 16, 256 x 8 x 8), contiguous and channels_last, interleaved:

* ``official``: ``mse_loss(reduction="none").reshape(B, -1).mean(1)`` (the authors' ``MSELoss`` + mean);
* ``written_out``: ``d = p - t; (d * d).sum(1) / n`` on the maps' rows in memory order;
* ``module``: what ``semckd_ray.distill.semckd._pair_mse`` does (the official expression on
  contiguous maps, the written-out one on channels_last maps).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import fmt_summary, load_avg, save_result, summary  # noqa: E402

SHAPES = ((64, 32), (128, 16), (256, 8))


def official(p, t):
    return F.mse_loss(p, t, reduction="none").reshape(p.shape[0], -1).mean(1)


def written_out(p, t):
    from semckd_ray.distill.semckd import _rows

    d = _rows(p - t)
    return (d * d).sum(1) / d.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from semckd_ray.distill.semckd import _pair_mse

    variants = {"official": official, "written_out": written_out, "module": _pair_mse}
    gen = torch.Generator().manual_seed(0)
    result = {"config": vars(args), "ms": {}, "load_avg_start": load_avg()}
    for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        for c, hw in SHAPES:
            p = torch.randn(args.batch, c, hw, hw, generator=gen).contiguous(memory_format=fmt).requires_grad_(True)
            t = torch.randn(args.batch, c, hw, hw, generator=gen).contiguous(memory_format=fmt)
            times = {n: [] for n in variants}
            for it in range(args.warmup + args.iters):
                for name, fn in variants.items():
                    p.grad = None
                    started = time.perf_counter()
                    fn(p, t).sum().backward()
                    if it >= args.warmup:
                        times[name].append((time.perf_counter() - started) * 1e3)
            key = f"{layout} {c}x{hw}x{hw}"
            result["ms"][key] = {n: summary(v) for n, v in times.items()}
            print(f"{key}: " + "; ".join(f"{n} {fmt_summary(s, digits=2)}" for n, s in result["ms"][key].items()))
    result["load_avg_end"] = load_avg()
    print(f"  load avg {result['load_avg_start']} -> {result['load_avg_end']}")
    print(f"  saved {save_result('pair_mse', result)}")


if __name__ == "__main__":
    main()
