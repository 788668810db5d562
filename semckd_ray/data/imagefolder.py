"""A class-per-folder image tree (ImageNet's layout), streamed through Ray Data instead of held in memory.

The paper's ImageNet run (ResNet-34 -> ResNet-18 at 224 px) reads 1.28M JPEGs, 150 GB once decoded:
no machine holds that, so unlike the in-memory datasets (``semckd_ray.data.datasets``) only the
file list lives on the driver, and the pixels are decoded and augmented by Ray Data tasks on any
node of the cluster, streamed to the training workers as uint8 (a quarter of float32's bytes on
the network) and normalised on the training device.

Layout: ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` (``.JPEG``, ``.jpg``, ``.png``, any
case). Classes are the sorted folder names of ``train/`` (torchvision's ``ImageFolder``). The test
split is ``val/`` (ImageNet's labelled val set, what papers report); the val split (model selection)
is held out of ``train/`` with the split seed, and ``train_fraction`` / ``label_noise`` act on the
training split exactly as for the in-memory datasets.

Three decisions shape the pipeline:

* Shuffling: the training split's (path, label, index) table -- not its pixels -- is shuffled by
  Ray Data every time the dataset is executed, i.e. every epoch, with
  ``RandomSeedConfig(seed, reseed_after_execution=True)``: Ray Data seeds each execution from
  (seed, the number of executions before it), so epochs get different orders and the sequence of
  orders is the same in every run with the same seed (a plain integer seed would replay one order
  every epoch). It is not a bit-for-bit replay: which rows go to which worker depends on task
  timing (``streaming_split``), and the count starts again whenever Ray Train builds the shards
  anew (a resumed or restarted run), which then repeats the first epochs' orders unless it is
  given another seed. Augmentation draws come from (seed, the indices of the decode batch), which
  change whenever the order does.
* Corrupt files: a file that cannot be decoded must neither stop a 90-epoch run nor vanish
  silently. Its row is replaced by another decoded sample of the same decode batch, so every
  worker still takes the same number of steps of a fixed batch size (DDP, SemCKD), and its
  ``bad_path`` column names the file, which ``StreamLoader.skipped_last_epoch`` reports; the
  decode task logs a warning too. A decode batch with no decodable file at all is an error.
* Decoding: ``torchvision.io.decode_image`` (libjpeg-turbo, CMYK and grayscale to RGB, PNG too)
  and torchvision's tensor transforms: 1.3x PIL's images/s per core (``bench/imagenet_ingest.py``).
  torchvision 0.29 (pinned) deprecates its decoders in favour of TorchCodec; ``_read_rgb`` is the
  one place to change.

Sharding: training shards are Ray Train's default ``streaming_split(n, equal=True)`` (equal row
counts, fewer than n rows dropped: DDP needs equal steps); ``data_config`` splits val and test with
``equal=False``, so that every sample is evaluated exactly once across workers.

Nothing here imports Ray until it is used.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from semckd_ray.data.catalog import check_label_noise, check_train_fraction, check_val_size
from semckd_ray.data.datasets import TrainRecord, _hold_out, stratified_fraction, symmetric_label_noise
from semckd_ray.data.pipeline import normalisation
from semckd_ray.errors import UserError

if TYPE_CHECKING:
    import ray.data
    import ray.train

__all__ = ["FileSplit", "FolderSplits", "StreamLoader", "IMG_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD",
           "EVAL_SPLITS", "build_datasets", "check_image_folder", "data_config", "default_val_size",
           "folder_num_classes", "list_image_folder", "shard_samples"]

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png")  # compared in lower case, as torchvision's IMG_EXTENSIONS
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_SPLITS = ("val", "test")  # evaluated exactly once per sample; every other split is for training

# The val split by default: this many images, or this share of the training images if that is less.
DEFAULT_VAL_IMAGES = 10_000
DEFAULT_VAL_FRACTION = 0.1

DECODE_BATCH = 64  # images a decode task handles at a time (and the scope of a corrupt file's replacement)
# Rows per Ray Data decode task: ~2 s of one core at 224 px, so that Ray Data's cost per task (~80 ms
# on a 2-core machine: 64-row tasks ran 30% slower) stays near 5%, while an epoch of ImageNet is
# still 1250 tasks to balance over the cluster (bench/README.md, "ImageNet ingest").
_ROWS_PER_TASK = 1024
# A random shuffle moves every block's rows into every output block (blocks^2 objects), so the path
# table is shuffled in a few large blocks and cut into task-sized blocks after.
_ROWS_PER_SHUFFLE_BLOCK = 20_000
_MAX_SHUFFLE_BLOCKS = 64

_LAYOUT = ("expected a class-per-folder image tree in ImageNet's layout: <root>/train/<class>/*.JPEG and "
           "<root>/val/<class>/*.JPEG (one folder per class, the classes of val/ among those of train/; "
           ".JPEG, .jpg or .png files). For ImageNet, extract ILSVRC2012_img_train.tar and its per-class "
           "tars into train/, and sort the official ILSVRC2012_img_val.tar, whose images are not in class "
           "folders, into val/<class>/ (e.g. with the well-known valprep.sh)")


# ---------------------------------------------------------------------------------------------
# Listing: the driver reads directory entries only, never a pixel.


@dataclass(frozen=True, eq=False)  # numpy arrays have no truth value to compare by
class FileSplit:
    """One split: ``paths`` (absolute) and their ``labels`` int64 [N]; a sample's index is its position."""

    paths: tuple[str, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True, eq=False)
