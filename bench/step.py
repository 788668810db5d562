"""One training iteration, exactly as the trainer runs it, on random CIFAR-sized data.

    python bench/step.py --teacher resnet32x4 --student resnet8x4 --method semckd --batch 64
    python bench/step.py ... --dtype bfloat16 --channels-last --json
    python bench/step.py ... --reference          # the official code's iteration (bench/reference_semckd.py)

Ours calls ``semckd_ray.train_loop.train_step`` -- the very function every epoch calls: teacher
forward under ``no_grad`` (and bf16 autocast with ``--dtype bfloat16``), ``Distiller`` forward,
backward, SGD step -- with the trainer's optimizer settings (SGD, momentum 0.9, weight decay 5e-4,
one group over student and method). ``--reference`` runs the official ``train_distill`` loop body
on the same initial weights (same seed; SemCKD weights copied by their official names), in
float32 without autocast or channels_last, so the first iteration's losses agree.

Prints ms/iteration min/median/max over ``--iters`` after ``--warmup``, images/s and peak RSS;
``--json`` prints one JSON line instead (what ``bench/compare_step.py`` reads). Peak RSS is the
process's ``ru_maxrss``, so run one configuration per process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import CpuMonitor, load_avg, machine, save_result, summary  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def build(args, device: torch.device):
    """Teacher, distiller, optimizer and a step function for the configuration in ``args``."""
    from semckd_ray.distill import DistillContext, Distiller, create_method
    from semckd_ray.models import create_model
    from semckd_ray.teacher import FrozenTeacher
    from semckd_ray.train_loop import feature_shapes, train_step

    torch.manual_seed(args.seed)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    student = create_model(args.student, num_classes=args.num_classes).to(device, memory_format=memory_format)
    teacher = None
    if args.teacher:
        teacher = create_model(args.teacher, num_classes=args.num_classes).to(device, memory_format=memory_format)
        teacher.eval().requires_grad_(False)
        if not args.reference:  # as the trainer runs it (scaling.teacher_channels_last)
            teacher_format = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format,
                              "student": memory_format}[args.teacher_layout]
            teacher = FrozenTeacher(teacher, teacher_format, feature_format=memory_format, fold=not args.no_fold)
    num_train = 50_000
    ctx = DistillContext(
        student_shapes=feature_shapes(student, device),
        teacher_shapes=feature_shapes(teacher, device) if teacher is not None else (),
        batch_size=args.batch,
        num_classes=args.num_classes,
        num_train=num_train,
        train_labels=torch.randint(0, args.num_classes, (num_train,)),
    )
    method = create_method(args.method, ctx).to(device, memory_format=memory_format)
    distiller = Distiller(student, method, beta=args.beta)
    amp = args.dtype == "bfloat16"

    if args.reference:
        if args.method not in ("semckd", "kd") or amp or args.channels_last or args.compile:
            raise SystemExit("--reference runs the official float32 iteration of method semckd or kd only")
        from bench.reference_semckd import official_iteration, self_attention_like

        self_attention = self_attention_like(method) if args.method == "semckd" else None
        beta = distiller.beta
        del distiller, method  # the reference process holds only what the official code would
        modules = [student] + ([self_attention] if self_attention is not None else [])
        params = [p for m in modules for p in m.parameters()]
        optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
        for m in modules:
            m.train()

        def step(x, y, index):
            return {"total": official_iteration(student, teacher, self_attention, optimizer, x, y, beta=beta)}
    else:
        optimizer = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        model = torch.compile(distiller) if args.compile else distiller
        model.train()
        needs_index = method.needs_index

        def step(x, y, index):
            _, losses = train_step(model, teacher, optimizer, x, y, index if needs_index else None, device, amp)
            return {k: float(v.detach()) for k, v in losses.items()}

    return step


def batch(args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random CIFAR-sized batch every iteration of the configuration in ``args`` trains on."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device, memory_format=memory_format)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=gen).to(device)
    index = torch.randint(0, 50_000, (args.batch,), generator=gen).to(device)
    return x, y, index


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    step = build(args, device)
    rss_after_build = peak_rss_mb()
    x, y, index = batch(args, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, cpu_times, foreign, first_losses = [], [], [], None
    for it in range(args.warmup + args.iters):
        sync()
        monitor = CpuMonitor().start()
        cpu_started = time.process_time()
        started = time.perf_counter()
        losses = step(x, y, index)
        sync()
        elapsed = time.perf_counter() - started
        if first_losses is None:
            first_losses = losses
        if it >= args.warmup:
            times.append(elapsed * 1e3)
            cpu_times.append((time.process_time() - cpu_started) * 1e3)
            foreign.append(monitor.stop().get("foreign_cores", float("nan")))
    ms = summary(times)
    result = {
        "config": {k: getattr(args, k) for k in ("teacher", "student", "method", "batch", "dtype", "channels_last",
                                                  "compile", "teacher_layout", "no_fold", "reference",
                                                  "iters", "warmup", "threads", "device", "seed")},
        "ms_per_iter": ms,
        "ms_per_iter_median": ms["median"],
        "images_per_s": args.batch * 1e3 / ms["median"],
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_before_first_step_mb": rss_after_build,
        "ms_all": times,
        # CPU time of this process (all threads): with --threads 1 a load-robust measure of work done
        "cpu_ms_all": cpu_times,
        "cpu_ms_per_iter": summary(cpu_times),
        "foreign_cores_all": foreign,  # cores other processes kept busy during each timed iteration
        "first_losses": first_losses,
        "load_avg_end": load_avg(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet32x4", help="teacher model ('' for none, method vanilla)")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--method", default="semckd")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--beta", type=float, default=None, help="weight of the method's loss (default: the method's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16 = bf16 autocast, as scaling.bf16 in the trainer")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the distiller, as scaling.compile")
    p.add_argument("--teacher-layout", choices=("channels_last", "contiguous", "student"), default="channels_last",
                   help="the frozen teacher's memory layout (trainer default: channels_last; "
                        "student = the student's layout, the trainer before teacher_channels_last)")
    p.add_argument("--no-fold", action="store_true",
                   help="keep the teacher's BatchNorm apart from its convolutions (the trainer folds them)")
    p.add_argument("--reference", action="store_true", help="the official code's iteration instead of ours")
    p.add_argument("--iters", type=int, default=16)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line (and save no file)")
    return p


def main() -> None:
    args = parser().parse_args()
    load_start = load_avg()
    result = run(args)
    result["load_avg_start"] = load_start
    if args.json:
        import json

        print(json.dumps({**result, "machine": machine()}))
        return
    c = result["config"]
    who = "reference (official code)" if args.reference else "ours"
    print(f"{who}: {c['teacher']} -> {c['student']} {c['method']} batch {c['batch']} {c['dtype']}"
          f"{' channels_last' if c['channels_last'] else ''}{' compile' if c['compile'] else ''}")
    ms = result["ms_per_iter"]
    print(f"  {ms['median']:.1f} ms/iter (min {ms['min']:.1f}, max {ms['max']:.1f}, n={ms['n']}), "
          f"{result['images_per_s']:.1f} img/s, peak RSS {result['peak_rss_mb']:.0f} MB, "
          f"first loss {result['first_losses']['total']:.6g}, load avg {load_start} -> {result['load_avg_end']}, "
          f"other processes' cores per iteration {result['foreign_cores_all']}")
    print(f"  saved {save_result('step', result)}")


if __name__ == "__main__":
    main()
