"""The SemCKD module alone: forward + backward given the features, ours vs the official code.

    python bench/semckd_module.py --teacher resnet32x4 --student resnet8x4 --batch 64

The features are those of the real models on one random batch (student maps require grad, so
the backward includes the path through the student Gram matrices). Variants, timed interleaved
(one iteration of each in turn, so that load on a shared machine hits all alike):

* ``reference``: ``bench/reference_semckd.py`` SelfA + SemCKDLoss, float32;
* ``ours_fp32``: ``semckd_ray``'s module, float32, on the same weights;
* ``ours_bf16``: the same under bf16 autocast, with the features the models give under autocast.

``--channels-last`` hands ours channels_last features (as the trainer does with scaling.channels_last).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import Interleaved, fmt_summary, save_result, summary  # noqa: E402


def features(teacher, student, x, amp: bool, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        feat_t = teacher.to(memory_format=memory_format)(x)[1][1:-1]
        feat_s = student.to(memory_format=memory_format)(x)[1][1:-1]
    return [f.detach() for f in feat_s], [f.detach() for f in feat_t]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--variants", default="reference,ours_fp32,ours_bf16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from bench.reference_semckd import SemCKDLoss, self_attention_like
    from semckd_ray.distill import DistillContext, create_method
    from semckd_ray.models import create_model
    from semckd_ray.train_loop import feature_shapes

    torch.manual_seed(0)
    teacher = create_model(args.teacher, num_classes=100).eval()
    student = create_model(args.student, num_classes=100).train()
    cpu = torch.device("cpu")
    ctx = DistillContext(feature_shapes(student, cpu), feature_shapes(teacher, cpu), args.batch)
    ours = create_method("semckd", ctx).train()
    reference = self_attention_like(ours).train()
    if args.channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    criterion = SemCKDLoss()
    x = torch.randn(args.batch, 3, 32, 32)
    feats32 = features(teacher, student, x, amp=False, channels_last=False)
    feats_ours32 = features(teacher, student, x, amp=False, channels_last=args.channels_last)
    feats_bf16 = features(teacher, student, x, amp=True, channels_last=args.channels_last)

    def run_reference():
        fs = [f.clone().requires_grad_(True) for f in feats32[0]]
        loss = criterion(*reference(fs, feats32[1]))
        reference.zero_grad(set_to_none=True)
        loss.backward()
        return loss.item()

    def run_ours(feats, amp):
        def go():
            fs = [f.clone().requires_grad_(True) for f in feats[0]]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = ours.forward_features(fs, feats[1]).loss
            ours.zero_grad(set_to_none=True)
            loss.backward()
            return loss.item()
        return go

    runners = {"reference": run_reference, "ours_fp32": run_ours(feats_ours32, False),
               "ours_bf16": run_ours(feats_bf16, True)}
    names = [v for v in args.variants.split(",") if v]
    run = Interleaved({n: runners[n] for n in names}, args.iters, args.warmup)
    losses = run.first
    stats = {n: summary(t) for n, t in run.times.items()}
    result = {"config": vars(args), "ms": stats, "ms_all": run.times, "foreign_cores_all": run.foreign,
              "loss": losses, "load_avg_start": run.load_start, "load_avg_end": run.load_end}
    print(f"SemCKD module fwd+bwd, {args.teacher} -> {args.student}, batch {args.batch}, "
          f"{args.threads} threads{', channels_last' if args.channels_last else ''}")
    for n in names:
        print(f"  {n:14s} {fmt_summary(stats[n])}  loss {losses[n]:.7g}")
    if "reference" in stats:
        ratios = {n: stats["reference"]["median"] / stats[n]["median"] for n in names if n != "reference"}
        result["speedup_vs_reference_median"] = ratios
        print("  speed-up vs reference (medians): " + ", ".join(f"{n} {r:.2f}x" for n, r in ratios.items()))
    if "ours_fp32" in losses and "ours_bf16" in losses:
        rel = abs(losses["ours_bf16"] - losses["ours_fp32"]) / abs(losses["ours_fp32"])
        result["bf16_loss_rel_diff"] = rel
        print(f"  bf16 vs fp32 loss: relative difference {rel:.2%}")
    print(f"  {run.load_line()}")
    print(f"  saved {save_result('semckd_module', result)}")


if __name__ == "__main__":
    main()
