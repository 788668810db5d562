"""What each dataset is, without reading it: the names ``data.dataset`` takes and their sizes.

The one table of datasets. ``semckd_ray.data.datasets`` loads what it lists, and the config is
validated against it without importing torch or torchvision (this module imports neither).
"""

from __future__ import annotations

from dataclasses import dataclass

from semckd_ray.errors import UserError

__all__ = ["DatasetInfo", "DATASETS", "dataset_info", "list_datasets", "num_classes", "needs_files",
           "check_val_size", "train_images"]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str  # how messages name it
    num_classes: int
    train_size: int  # images in the official training split (before the val split is held out)
    # The val split when ``data.val_size`` is not given: ``val_images`` images, or else
    # ``val_fraction`` of the training images.
    val_images: int | None = None
    val_fraction: float | None = None
    # Read from ``data.root`` in the layout of the official CIFAR python archive; False: bundled
    # with a library (scikit-learn's digits).
    cifar_files: bool = False

    def __post_init__(self):
        if (self.val_images is None) == (self.val_fraction is None):
            raise ValueError(f"dataset {self.name!r}: give one of val_images and val_fraction")

    def default_val_size(self, train_size: int) -> int:
        """The size of the val split held out of ``train_size`` training images by default."""
        if self.val_images is not None:
            return self.val_images
        return round(self.val_fraction * train_size)


DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (
    DatasetInfo("cifar100", "CIFAR-100", num_classes=100, train_size=50000, val_images=5000, cifar_files=True),
    DatasetInfo("cifar10", "CIFAR-10", num_classes=10, train_size=50000, val_images=5000, cifar_files=True),
    DatasetInfo("digits", "digits", num_classes=10, train_size=1437, val_fraction=0.1),
)}


def list_datasets() -> list[str]:
    """Names ``load_dataset`` accepts."""
    return sorted(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    info = DATASETS.get(name)
    if info is None:
        raise UserError(f"unknown dataset {name!r}; valid datasets: {', '.join(list_datasets())}")
    return info


def num_classes(name: str) -> int:
    """The number of classes of dataset ``name``, without reading any file."""
    return dataset_info(name).num_classes


def needs_files(name: str) -> bool:
    """Whether dataset ``name`` is read from ``data.root`` (digits comes with scikit-learn)."""
    return dataset_info(name).cifar_files


def check_val_size(name: str, val_size: int | None, train_size: int | None = None) -> None:
    """Refuse a ``data.val_size`` that leaves no training image: of the official split, without reading
    it, or of ``train_size`` images (loading checks it again against the files at hand)."""
    if train_size is None:
        train_size = dataset_info(name).train_size
    if val_size is None:
        return
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size < train_size:
        raise UserError(f"data.val_size must be an integer in [0, {train_size}) for {name}, got {val_size!r}")


def train_images(name: str, val_size: int | None) -> int:
    """Images of the official training split left for training once ``val_size`` (None: the default)
    are held out for validation."""
    info = dataset_info(name)
    val = info.default_val_size(info.train_size) if val_size is None else val_size
    return info.train_size - val
