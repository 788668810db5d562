"""ImageNet-style ingest: training images/s of our Ray Data pipeline vs torchvision ImageFolder + DataLoader.

    python bench/imagenet_ingest.py [--images 2000] [--cpus 2] [--size 224] [--batch 64] [--epochs 3]

Both decode and augment the same JPEG tree for training at ``--size`` px, RandomResizedCrop(size,
scale=(0.08, 1)) + horizontal flip, shuffled, batches of ``--batch``. The tree (``tests/jpeg_tree.py``,
in a temp dir): ``--images`` JPEGs of 350-500 px a side with pixel noise, ~100 kB each, about
ImageNet's average file, some grayscale.

* ``ray_data``: ``semckd_ray.data.imagefolder.build_datasets`` and ``data_config(decode_cpus=--cpus)``,
  the training shard of a one-worker configuration iterated here with ``iter_batches`` (uint8
  [B, 3, S, S]; normalisation happens on the training device and is not measured). A local Ray
  with ``--cpus`` CPUs, started before any timing.
* ``dataloader``: the usual PyTorch recipe, torchvision ``ImageFolder`` (PIL) with
  ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``ToTensor``, ``DataLoader`` with ``--cpus``
  persistent worker processes (float32 batches: ToTensor's conversion is the workers' work).
* ``dataloader_tvio``: the same DataLoader with the pipeline's decoder and tensor transforms
  (uint8 batches), which separates the decoder's gain from Ray Data's own cost.

Each figure is images/s over one full epoch of the tree, after one warm-up epoch each (worker
start-up, imports); the two alternate epoch by epoch; "per core" divides by ``--cpus``. First, the
decoders alone, one image at a time on one thread in this process: PIL (open, RGB, crop-resize,
flip) against ``torchvision.io.decode_image`` with torchvision's tensor transforms -- what chose
the pipeline's decoder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import CpuMonitor, load_avg, save_result, summary  # noqa: E402

SIZES = (350, 500)
NOISE = 60
DECODER_SAMPLE = 200  # images each decoder handles in the single-thread comparison


def pil_decode(path: str, crop) -> np.ndarray:
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(path) as image:
        image = image.convert("RGB")
    return np.asarray(F.horizontal_flip(crop(image)))


def torchvision_io_decode(path: str, crop) -> np.ndarray:
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2 import functional as F

    return F.horizontal_flip(crop(decode_image(read_file(path), mode=ImageReadMode.RGB))).numpy()


def decoder_rates(paths: list[str], size: int) -> dict[str, float]:
    """Images/s of each decoder + RandomResizedCrop + flip, one thread, best of two passes."""
    from torchvision.transforms import v2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray Data task (OMP_NUM_THREADS=1)
    crop = v2.RandomResizedCrop(size, antialias=True)
    rates = {}
    for name, decode in (("pil", pil_decode), ("torchvision_io", torchvision_io_decode)):
        best = 0.0
        for _ in range(2):
            started = time.perf_counter()
            for path in paths:
                decode(path, crop)
            best = max(best, len(paths) / (time.perf_counter() - started))
        rates[name] = best
    torch.set_num_threads(threads)
    return rates


def ray_epoch_runner(root: Path, args):
    """One epoch of the training shard of a one-worker ``data_config``, as a callable returning images."""
    from semckd_ray.data.imagefolder import build_datasets, data_config, list_image_folder

    splits = list_image_folder(root, val_size=0, split_seed=0)
    datasets = build_datasets(splits, image_size=args.size, crop_scale=(0.08, 1.0),
                              eval_resize=round(args.size / 0.875), seed=0)
    shard = data_config(decode_cpus=args.cpus).configure({"train": datasets["train"]}, world_size=1,
                                                         worker_handles=None, worker_node_ids=None)[0]["train"]

    def epoch() -> int:
        n = 0
        for batch in shard.iter_batches(batch_size=args.batch, batch_format="numpy", prefetch_batches=2):
            n += len(batch["label"])
        return n

    return epoch


def read_rgb(path: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    return decode_image(read_file(path), mode=ImageReadMode.RGB)


def dataloader_epoch_runner(root: Path, args, decoder: str):
    """``decoder`` "pil": the usual recipe; "torchvision_io": the same with our pipeline's decoder and
    tensor transforms, uint8 output (the DataLoader's own overhead, next to Ray Data's)."""
    from torchvision import datasets, transforms as T
    from torchvision.transforms import v2

    if decoder == "pil":
        folder = datasets.ImageFolder(str(root / "train"),
                                      T.Compose([T.RandomResizedCrop(args.size), T.RandomHorizontalFlip(), T.ToTensor()]))
    else:
        folder = datasets.ImageFolder(str(root / "train"), v2.Compose([v2.RandomResizedCrop(args.size, antialias=True),
                                                                      v2.RandomHorizontalFlip()]), loader=read_rgb)
    loader = torch.utils.data.DataLoader(folder, batch_size=args.batch, shuffle=True, num_workers=args.cpus,
                                         persistent_workers=True)

    def epoch() -> int:
        return sum(len(labels) for _, labels in loader)

    return epoch


def avx512() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--cpus", type=int, default=2, help="Ray's CPUs for decoding = the DataLoader's worker processes")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs of each, after one warm-up epoch")
    args = p.parse_args()

    import ray

    from jpeg_tree import write_jpeg_tree

    with tempfile.TemporaryDirectory(prefix="imagenet-ingest-") as tmp:
        started = time.perf_counter()
        root = write_jpeg_tree(Path(tmp), classes=args.classes, train_per_class=args.images // args.classes,
                               val_per_class=1, sizes=SIZES, noise=NOISE)
        files = sorted(str(f) for f in (root / "train").rglob("*") if f.is_file())
        mean_kb = np.mean([Path(f).stat().st_size for f in files]) / 1e3
        print(f"wrote {len(files)} images ({mean_kb:.0f} kB on average) in {time.perf_counter() - started:.1f} s",
              flush=True)

        decoders = decoder_rates(files[:DECODER_SAMPLE], args.size)
        print("  decode + RandomResizedCrop + flip, 1 thread: "
              + ", ".join(f"{n} {r:,.0f} img/s" for n, r in decoders.items())
              + f" (torchvision.io / PIL {decoders['torchvision_io'] / decoders['pil']:.2f}x)", flush=True)

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        runners = {"ray_data": ray_epoch_runner(root, args), "dataloader": dataloader_epoch_runner(root, args, "pil"),
                   "dataloader_tvio": dataloader_epoch_runner(root, args, "torchvision_io")}
        load_start = load_avg()
        rates: dict[str, list[float]] = {n: [] for n in runners}
        foreign: dict[str, list[float]] = {n: [] for n in runners}
        for epoch in range(args.epochs + 1):  # epoch 0 warms up
            for name, run in runners.items():
                monitor = CpuMonitor().start()
                started = time.perf_counter()
                images = run()
                rate = images / (time.perf_counter() - started)
                # Busy cores beyond our own: the decoding processes (Ray's or the DataLoader's workers)
                # and other load, which shows as the excess over --cpus.
                load = monitor.stop()
                if epoch > 0:
                    rates[name].append(rate)
                    foreign[name].append(load.get("foreign_cores", float("nan")))
                print(f"  epoch {epoch} {name}: {images} images, {rate:,.0f} img/s", flush=True)
        ray.shutdown()

    stats = {n: summary(r) for n, r in rates.items()}
    result = {"config": vars(args), "jpeg_kb_mean": mean_kb, "avx512": avx512(), "decoder_images_per_s": decoders,
              "images_per_s": stats, "images_per_s_per_core": {n: s["median"] / args.cpus for n, s in stats.items()},
              "images_per_s_all": rates, "foreign_cores_all": foreign, "load_avg_start": load_start,
              "load_avg_end": load_avg()}
    print(f"ingest at {args.size} px, {len(files)} images, {args.cpus} CPUs, batch {args.batch}")
    for n, s in stats.items():
        print(f"  {n:10s} {s['median']:,.0f} img/s (min {s['min']:,.0f}, max {s['max']:,.0f}, n={s['n']}), "
              f"{s['median'] / args.cpus:,.0f} per core")
    print("  ray_data / dataloader (medians): "
          + ", ".join(f"{n} {stats['ray_data']['median'] / stats[n]['median']:.2f}x" for n in stats if n != "ray_data"))
    print(f"  load avg {load_start} -> {result['load_avg_end']}")
    print(f"  saved {save_result('imagenet_ingest', result)}")


if __name__ == "__main__":
    main()