class FolderSplits:
    """An image tree ready to stream: its splits, classes and what normalises them.

    ``record``: how the training split was drawn from ``train/`` (``TrainRecord``; its ``index``
    refers to ``train/`` listed class by class in sorted order, each class's files sorted by name).
    """

    root: str
    classes: tuple[str, ...]
    train: FileSplit
    val: FileSplit
    test: FileSplit
    record: TrainRecord | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def default_val_size(train_images: int) -> int:
    """The images held out of ``train_images`` for the val split when ``val_size`` is not given."""
    return min(DEFAULT_VAL_IMAGES, round(DEFAULT_VAL_FRACTION * train_images))


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMG_EXTENSIONS


def _subfolders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def _images_in(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if e.is_file() and _is_image(e.name))


def _split_folder(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise UserError(f"data.root {root}: no such folder; {_LAYOUT}")
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"{root}: no {split}/ folder; {_LAYOUT}")
    return folder


def _train_classes(root: Path) -> list[str]:
    classes = _subfolders(_split_folder(root, "train"))
    if not classes:
        raise UserError(f"{root / 'train'}: no class folders; {_LAYOUT}")
    return classes


def _scan(root: Path) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(classes, training files per class, val files per class), each sorted; the layout's errors raised."""
    classes = _train_classes(root)
    train = [_images_in(root / "train" / c) for c in classes]
    empty = [c for c, files in zip(classes, train) if not files]
    if empty:
        raise UserError(f"{root / 'train'}: no image file in the class folder(s) {', '.join(empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''}; every class needs training images. {_LAYOUT}")
    val_dir = _split_folder(root, "val")
    val_classes = _subfolders(val_dir)
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise UserError(f"{val_dir}: class folder(s) {', '.join(unknown[:5])} not in {root / 'train'}; "
                        f"val/ must use the class folder names of train/. {_LAYOUT}")
    loose = _images_in(val_dir)
    if loose:
        raise UserError(f"{val_dir}: {len(loose)} image files lie directly in val/ (e.g. {os.path.basename(loose[0])}), "
                        f"not in class folders. {_LAYOUT}")
    present = set(val_classes)
    val = [_images_in(val_dir / c) if c in present else [] for c in classes]
    if not any(val):
        raise UserError(f"{val_dir}: no image file in any class folder; {_LAYOUT}")
    return classes, train, val


def check_image_folder(root: str | os.PathLike[str]) -> None:
    """Raise the ``UserError`` that listing ``root`` would raise, without decoding any image."""
    _scan(Path(root).expanduser().resolve())


def folder_num_classes(root: str | os.PathLike[str]) -> int:
    """The number of classes of the tree at ``root``: its folders under ``train/``."""
    return len(_train_classes(Path(root).expanduser().resolve()))


