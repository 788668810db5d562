"""The frozen teacher's forward alone: layouts, BatchNorm folded into the convolutions, inference mode, inductor.

    python bench/teacher_forward.py [--teacher resnet32x4 --batch 64 --iters 8 --warmup 2] [--compile]

The teacher of a distillation runs forward only, in eval mode, never trained: its BatchNorm reads
running statistics, so conv + BN is one convolution with scaled weights and a bias (exact up to
float rounding). Variants, timed interleaved (one forward of each in turn):

* ``no_grad``: contiguous (NCHW) maps under ``torch.no_grad`` -- the trainer before
  ``scaling.teacher_channels_last``, and the official code;
* ``inference_mode``: the same under ``torch.inference_mode``;
* ``folded``: BatchNorm folded into the convolutions (``torch.fx`` conv-BN fusion), inference mode;
* ``cl`` / ``cl_folded``: the same two in channels_last -- ``cl`` is ``FrozenTeacher``, the trainer's default;
* ``compiled`` (``--compile``): ``torch.compile`` with inductor's freezing (folds BN, pre-packs the
  weights, fuses the element-wise tails), channels_last; its compile time is reported apart.

BatchNorm statistics are drawn away from the identity (0 / 1) so that folding changes the weights.
Every variant's logits and feature maps are compared against the teacher in float64.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import Interleaved, fmt_summary, save_result, summary  # noqa: E402


def frozen(name: str, seed: int) -> torch.nn.Module:
    from semckd_ray.models import create_model

    torch.manual_seed(seed)
    model = create_model(name, num_classes=100)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval().requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="add the inductor (freezing) variant")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from torch.fx.experimental.optimization import fuse

    from semckd_ray.teacher import FrozenTeacher

    cl = torch.channels_last
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        truth = frozen(args.teacher, 0).double()(x.double())
    variants = {
        "no_grad": (frozen(args.teacher, 0), torch.no_grad, torch.contiguous_format),
        "inference_mode": (frozen(args.teacher, 0), torch.inference_mode, torch.contiguous_format),
        "folded": (fuse(frozen(args.teacher, 0)), torch.inference_mode, torch.contiguous_format),
        "cl": (FrozenTeacher(frozen(args.teacher, 0), cl), torch.no_grad, torch.contiguous_format),
        "cl_folded": (fuse(frozen(args.teacher, 0).to(memory_format=cl)), torch.inference_mode, cl),
    }
    compile_s = None
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(frozen(args.teacher, 0).to(memory_format=cl))
        started = time.perf_counter()
        with torch.no_grad():
            compiled(x.contiguous(memory_format=cl))
        compile_s = time.perf_counter() - started
        variants["compiled"] = (compiled, torch.no_grad, cl)

    def rel(a, b) -> float:
        return float((a.double() - b).norm() / b.norm())

    errors = {}
    for name, (model, mode, fmt) in variants.items():
        with mode():
            logits, feats = model(x.contiguous(memory_format=fmt))
        errors[name] = [rel(a, b) for a, b in zip([logits, *feats], [truth[0], *truth[1]])]

    def forward(model, mode, fmt):
        def go():
            with mode():
                model(x.contiguous(memory_format=fmt))
        return go

    run = Interleaved({n: forward(*v) for n, v in variants.items()}, args.iters, args.warmup)
    stats = {n: summary(t) for n, t in run.times.items()}
    base = stats["no_grad"]["median"]
    result = {"config": vars(args), "ms": stats, "ms_all": run.times, "foreign_cores_all": run.foreign,
              "speedup_vs_no_grad_median": {n: base / s["median"] for n, s in stats.items()},
              "relative_error_vs_float64": errors, "compile_s": compile_s,
              "load_avg_start": run.load_start, "load_avg_end": run.load_end}
    print(f"teacher {args.teacher} forward, batch {args.batch}, {args.threads} threads, "
          f"{args.iters} iterations after {args.warmup} warm-up, interleaved")
    for n, s in stats.items():
        worst = max(errors[n])
        print(f"  {n:15s} {fmt_summary(s)}  x{base / s['median']:.3f} vs no_grad; "
              f"worst relative error vs float64 {worst:.1e}")
    if compile_s is not None:
        print(f"  compile (first call): {compile_s:.1f} s")
    print(f"  {run.load_line()}")
    print(f"  saved {save_result('teacher_forward', result)}")


if __name__ == "__main__":
    main()
