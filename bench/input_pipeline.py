"""Input pipeline throughput: ours vs a torchvision DataLoader with per-image PIL transforms.

    python bench/input_pipeline.py [--images 50000] [--batch 64] [--repeats 3] [--device cpu|cuda]

Both produce the paper's training batches from 50k random CIFAR-sized uint8 images:
RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize (CIFAR-100 mean/std), batch 64,
shuffled. The baseline is the official code's loader (``dataset/cifar100.py``): a torchvision
``DataLoader`` over a PIL dataset with ``--workers`` worker processes (2, one per core here; the
official default is 8). Ours is ``semckd_ray.data.BatchLoader`` in the main process, once per
torch thread count in ``--threads`` (it runs on the training process's threads; on a loaded
machine two OpenMP threads can be far slower than one, because every parallel op waits for
the thread that lost its core). Each figure is images/s over one full epoch, min/median/max over
``--repeats`` epochs after one warm-up epoch; the two are measured alternately.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import CpuMonitor, load_avg, save_result, summary  # noqa: E402

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


class PILDataset(torch.utils.data.Dataset):
    """The official CIFAR-100 training dataset's per-image path: HWC uint8 -> PIL -> transforms."""

    def __init__(self, images_hwc, labels):
        import torchvision.transforms as T

        self.images, self.labels = images_hwc, labels
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, k):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[k])), int(self.labels[k])


def epoch_rate(loader, sync) -> tuple[float, dict]:
    monitor = CpuMonitor().start()
    started = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch[1])
    sync()
    seconds = time.perf_counter() - started
    return n / seconds, monitor.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the PIL baseline")
    p.add_argument("--threads", default="1,2", help="torch thread counts to run our loader with")
    p.add_argument("--device", default="cpu", help="where our pipeline augments (cuda: data kept on the GPU)")
    p.add_argument("--skip-pil", action="store_true", help="measure ours only")
    args = p.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]

    from semckd_ray.data import BatchLoader, Split

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 100, (args.images,), generator=gen)
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    ours = BatchLoader(Split(images, labels), MEAN, STD, args.batch, augment=True, shuffle=True, device=device,
                       keep_on_device=device.type == "cuda")
    pil = None
    if not args.skip_pil:
        dataset = PILDataset(images.permute(0, 2, 3, 1).contiguous().numpy(), labels.numpy())
        pil = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                          persistent_workers=args.workers > 0)

    load_start = load_avg()
    runs = [(f"ours_{t}thread", t, ours) for t in thread_counts]
    runs += [("pil_dataloader", 1, pil)] if pil is not None else []
    rates: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    # For the PIL loader this includes its own worker processes (they are not waited for).
    foreign: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for epoch in range(args.repeats + 1):  # epoch 0 warms up (worker start-up, first allocations)
        ours.set_epoch(epoch)
        for name, threads, loader in runs:
            torch.set_num_threads(threads)
            rate, load = epoch_rate(loader, sync)
            if epoch > 0:
                rates[name].append(rate)
                foreign[name].append(load.get("foreign_cores", float("nan")))
            print(f"  epoch {epoch} {name}: {rate:,.0f} img/s (other processes' cores {load.get('foreign_cores')})",
                  flush=True)

    stats = {n: summary(r) for n, r in rates.items() if r}
    result = {"config": vars(args), "images_per_s": stats, "images_per_s_all": rates,
              "foreign_cores_all": foreign, "load_avg_start": load_start, "load_avg_end": load_avg()}
    print(f"input pipeline, {args.images} images, batch {args.batch}, device {args.device}")
    for n, s in stats.items():
        print(f"  {n:15s} {s['median']:,.0f} img/s (min {s['min']:,.0f}, max {s['max']:,.0f}, n={s['n']})")
    if "pil_dataloader" in stats:
        ratios = {n: stats[n]["median"] / stats["pil_dataloader"]["median"] for n in stats if n.startswith("ours")}
        result["speedup_median"] = ratios
        print("  ours / PIL DataLoader (medians): " + ", ".join(f"{n} {r:.1f}x" for n, r in ratios.items()))
    print(f"  load avg {load_start} -> {result['load_avg_end']}")
    print(f"  saved {save_result('input_pipeline', result)}")


if __name__ == "__main__":
    main()
