"""A class-per-folder image tree (ImageNet's layout), listed on the driver and streamed through Ray Data.

ImageNet's 1.28M JPEGs (140 GB) fit in no worker's memory, and decoding them is most of the input
cost: here the driver only lists the files (paths and labels, no pixel is read), Ray Data tasks on
any node's CPUs decode and augment them into uint8 batches, and each training worker iterates its
shard (``ray.train.get_dataset_shard``) with batches prefetched, normalising them on its device. uint8
crosses the network and the object store at a quarter of float32's bytes.

Layout: ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` (.JPEG, .jpg, .png, any case).
Classes are the sorted folder names of ``train/`` (torchvision's ``ImageFolder``). Our test split is
``val/`` (ImageNet's labelled val set, what papers report); our val split (model selection) is held
out of ``train/`` by the split seed, as for the datasets held in memory.

Order: the training table of paths is shuffled by Ray Data afresh every epoch, before decoding
(no pixel is shuffled). Which worker gets which image also depends on which decode task finishes
first, so a streamed training is not bit-reproducible, unlike one on a dataset held in memory.

A file that cannot be decoded is replaced in its batch by another image of the batch, and named in
the batch's ``bad_path`` column: one bad file of 1.28M must not end a 90-epoch run, nor shrink a
batch (every worker must take the same steps, and SemCKD's modules are built for one batch size),
nor pass unnoticed (``StreamLoader.skipped_last_epoch``; the training loop logs the count and names
the files). A decode batch without a single readable image is an error naming its files.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from semckd_ray.errors import UserError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "FileSplit", "FolderSplits", "check_image_folder", "folder_num_classes",
           "list_image_folder", "default_val_size", "build_datasets", "data_config", "StreamLoader", "shard_samples",
           "decode_batch"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
DEFAULT_VAL_IMAGES = 10000
LAYOUT = "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG"
_ROWS_PER_BLOCK = 1024  # rows of a block of the path table: the unit Ray Data schedules decoding in
_DECODE_BATCH = 64  # images a decode task turns into one batch


@dataclass(frozen=True)
class FileSplit:
    paths: tuple[str, ...]  # absolute
    labels: np.ndarray  # int64, by position

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class FolderSplits:
    root: Path
    classes: tuple[str, ...]
    train: FileSplit
    val: FileSplit
    test: FileSplit
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _has_image(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.is_file() and _is_image(entry.name) for entry in entries)


def check_image_folder(root: str | os.PathLike) -> None:
    """The ``UserError`` listing would raise for a tree not in the layout, without reading an image.

    One directory scan per class: each class folder of ``train/`` must hold an image, and ``val/``'s
    class folders must be classes of ``train/``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root {root} is not a folder: the image folder dataset is read from {LAYOUT}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            hint = (" (ImageNet's val tarball is flat: sort it into class folders first, e.g. with the widely used "
                    "valprep.sh)" if split == "val" else "")
            raise UserError(f"{root / split} is missing: the image folder dataset is read from {LAYOUT}{hint}")
    classes = _class_folders(root / "train")
    if not classes:
        raise UserError(f"{root / 'train'} has no class folders: the image folder dataset is read from {LAYOUT}")
    empty = [c for c in classes if not _has_image(root / "train" / c)]
    if empty:
        raise UserError(f"{len(empty)} class folder(s) of {root / 'train'} hold no image "
                        f"({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty[:5])}; remove them or add their images")
    unknown = sorted(set(_class_folders(root / "val")) - set(classes))
    if unknown:
        raise UserError(f"{root / 'val'} has class folders that {root / 'train'} has not: {', '.join(unknown[:5])}")


def folder_num_classes(root: str | os.PathLike) -> int:
    """The number of classes of the tree at ``root``: its class folders under ``train/``."""
    check_image_folder(root)
    return len(_class_folders(Path(root).expanduser() / "train"))


def _list_split(folder: Path, classes: Sequence[str]) -> FileSplit:
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        found = sorted(entry.path for entry in os.scandir(class_dir) if entry.is_file() and _is_image(entry.name))
        paths += found
        labels += [label] * len(found)
    return FileSplit(tuple(paths), np.asarray(labels, dtype=np.int64))


