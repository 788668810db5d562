"""Datasets as uint8 tensors in memory: CIFAR-100, CIFAR-10 and scikit-learn's digits.

A whole CIFAR split is 150 MB as uint8, so every split lives in memory (and, if the input pipeline
is asked to, on the training device); augmentation then runs as batched tensor ops instead of a
per-image PIL pipeline. Each dataset comes as train / val / test splits: the validation split is
held out of the training set with a seed and is the one to select models on; the test split is for
final reporting only. With ``val_size=0`` the val split is empty and callers have nothing to select
on -- they must not fall back to the test split.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from semckd_ray.data.catalog import (
    DATASETS,
    DatasetInfo,
    check_val_size,
    dataset_info,
    list_datasets,
    needs_files,
    num_classes,
)
from semckd_ray.errors import UserError

__all__ = ["Split", "DatasetSplits", "load_dataset", "list_datasets", "num_classes", "needs_files", "check_dataset",
           "check_val_size", "prepare_dataset"]

log = logging.getLogger(__name__)

IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class Split:
    """One split: ``images`` uint8 [N, 3, 32, 32] (NCHW), ``labels`` int64 [N]."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or tuple(self.images.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"images must be uint8 [N, 3, 32, 32], got {self.images.dtype} {list(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 [{len(self.images)}], got {self.labels.dtype} {list(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset ready for training: its splits and what normalises them.

    ``mean`` / ``std`` are per-channel, on the [0, 1] scale (``ToTensor`` then ``Normalize``).
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]


class _Loaded(NamedTuple):
    """What a dataset's loader returns before the val split is held out of ``train``."""

    train: Split
    test: Split
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


# ---------------------------------------------------------------------------------------------
# CIFAR: torchvision's classes define the folder layout, file names, checksums and download URL;
# the catalog (``semckd_ray.data.catalog``) its name, title, number of classes and split sizes.
# Loading reads the pickles directly: torchvision's own loader rejects any file whose MD5 differs
# from the official one with "not found or corrupted", which cannot tell the user which file is
# wrong, and forbids the small CIFAR-format files the tests write.


@dataclass(frozen=True)
class _CifarFormat:
    info: DatasetInfo
    torchvision_class: type[CIFAR10]
    label_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def title(self) -> str:
        return self.info.title

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def folder(self) -> str:
        return self.torchvision_class.base_folder

    def files(self, train: bool) -> list[tuple[str, str]]:
        """(file name, official MD5) of the pickles that make up one split."""
        return self.torchvision_class.train_list if train else self.torchvision_class.test_list

    @property
    def meta(self) -> dict[str, str]:
        return self.torchvision_class.meta


# The catalog's datasets that are read from CIFAR files (``DatasetInfo.cifar_files``), by name.
_CIFAR: dict[str, _CifarFormat] = {
    "cifar100": _CifarFormat(DATASETS["cifar100"], CIFAR100, "fine_labels",
                             (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "cifar10": _CifarFormat(DATASETS["cifar10"], CIFAR10, "labels", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def _all_files(fmt: _CifarFormat) -> list[tuple[str, str]]:
    return fmt.files(True) + fmt.files(False) + [(fmt.meta["filename"], fmt.meta["md5"])]


def _how_to_provide(fmt: _CifarFormat, root: Path, download_failed: bool = False) -> str:
    tv = fmt.torchvision_class
    names = ", ".join(name for name, _ in _all_files(fmt))
    by_hand = f"download {tv.url} on a machine that can and extract it there: tar -xzf {tv.filename} -C {root}"
    how = (f"To provide it, {by_hand}" if download_failed else
           f"To provide it, either set `data.download: true` in the config to let torchvision download "
           f"{tv.url} into {root}, or {by_hand}")
    return (f"{fmt.title} is expected under {root}/{fmt.folder}/ with the files {names} "
            f"(the layout of the official python archive). {how}")


def _missing_cifar_files(fmt: _CifarFormat, root: Path) -> list[str]:
    return [name for name, _ in _all_files(fmt) if not (root / fmt.folder / name).is_file()]


def _cifar_not_found(fmt: _CifarFormat, root: Path, missing: list[str]) -> UserError:
    return UserError(f"{fmt.title} not found: missing {', '.join(missing)} in {root / fmt.folder}. "
                     + _how_to_provide(fmt, root))


def _check_cifar_files(fmt: _CifarFormat, root: Path, download: bool) -> None:
    """What loading would refuse, found without reading the images: missing or truncated files.

    A complete pickle ends with pickle's STOP opcode (``.``), so a file cut short is found from
    its last byte; the small ``meta`` file is read whole. With ``download`` and files missing,
    only whether the download could be written under ``root`` is checked.
    """
    missing = _missing_cifar_files(fmt, root)
    if missing and download:
        _check_writable(root, f"data.download: true downloads {fmt.title} into it")
    elif missing:
        raise _cifar_not_found(fmt, root, missing)
    else:
        for name, _ in _all_files(fmt):
            _check_ends_like_a_pickle(root / fmt.folder / name)
        _read_class_names(fmt, root)


def _check_ends_like_a_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(size - 1, 0))
        last = f.read(1)
    if last != pickle.STOP:
        problem = "it is empty" if size == 0 else "it stops before the end of a pickle"
        raise UserError(f"{path}: cannot be read as a CIFAR pickle ({problem}); "
                        "the file is probably truncated -- delete it and download the dataset again")


def _check_writable(root: Path, why: str) -> None:
    """``root`` exists as a writable folder, or could be created: its nearest existing parent is one."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"data.root {root} cannot be written ({existing} is not a writable folder), "
                        f"and {why}: set data.root to a writable folder, or provide the dataset there")


def _ensure_cifar_files(fmt: _CifarFormat, root: Path, download: bool) -> None:
    missing = _missing_cifar_files(fmt, root)
    if not missing:
        return
    if not download:
        raise _cifar_not_found(fmt, root, missing)
    tv = fmt.torchvision_class
    log.info("downloading %s from %s into %s", fmt.title, tv.url, root)
    try:
        download_and_extract_archive(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)
    except Exception as exc:  # network, disk and checksum failures all leave the user the same options
        raise UserError(f"downloading {fmt.title} failed ({type(exc).__name__}: {exc}). "
                        + _how_to_provide(fmt, root, download_failed=True)) from exc


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, and refuses any other global: a dataset file
    is data, and a pickle that names a function would run it."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="latin1").load()
    except _RefusedGlobal as exc:
        raise UserError(f"{path}: refused for safety, not loaded: it would call {exc}, and a CIFAR file "
                        "holds only arrays and lists; replace it with the official release") from None
    except Exception as exc:  # a truncated or foreign file fails in many different ways
        raise UserError(f"{path}: cannot be read as a CIFAR pickle ({type(exc).__name__}: {exc}); "
                        "the file is probably truncated -- delete it and download the dataset again") from exc
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    # The official files were pickled by Python 2 (str keys); files written by Python 3 have bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar_batch(path: Path, fmt: _CifarFormat) -> tuple[Tensor, Tensor]:
    entry = _load_pickle(path)
    for key in ("data", fmt.label_key):
        if key not in entry:
            raise UserError(f"{path}: no {key!r} entry (found {sorted(entry)}); is this a {fmt.title} file?")
    data = entry["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: 'data' must be a uint8 array of shape [N, 3072], found {found}")
    labels = np.asarray(entry[fmt.label_key])
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: {fmt.label_key!r} must hold {len(data)} integer labels, "
                        f"found {labels.dtype} of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= fmt.num_classes):
        raise UserError(f"{path}: labels must lie in [0, {fmt.num_classes}), found [{labels.min()}, {labels.max()}]")
    images = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, *IMAGE_SHAPE)))
    return images, torch.from_numpy(labels.astype(np.int64))


def _read_cifar_split(fmt: _CifarFormat, root: Path, train: bool) -> Split:
    parts = [_read_cifar_batch(root / fmt.folder / name, fmt) for name, _ in fmt.files(train)]
    return Split(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def _read_class_names(fmt: _CifarFormat, root: Path) -> tuple[str, ...]:
    path = root / fmt.folder / fmt.meta["filename"]
    key = fmt.meta["key"]
    names = _load_pickle(path).get(key)
    if not isinstance(names, (list, tuple)) or len(names) != fmt.num_classes:
        raise UserError(f"{path}: {key!r} must list {fmt.num_classes} class names, found {names!r:.80}")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _warn_if_unofficial(fmt: _CifarFormat, root: Path) -> None:
    """Results on files that differ from the official release are not comparable; say so, but use them."""
    changed = [name for name, md5 in _all_files(fmt) if not check_integrity(str(root / fmt.folder / name), md5)]
    if changed:
        log.warning("%s files differ from the official release (MD5 mismatch): %s", fmt.title, ", ".join(changed))


def _load_cifar(fmt: _CifarFormat, root: Path, download: bool) -> _Loaded:
    _ensure_cifar_files(fmt, root, download)
    log.info("preparing %s from %s", fmt.title, root / fmt.folder)
    _warn_if_unofficial(fmt, root)
    train = _read_cifar_split(fmt, root, train=True)
    test = _read_cifar_split(fmt, root, train=False)
    return _Loaded(train, test, _read_class_names(fmt, root), fmt.mean, fmt.std)


# ---------------------------------------------------------------------------------------------
# digits: bundled with scikit-learn, so a full training run works offline and in seconds.

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 0  # fixed, so the test set is the same whatever seed the run uses


def _load_digits(root: Path, download: bool) -> _Loaded:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    log.info("preparing digits (scikit-learn, 8x8 upsampled to 32x32x3)")
    bunch = load_digits()
    gray = torch.from_numpy(bunch.images).float().mul_(255.0 / 16.0).unsqueeze(1)  # 0..16 -> 0..255
    resized = F.interpolate(gray, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=False)
    images = resized.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=_DIGITS_TEST_FRACTION, stratify=bunch.target, random_state=_DIGITS_TEST_SEED
    )
    train = Split(images[np.sort(train_idx)], labels[np.sort(train_idx)])
    test = Split(images[np.sort(test_idx)], labels[np.sort(test_idx)])
    # Statistics of the whole training portion, before the val split, so they do not depend on the seed.
    pixels = train.images.double().div_(255.0)
    mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
    std = tuple(pixels.std(dim=(0, 2, 3)).tolist())
    return _Loaded(train, test, tuple(str(c) for c in bunch.target_names), mean, std)


# The catalog's datasets that a library provides (not ``DatasetInfo.cifar_files``), by name.
_BUNDLED: dict[str, Callable[[Path, bool], _Loaded]] = {"digits": _load_digits}  # (root, download)

# ---------------------------------------------------------------------------------------------


def _cifar_format(name: str) -> _CifarFormat | None:
    """The files of dataset ``name`` under ``data.root``; None for a dataset that a library provides."""
    return _CIFAR[name] if dataset_info(name).cifar_files else None


def _load(name: str, root: Path, download: bool) -> _Loaded:
    fmt = _cifar_format(name)
    return _BUNDLED[name](root, download) if fmt is None else _load_cifar(fmt, root, download)


def check_dataset(name: str, root: str | os.PathLike[str], download: bool = False) -> None:
    """Raise the ``UserError`` loading would raise for files that are missing or cut short, without
    reading the images; with ``download``, missing files only need ``root`` to be writable."""
    fmt = _cifar_format(name)
    if fmt is not None:
        _check_cifar_files(fmt, Path(root).expanduser(), download)


def prepare_dataset(name: str, root: str | os.PathLike[str], download: bool = False) -> None:
    """Make sure the dataset's files are under ``root``, downloading them if ``download``; loads nothing."""
    fmt = _cifar_format(name)
    if fmt is not None:
        _ensure_cifar_files(fmt, Path(root).expanduser(), download)


def _hold_out(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Split ``train`` into (train, val) with a seeded permutation; both keep the original order."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    return train.subset(train_idx), train.subset(val_idx)


def load_dataset(
    name: str,
    root: str | os.PathLike[str],
    download: bool = False,
    val_size: int | None = None,
    seed: int = 0,
) -> DatasetSplits:
    """Load dataset ``name`` (see ``list_datasets()``) from ``root`` into memory.

    ``val_size`` images (default: 5000 for CIFAR, 10% of the training portion for digits) are held
    out of the training set into ``val``, chosen by ``seed``; 0 gives an empty val split. CIFAR is
    read from ``root`` in the layout of the official python archive, and downloaded there by
    torchvision when absent and ``download`` is true. ``digits`` ignores ``root``.
    """
    info = dataset_info(name)
    loaded = _load(name, Path(root).expanduser(), download)
    train = loaded.train
    if val_size is None:
        val_size = info.default_val_size(len(train))
    check_val_size(name, val_size, len(train))
    train, val = _hold_out(train, val_size, seed)
    log.info("%s: %d train / %d val / %d test images", name, len(train), len(val), len(loaded.test))
    num_classes = len(loaded.class_names)
    return DatasetSplits(
        name, train, val, loaded.test, num_classes, tuple(loaded.mean), tuple(loaded.std), loaded.class_names
    )