def _flatten(files: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(paths as an object array, labels int64) of per-class file lists."""
    paths = np.array([p for class_files in files for p in class_files], dtype=object)
    labels = np.repeat(np.arange(len(files), dtype=np.int64), [len(f) for f in files])
    return paths, labels


def list_image_folder(root: str | os.PathLike[str], *, val_size: int | None, split_seed: int,
                      train_fraction: float = 1.0, label_noise: float = 0.0) -> FolderSplits:
    """List the tree at ``root`` into train / val / test splits of file paths (no image is read).

    ``val_size`` images of ``train/`` (None: ``default_val_size``; 0: none) are held out into the
    val split, chosen by ``split_seed``; the test split is ``val/``. Of the images left for training,
    ``train_fraction`` of each class is kept and then ``label_noise`` of the labels redrawn, both
    drawn with ``split_seed``, as ``load_dataset`` does for the in-memory datasets.
    """
    check_train_fraction(train_fraction)
    check_label_noise(label_noise)
    root = Path(root).expanduser().resolve()
    classes, train_files, val_files = _scan(root)
    paths, labels = _flatten(train_files)
    if val_size is None:
        val_size = default_val_size(len(paths))
    check_val_size(str(root), val_size, len(paths))
    train_index, val_index = _hold_out(len(paths), val_size, split_seed)
    all_labels = torch.from_numpy(labels)
    available = torch.bincount(all_labels[train_index], minlength=len(classes))
    train_index = train_index[stratified_fraction(all_labels[train_index], train_fraction, len(classes), split_seed)]
    clean = all_labels[train_index]
    noisy, redrawn = symmetric_label_noise(clean, label_noise, len(classes), split_seed)
    record = TrainRecord(float(train_fraction), float(label_noise), train_index, clean, redrawn, available)
    test_paths, test_labels = _flatten(val_files)
    splits = FolderSplits(
        str(root), tuple(classes),
        train=FileSplit(tuple(paths[train_index.numpy()]), noisy.numpy()),
        val=FileSplit(tuple(paths[val_index.numpy()]), labels[val_index.numpy()]),
        test=FileSplit(tuple(test_paths), test_labels),
        record=record,
    )
    log.info("%s: %d classes, %d train / %d val / %d test images", root, len(classes), len(splits.train),
             len(splits.val), len(splits.test))
    return splits


# ---------------------------------------------------------------------------------------------
# Decoding, in Ray Data tasks


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], rng: np.random.Generator,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) as ``torchvision.transforms.RandomResizedCrop.get_params`` draws them, from ``rng``.

    Ten tries at an area in ``scale`` of the image's and a log-uniform aspect ratio in ``ratio``;
    if none fits, the largest central crop whose aspect ratio lies in ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _read_rgb(path: str) -> Tensor:
    """The image at ``path`` as uint8 [3, H, W] RGB (grayscale, CMYK and palette images converted)."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    return decode_image(read_file(path), mode=ImageReadMode.RGB)


@dataclass(frozen=True)
class _Decode:
    """The ``map_batches`` function: a batch of (path, label, index) rows -> decoded, transformed rows.

    Training: ``RandomResizedCrop(image_size, scale=crop_scale)`` + horizontal flip; evaluation:
    ``Resize(eval_resize)`` + ``CenterCrop(image_size)``; bilinear with antialiasing, as torchvision.
    Output columns: ``image`` uint8 [B, 3, S, S], ``label``, ``index``, ``bad_path``.
    """

    image_size: int
    eval_resize: int
    crop_scale: tuple[float, float] | None  # None: the evaluation transform
    seed: int

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths, labels, index = batch["path"], batch["label"].copy(), batch["index"].copy()
        rng = np.random.default_rng([self.seed, *index.tolist()]) if self.crop_scale is not None else None
        images: list[Tensor | None] = [self._decode(path, rng) for path in paths]
        good = [k for k, image in enumerate(images) if image is not None]
        if not good:
            raise UserError(f"none of the {len(paths)} images of a decode batch could be decoded: "
                            f"{', '.join(map(str, paths))}; delete or replace these files")
        bad_path = np.full(len(paths), "", dtype=object)
        for k in (k for k, image in enumerate(images) if image is None):
            source = good[bisect.bisect(good, k) % len(good)]  # the next decoded row, cyclically
            images[k], labels[k], index[k], bad_path[k] = images[source], labels[source], index[source], paths[k]
            log.warning("%s: replaced in its batch by %s", paths[k], paths[source])
        return {"image": torch.stack(images).numpy(), "label": labels, "index": index, "bad_path": bad_path}

    def _decode(self, path: str, rng: np.random.Generator | None) -> Tensor | None:
        try:
            image = _read_rgb(path)
        except Exception as exc:  # torchvision raises RuntimeError for corrupt data, OSError for unreadable files
            log.warning("%s: cannot be decoded (%s: %s)", path, type(exc).__name__, exc)
            return None
        return self._transform(image, rng)

    def _transform(self, image: Tensor, rng: np.random.Generator | None) -> Tensor:
        import torchvision.transforms.v2.functional as F

        size = [self.image_size, self.image_size]
        if rng is None:
            return F.center_crop(F.resize(image, [self.eval_resize], antialias=True), size)
        top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], self.crop_scale, rng)
        image = F.resized_crop(image, top, left, h, w, size, antialias=True)
        return F.horizontal_flip(image) if rng.random() < 0.5 else image