def default_val_size(train_images: int) -> int:
    """The images held out of ``train/`` for validation by default: 10000 (ImageNet), at most 10%."""
    return min(DEFAULT_VAL_IMAGES, train_images // 10)


def list_image_folder(root: str | os.PathLike, *, val_size: int | None, split_seed: int, train_fraction: float = 1.0,
                      label_noise: float = 0.0) -> FolderSplits:
    """The tree's splits as file lists: val held out of ``train/`` by ``split_seed``, then ``train_fraction``
    and ``label_noise`` applied to the training split, as ``semckd_ray.data.load_dataset`` does."""
    import torch

    from semckd_ray.data.catalog import check_val_size
    from semckd_ray.data.datasets import _hold_out, stratified_fraction, symmetric_label_noise

    root = Path(root).expanduser().resolve()
    check_image_folder(root)
    classes = tuple(_class_folders(root / "train"))
    official = _list_split(root / "train", classes)
    if val_size is None:
        val_size = default_val_size(len(official))
    check_val_size("imagefolder", val_size, len(official))
    train_index, val_index = _hold_out(len(official), val_size, split_seed)
    labels = torch.from_numpy(official.labels)
    train_index = train_index[stratified_fraction(labels[train_index], train_fraction, len(classes), split_seed)]
    noisy, _ = symmetric_label_noise(labels[train_index], label_noise, len(classes), split_seed)

    def subset(index, split_labels) -> FileSplit:
        return FileSplit(tuple(official.paths[i] for i in index.tolist()), np.asarray(split_labels, dtype=np.int64))

    return FolderSplits(root, classes, subset(train_index, noisy.numpy()),
                        subset(val_index, official.labels[val_index.numpy()]), _list_split(root / "val", classes))


# ---------------------------------------------------------------------------------------------
# Decoding (runs in Ray Data tasks)


def _random_resized_crop_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator
                             ) -> tuple[int, int, int, int]:
    """(left, top, w, h) as torchvision's ``RandomResizedCrop.get_params`` draws it (ratio 3/4 to 4/3)."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    ratio = width / height  # fallback: the largest centred crop within the ratio range
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _train_image(image, size: int, scale: tuple[float, float], rng: np.random.Generator):
    from PIL import Image

    left, top, w, h = _random_resized_crop_box(*image.size, scale, rng)
    image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def _eval_image(image, size: int, resize: int):
    """torchvision's ``Resize(resize)`` (shorter side, bilinear, antialiased as PIL is) + ``CenterCrop(size)``."""
    from PIL import Image

    width, height = image.size
    if width <= height:
        new = (resize, int(resize * height / width))
    else:
        new = (int(resize * width / height), resize)
    image = image.resize(new, Image.BILINEAR)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def decode_batch(batch: dict[str, np.ndarray], *, size: int, train: bool, scale: tuple[float, float],
                 resize: int) -> dict[str, np.ndarray]:
    """Ray Data's map over a batch of the path table: uint8 images [B, 3, size, size], labels, index, bad_path."""
    from PIL import Image

    rng = np.random.default_rng()  # fresh entropy: every epoch and task draws its own crops
    paths = batch["path"]
    images = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    bad = np.full(len(paths), "", dtype=object)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
            image = _train_image(image, size, scale, rng) if train else _eval_image(image, size, resize)
            images[i] = np.asarray(image)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for unreadable or truncated files
            log.warning("cannot decode %s (%s): replaced by another image of its batch", path, exc)
            bad[i] = str(path)
    good = np.flatnonzero(bad == "")
    if len(good) == 0:
        raise UserError(f"none of {len(paths)} images of a batch could be decoded: {', '.join(map(str, paths[:5]))}"
                        f"{' ...' if len(paths) > 5 else ''}; check that these files are images")
    labels, index = batch["label"].astype(np.int64), batch["index"].astype(np.int64)
    for i in np.flatnonzero(bad != ""):
        j = good[i % len(good)]
        images[i], labels[i], index[i] = images[j], labels[j], index[j]
    return {"image": np.ascontiguousarray(images.transpose(0, 3, 1, 2)), "label": labels, "index": index,
            "bad_path": bad}


