"""What each dataset is, without reading it: the names ``data.dataset`` takes and their sizes.

The one table of datasets. ``semckd_ray.data.datasets`` loads what it lists, and the config is
validated against it without importing torch or torchvision (this module imports neither).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from semckd_ray.errors import UserError

__all__ = ["DatasetInfo", "DATASETS", "dataset_info", "list_datasets", "num_classes", "needs_files", "is_streamed",
           "IN_MEMORY_IMAGE_SIZE", "STREAMED_IMAGE_SIZE",
           "check_val_size", "train_images", "check_train_fraction", "check_label_noise", "kept_per_class",
           "fewest_train_images"]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str  # how messages name it
    num_classes: int  # 0: known only from the files (a folder tree)
    train_size: int  # images in the official training split (before the val split is held out); 0: from the files
    # The val split when ``data.val_size`` is not given: ``val_images`` images, or else
    # ``val_fraction`` of the training images.
    val_images: int | None = None
    val_fraction: float | None = None
    # Read from ``data.root`` in the layout of the official CIFAR python archive.
    cifar_files: bool = False
    # Read from ``data.root`` in a layout of its own (STL-10's binary files, Tiny ImageNet's JPEG tree).
    # Neither: bundled with a library (scikit-learn's digits).
    root_files: bool = False
    # A class-per-folder tree under ``data.root`` (ImageNet's layout), streamed through Ray Data at
    # ``data.image_size`` instead of held in memory (``semckd_ray.data.imagefolder``); its classes and
    # sizes are known once the folders are listed.
    streamed: bool = False

    def __post_init__(self):
        if (self.val_images is None) == (self.val_fraction is None):
            raise ValueError(f"dataset {self.name!r}: give one of val_images and val_fraction")
        if self.cifar_files + self.root_files + self.streamed > 1:
            raise ValueError(f"dataset {self.name!r}: cifar_files, root_files and streamed exclude each other")

    def default_val_size(self, train_size: int) -> int:
        """The size of the val split held out of ``train_size`` training images by default."""
        if self.val_images is not None:
            return self.val_images
        return round(self.val_fraction * train_size)


DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (
    DatasetInfo("cifar100", "CIFAR-100", num_classes=100, train_size=50000, val_images=5000, cifar_files=True),
    DatasetInfo("cifar10", "CIFAR-10", num_classes=10, train_size=50000, val_images=5000, cifar_files=True),
    DatasetInfo("digits", "digits", num_classes=10, train_size=1437, val_fraction=0.1),
    # For the transfer (linear probe) study, resized to 32x32 (semckd_ray.data.datasets). The val
    # split is 10% of the training split (500 / 10000 images); the test split is STL-10's test split
    # (8000) and Tiny ImageNet's official val split (10000: its test split has no labels).
    DatasetInfo("stl10", "STL-10", num_classes=10, train_size=5000, val_fraction=0.1, root_files=True),
    DatasetInfo("tiny_imagenet", "Tiny ImageNet", num_classes=200, train_size=100000, val_fraction=0.1,
                root_files=True),
    # ImageNet (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) or any class-per-folder tree. Our test split
    # is its val/ folder (ImageNet's labelled val set, what papers report); our val split is held out
    # of train/ (imagefolder.default_val_size: 10000 images, at most 10%).
    DatasetInfo("imagefolder", "image folder", num_classes=0, train_size=0, val_images=10000, streamed=True),
)}

# The side of the square images a dataset held in memory gives the models (see DataConfig.image_size).
IN_MEMORY_IMAGE_SIZE = 32
STREAMED_IMAGE_SIZE = 224  # ImageNet's


def list_datasets() -> list[str]:
    """Names ``load_dataset`` accepts."""
    return sorted(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    info = DATASETS.get(name)
    if info is None:
        raise UserError(f"unknown dataset {name!r}; valid datasets: {', '.join(list_datasets())}")
    return info


def num_classes(name: str, root: str | None = None) -> int:
    """The number of classes of dataset ``name``: from the catalog, or for a folder tree by listing the
    class folders of ``root`` (no image is read)."""
    info = dataset_info(name)
    if not info.streamed:
        return info.num_classes
    if root is None:
        raise ValueError(f"dataset {name!r} counts its classes from its folders: give root")
    from semckd_ray.data.imagefolder import folder_num_classes

    return folder_num_classes(root)


def is_streamed(name: str) -> bool:
    """Whether dataset ``name`` is a folder tree streamed through Ray Data (not held in memory)."""
    return dataset_info(name).streamed


def needs_files(name: str) -> bool:
    """Whether dataset ``name`` is read from ``data.root`` (digits comes with scikit-learn)."""
    info = dataset_info(name)
    return info.cifar_files or info.root_files or info.streamed


def check_val_size(name: str, val_size: int | None, train_size: int | None = None) -> None:
    """Refuse a ``data.val_size`` that leaves no training image: of the official split, without reading
    it, or of ``train_size`` images (loading checks it again against the files at hand)."""
    if train_size is None:
        train_size = dataset_info(name).train_size
    if val_size is None:
        return
    if not train_size:  # a folder tree before it is listed: any count, checked against the files later
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise UserError(f"data.val_size must be an integer >= 0 for {name}, got {val_size!r}")
        return
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size < train_size:
        raise UserError(f"data.val_size must be an integer in [0, {train_size}) for {name}, got {val_size!r}")


def train_images(name: str, val_size: int | None) -> int:
    """Images of the official training split left for training once ``val_size`` (None: the default)
    are held out for validation."""
    info = dataset_info(name)
    val = info.default_val_size(info.train_size) if val_size is None else val_size
    return info.train_size - val


def check_train_fraction(fraction: float) -> None:
    """``data.train_fraction``: the share of each class's training images kept, in (0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise UserError(f"data.train_fraction must be a number in (0, 1] (the share of each class's training "
                        f"images kept; 1: all of them), got {fraction!r}")


def check_label_noise(rate: float) -> None:
    """``data.label_noise``: the share of the training labels redrawn at random, in [0, 1)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise UserError(f"data.label_noise must be a number in [0, 1) (the share of the training labels "
                        f"redrawn at random; 0: clean labels), got {rate!r}")


def kept_per_class(fraction: float, images: int) -> int:
    """How many of a class's ``images`` training images ``data.train_fraction`` keeps: round(f * n),
    at least 1 (of a class that has any), all of them at f = 1. ``round`` is Python's (half to even)."""
    if images == 0:
        return 0
    return images if fraction >= 1 else max(1, round(fraction * images))


def fewest_train_images(name: str, val_size: int | None, fraction: float = 1.0) -> int | None:
    """The fewest training images ``data.train_fraction`` can leave, without reading the dataset.

    Exact at fraction 1. Below, the val split is drawn at random, so how many images of each class
    it leaves is unknown until the files are read; each class keeps round(f * n_c) >= f * n_c - 1/2
    images and at least 1, so the split holds at least max(C, ceil(f * N - C / 2)) of them (C classes,
    N images once the val split is held out; a class is assumed to keep at least one image after the
    val split, as every class of every dataset does at its default val split).

    None for a folder tree, whose size is known once it is listed.
    """
    if is_streamed(name):
        return None
    images = train_images(name, val_size)
    if fraction >= 1:
        return images
    classes = min(num_classes(name), images)
    return max(classes, math.ceil(fraction * images - classes / 2))