def _path_table(split: FileSplit):
    import pandas as pd

    return pd.DataFrame({"path": list(split.paths), "label": split.labels.astype(np.int64),
                         "index": np.arange(len(split), dtype=np.int64)})


def _chunks(table, rows: int) -> list:
    return [table.iloc[start:start + rows] for start in range(0, len(table), rows)]


def _check_transform(image_size: int, crop_scale: tuple[float, float], eval_resize: int, seed: int) -> None:
    if image_size < 1:
        raise UserError(f"image_size must be a positive number of pixels, got {image_size}")
    low, high = crop_scale
    if not 0 < low <= high <= 1:
        raise UserError(f"crop_scale must be (low, high) with 0 < low <= high <= 1 (the share of the image's "
                        f"area a training crop covers; torchvision's default (0.08, 1)), got {crop_scale}")
    if eval_resize < image_size:
        raise UserError(f"eval_resize ({eval_resize}) must be at least image_size ({image_size}): evaluation "
                        f"resizes the shorter side to eval_resize, then crops image_size; ImageNet's convention "
                        f"is round(image_size / 0.875), 256 for 224")
    if seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")


def build_datasets(splits: FolderSplits, *, image_size: int, crop_scale: tuple[float, float], eval_resize: int,
                   seed: int, decode_batch: int = DECODE_BATCH) -> dict[str, "ray.data.Dataset"]:
    """Ray Datasets "train", "val" (omitted when empty) and "test" of ``splits``, for ``TorchTrainer(datasets=...)``.

    Each starts from a small table of (path, label, index) rows built here; decoding and the
    transforms run in Ray Data tasks (one CPU each, on any node), ``decode_batch`` images at a
    time. Rows: ``image`` uint8 [3, S, S] (S = ``image_size``), ``label`` and ``index`` int64,
    ``bad_path`` str ('' or the corrupt file the row replaces). The training split is reshuffled
    every epoch (see the module docstring). A decode task's ``UserError`` reaches the consumer as
    one (Ray Data would wrap it in a ``UserCodeException``).
    """
    import ray.data

    _check_transform(image_size, crop_scale, eval_resize, seed)
    train_table = _path_table(splits.train)
    blocks = min(_MAX_SHUFFLE_BLOCKS, max(1, math.ceil(len(train_table) / _ROWS_PER_SHUFFLE_BLOCK)))
    tables = {"train": (ray.data.from_pandas(_chunks(train_table, math.ceil(len(train_table) / blocks)))
                        .random_shuffle(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
                        .repartition(target_num_rows_per_block=_ROWS_PER_TASK))}
    tables.update({name: ray.data.from_pandas(_chunks(_path_table(getattr(splits, name)), _ROWS_PER_TASK))
                   for name in EVAL_SPLITS if len(getattr(splits, name))})
    datasets = {}
    for name, table in tables.items():
        decode = _Decode(image_size, eval_resize, None if name in EVAL_SPLITS else tuple(crop_scale), seed)
        datasets[name] = table.map_batches(decode, batch_size=decode_batch, batch_format="numpy")
        datasets[name].context.raise_original_map_exception = True
    return datasets


# ---------------------------------------------------------------------------------------------
# Sharding across Ray Train workers


def shard_samples(n: int, world_size: int, rank: int, *, equal: bool) -> int:
    """Samples worker ``rank`` of ``world_size`` reads per epoch of a split of ``n``.

    ``equal`` (training, ``streaming_split(equal=True)``): exactly ``n // world_size``. Otherwise
    (evaluation, ``equal=False``) the even share, ``n // world_size`` plus one for the first
    ``n % world_size`` ranks: ``streaming_split`` hands out whole blocks as they are produced, so
    a worker's actual count varies by up to a block from epoch to epoch (all of them together see
    each sample exactly once).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    return n // world_size + (0 if equal or rank >= n % world_size else 1)


@functools.cache
def _exact_eval_config_class() -> type:
    """``DataConfig`` whose ``EVAL_SPLITS`` are split with ``equal=False`` (defined when Ray is imported)."""
    from ray.train import DataConfig

    class ExactEvalDataConfig(DataConfig):
        """Ray Train's ``DataConfig``, but evaluation splits are not cut to equal shards: each sample once."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            training = {name: ds for name, ds in datasets.items() if name not in EVAL_SPLITS}
            shards = super().configure(training, world_size, worker_handles, worker_node_ids, **kwargs)
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                if name in EVAL_SPLITS:
                    if ds.name is None:
                        ds.set_name(name)
                    ds = ds.copy(ds)
                    ds.context.execution_options = self._resolve_execution_options(name)
                    for worker, split in zip(shards, ds.streaming_split(world_size, equal=False,
                                                                        locality_hints=hints)):
                        worker[name] = split
            return shards

    return ExactEvalDataConfig


def data_config(decode_cpus: float | None) -> "ray.train.DataConfig":
    """The ``TorchTrainer(dataset_config=...)`` for ``build_datasets``: equal training shards, exact
    evaluation shards, and each dataset's Ray Data execution capped at ``decode_cpus`` CPUs (None:
    Ray Data's default, every CPU the training workers leave free)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    if decode_cpus is not None:
        if not decode_cpus > 0:
            raise UserError(f"the CPUs for decoding images must be a positive number, got {decode_cpus!r}")
        options.resource_limits = options.resource_limits.copy(cpu=decode_cpus)
    return _exact_eval_config_class()(execution_options=options)


# ---------------------------------------------------------------------------------------------
# Worker side


_COLUMN_DTYPES = {"image": torch.uint8, "label": torch.int64, "index": torch.int64}  # what StreamLoader yields


class StreamLoader:
    """Iterates over a worker's shard in batches ``(images, labels, index)``, as ``BatchLoader`` does.

    ``images`` float32 [B, 3, S, S] on ``device``, normalised as (x / 255 - mean) / std there;
    ``labels`` and ``index`` (the sample's position in its split) int64 [B]. Order and augmentation
    are Ray Data's (``build_datasets``); ``set_epoch`` only records the epoch.

    ``num_samples``: the rows this worker reads per epoch (``shard_samples``), which ``len()`` (batches
    per epoch) counts from; for an evaluation shard it is nominal (see ``shard_samples``).

    After each epoch, ``skipped_last_epoch`` names the files that could not be decoded and were
    replaced by other samples of their decode batch.

    On CUDA each batch is copied from pinned memory with non-blocking copies. ``channels_last`` sets
    the images' memory format, after normalising (per-channel broadcasts over NHWC are slow on a CPU).
    """

    def __init__(
        self,
        shard: "ray.data.DataIterator",
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        *,
        num_samples: int,
        drop_last: bool,
        device: torch.device | str,
        channels_last: bool = False,
        prefetch_batches: int = 2,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.shard = shard
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.prefetch_batches = prefetch_batches
        self.epoch = 0
        self.skipped_last_epoch: list[str] = []
        self._pin = self.device.type == "cuda"
        self._scale, self._shift = normalisation(mean, std, self.device)

    @property
    def dataset_size(self) -> int:
        """The samples this worker reads per epoch: a streamed shard knows no other size."""
        return self.num_samples

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch (Ray Data reshuffles the training split on every pass by itself)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        skipped: list[str] = []
        try:
            for batch in self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy",
                                                 drop_last=self.drop_last, prefetch_batches=self.prefetch_batches):
                skipped.extend(path for path in batch["bad_path"] if path)
                yield self._to_device(batch)
        finally:
            self.skipped_last_epoch = skipped

    def _to_device(self, batch: dict[str, np.ndarray]) -> tuple[Tensor, Tensor, Tensor]:
        images, labels, index = (t.to(self.device, non_blocking=self._pin) for t in self._host_tensors(batch))
        images = images.float().mul_(self._scale).add_(self._shift)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels, index

    def _host_tensors(self, batch: dict[str, np.ndarray]) -> list[Tensor]:
        """The batch's columns as CPU tensors, pinned for CUDA: copies, for Ray's arrays may be
        read-only views of its object store, which torch must not wrap."""
        tensors = []
        for key, dtype in _COLUMN_DTYPES.items():
            tensor = torch.empty(batch[key].shape, dtype=dtype, pin_memory=self._pin)
            tensor.numpy()[...] = batch[key]
            tensors.append(tensor)
        return tensors