def _path_table(split: FileSplit):
    """The split's (path, label, index) rows as a Ray Dataset of small blocks (no pixels)."""
    import pandas as pd
    import ray.data

    n = len(split)
    frames = [pd.DataFrame({"path": list(split.paths[start:start + _ROWS_PER_BLOCK]),
                            "label": split.labels[start:start + _ROWS_PER_BLOCK],
                            "index": np.arange(start, min(n, start + _ROWS_PER_BLOCK), dtype=np.int64)})
              for start in range(0, n, _ROWS_PER_BLOCK)]
    return ray.data.from_pandas(frames)


def build_datasets(splits: FolderSplits, *, image_size: int, crop_scale: tuple[float, float], eval_resize: int,
                   seed: int = 0) -> dict[str, Any]:
    """Ray Datasets ``train``, ``val`` (when not empty) and ``test``: paths decoded and transformed by Ray Data.

    ``seed`` is not used for the order, which Ray Data draws afresh each epoch (module docstring).
    """
    del seed
    out = {}
    for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        if len(split) == 0 and name == "val":
            continue
        table = _path_table(split)
        if name == "train":
            table = table.random_shuffle()
        out[name] = table.map_batches(
            decode_batch, batch_size=_DECODE_BATCH, batch_format="numpy",
            fn_kwargs={"size": image_size, "train": name == "train", "scale": tuple(crop_scale),
                       "resize": eval_resize})
    return out


def data_config(decode_cpus: float | None = None):
    """Ray Train's DataConfig for ``build_datasets``: training shards equal in size (each rank the same
    steps), evaluation shards that together hold every image once; ``decode_cpus`` caps Ray Data's CPUs."""
    import ray.train

    class _Config(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for rank, shard in enumerate(ds.streaming_split(world_size, equal=name == "train",
                                                                locality_hints=hints)):
                    output[rank][name] = shard
            return output

    options = ray.train.DataConfig.default_ingest_options()
    if decode_cpus is not None:
        options.resource_limits = options.resource_limits.copy(cpu=decode_cpus)
    return _Config(execution_options=options)


def shard_samples(n: int, world_size: int, rank: int, *, equal: bool) -> int:
    """Images rank ``rank`` reads per epoch: ``n // world_size`` of an equal split; of an unequal one
    (evaluation: dynamic) an even share, for ``len()`` only."""
    if equal:
        return n // world_size
    return n // world_size + (rank < n % world_size)


class StreamLoader:
    """Batches ``(images, labels, index)`` of a worker's shard, as ``semckd_ray.data.BatchLoader`` yields them.

    Images arrive as uint8 and are normalised on ``device`` (``(x / 255 - mean) / std``);
    ``skipped_last_epoch`` names the files of the last pass that could not be decoded.
    """

    def __init__(self, shard, mean: Sequence[float], std: Sequence[float], batch_size: int, *, num_samples: int,
                 drop_last: bool, device, channels_last: bool = False, prefetch_batches: int = 2) -> None:
        import torch

        from semckd_ray.data.pipeline import normalisation

        self.shard, self.batch_size, self.num_samples = shard, batch_size, num_samples
        self.drop_last, self.device, self.channels_last = drop_last, torch.device(device), channels_last
        self.prefetch_batches = prefetch_batches
        self.epoch = 0
        self.skipped_last_epoch: list[str] = []
        self._scale, self._shift = normalisation(mean, std, self.device)

    @property
    def dataset_size(self) -> int:
        return self.num_samples

    def __len__(self) -> int:
        return self.num_samples // self.batch_size if self.drop_last else math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # the order is Ray Data's, drawn afresh each pass

    def __iter__(self) -> Iterator:
        import torch

        self.skipped_last_epoch = []
        pin = self.device.type == "cuda"
        for batch in self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy",
                                             drop_last=self.drop_last, prefetch_batches=self.prefetch_batches):
            self.skipped_last_epoch += [p for p in batch["bad_path"].tolist() if p]
            # Ray hands out read-only views of its object store: copied, so the tensors own writable memory.
            tensors = [torch.from_numpy(np.array(batch[k], copy=True)) for k in ("image", "label", "index")]
            if pin:
                tensors = [t.pin_memory() for t in tensors]
            images, labels, index = (t.to(self.device, non_blocking=pin) for t in tensors)
            images = images.float().mul_(self._scale).add_(self._shift)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels, index
