"""CRD's step at ImageNet's size: time and peak memory of the dense path against the sampled one.

    python bench/crd_scale.py --path sampled|dense [--num-train 1281167 --batch 32 --nce-k 16384 --iters 5]

One path per process: memory a path freed stays in the allocator's cache and would hide the other's.

One forward + backward of the CRD module alone (embeddings, negatives, NCE loss, memory update) on
random pooled features, for ResNet-34 -> ResNet-18 (512-d each) at the official per-GPU batch of 32.
``dense``: the CIFAR path (one [B, N] key draw and one [B, N] score product against a copy of the
whole memory, which every step copies: O(N) per step); ``sampled``: the path CRD takes above
``_DENSE_MAX_ELEMENTS`` (class-sorted sampler, gathered rows: O(B K) per step). Peak memory is the
highest resident set seen during the steps (sampled every millisecond) above the resident set
before them (banks built), so it is what one worker needs on top of its banks.
"""

from __future__ import annotations

import argparse
import threading
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import fmt_summary, save_result, summary  # noqa: E402
from semckd_ray.distill import DistillContext, create_method  # noqa: E402
from semckd_ray.distill import crd as crd_module  # noqa: E402


class _PeakRss:
    """The largest resident set of this process while in the block, sampled every millisecond (MiB)."""

    def __enter__(self):
        import psutil

        self._process, self._done = psutil.Process(), threading.Event()
        self.start = self.peak = self._process.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, self._process.memory_info().rss / 2**20)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def measure(dense: bool, args) -> dict:
    crd_module._DENSE_MAX_ELEMENTS = (1 << 62) if dense else 0
    torch.manual_seed(0)
    labels = torch.randint(0, 1000, (args.num_train,))
    ctx = DistillContext(student_shapes=((512,),), teacher_shapes=((512,),), batch_size=args.batch,
                         num_classes=1000, num_train=args.num_train, train_labels=labels)
    crd = create_method("crd", ctx, {"nce_k": args.nce_k})
    times = []
    with _PeakRss() as rss:
        for step in range(args.iters + 1):
            feat_s = torch.randn(args.batch, 512, requires_grad=True)
            out_s, out_t = (None, [feat_s]), (None, [torch.randn(args.batch, 512)])
            index = torch.randint(0, args.num_train, (args.batch,))
            started = time.perf_counter()
            crd(out_s, out_t, None, index)["crd"].backward()
            if step:  # the first step sets the NCE constants
                times.append(time.perf_counter() - started)
    del crd
    return {"path": "dense" if dense else "sampled", "step_s": summary(times),
            "peak_rss_growth_mib": rss.peak - rss.start,
            "bank_mib": crd_module.memory_bank_bytes(args.num_train, 128) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-train", type=int, default=1281167)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--nce-k", type=int, default=16384)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--path", choices=["sampled", "dense"], required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [measure(args.path == "dense", args)]
    for r in results:
        print(f"{r['path']:8s} step {fmt_summary(r['step_s'], unit='s', digits=3)}; peak RSS growth "
              f"{r['peak_rss_growth_mib']:.0f} MiB (banks {r['bank_mib']:.0f} MiB)")
    print("saved", save_result("crd_scale", {"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
