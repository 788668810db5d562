"""Training iterations of several configurations in one process, interleaved iteration by iteration.

    python bench/interleaved_step.py [--iters 10 --warmup 2] [--configs "--reference|(default)|--teacher-layout student --no-fold"]

``bench/compare_step.py`` runs each configuration in its own process (for its own peak RSS), and on
a machine whose speed drifts by 10% between processes that cannot resolve effects of a few percent.
Here every configuration is built by ``bench/step.py``'s ``build`` from its own ``step.py`` options
(``|``-separated; ``(default)`` = no options, the trainer's default), all in this process on the same
initial weights and batch, and iteration ``k`` of every configuration runs back to back, the order
rotated each time. Each iteration's time is divided by the first configuration's time in the same
round; the median of those paired ratios is the speed-up, robust to slow drift of the machine.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import Interleaved, fmt_summary, save_result, summary  # noqa: E402
from bench.step import batch, build, parser  # noqa: E402

DEFAULT = "--reference|(default)|--teacher-layout student --no-fold|--no-fold|--channels-last"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=DEFAULT, help="|-separated bench/step.py options, one set per configuration")
    p.add_argument("--common", default="", help="bench/step.py options for every configuration (models, batch)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    names = [c.strip() for c in args.configs.split("|") if c.strip()]
    steps, inputs = {}, {}
    for name in names:
        opts = parser().parse_args(shlex.split(args.common) + ([] if name == "(default)" else shlex.split(name)))
        steps[name] = build(opts, device)
        inputs[name] = batch(opts, device)

    run = Interleaved({n: functools.partial(steps[n], *inputs[n]) for n in names}, args.iters, args.warmup,
                      rotate=True)
    times, first_losses = run.times, run.first
    base = names[0]
    stats = {n: summary(t) for n, t in times.items()}
    paired = {n: summary([b / t for b, t in zip(times[base], times[n])]) for n in names}
    result = {"config": vars(args), "ms": stats, "ms_all": times, "speedup_vs_first_paired": paired,
              "first_losses": first_losses, "foreign_cores_all": run.foreign,
              "load_avg_start": run.load_start, "load_avg_end": run.load_end, "torch_threads": torch.get_num_threads()}
    print(f"{len(names)} configurations interleaved, {args.iters} iterations each after {args.warmup} warm-up, "
          f"{args.threads} threads; speed-up = median over rounds of ({base!r} time / this time)")
    for n in names:
        print(f"  {n:40s} {fmt_summary(stats[n], digits=0)}  x{paired[n]['median']:.3f} "
              f"(rounds {paired[n]['min']:.3f}-{paired[n]['max']:.3f}); first loss {first_losses[n]['total']:.6g}")
    print(f"  {run.load_line()}")
    print(f"  saved {save_result('interleaved_step', result)}")


if __name__ == "__main__":
    main()
