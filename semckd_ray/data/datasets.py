"""Datasets as uint8 tensors in memory: CIFAR-100, CIFAR-10, scikit-learn's digits, STL-10 and Tiny ImageNet.

A whole CIFAR split is 150 MB as uint8, so every split lives in memory (and, if the input pipeline
is asked to, on the training device); augmentation then runs as batched tensor ops instead of a
per-image PIL pipeline. Each dataset comes as train / val / test splits: the validation split is
held out of the training set with a seed and is the one to select models on; the test split is for
final reporting only. With ``val_size=0`` the val split is empty and callers have nothing to select
on -- they must not fall back to the test split.

STL-10 (96x96) and Tiny ImageNet (64x64), for the transfer study, are resized to 32x32 when loaded,
so that every model of the zoo takes them as it takes CIFAR (``_resize_to_32``).

Once the val split is held out, the training split can be cut to a share of each class
(``train_fraction``: few-shot distillation) and a share of its labels redrawn at random
(``label_noise``), both drawn with the split's seed; val and test are never touched by either.
``DatasetSplits.record`` keeps what was done, and ``log_training_data`` logs it with the run.
"""

from __future__ import annotations

import csv
import functools
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
from torchvision.datasets import CIFAR10, CIFAR100, STL10
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from semckd_ray.data.catalog import (
    DATASETS,
    DatasetInfo,
    check_label_noise,
    check_train_fraction,
    check_val_size,
    dataset_info,
    is_streamed,
    kept_per_class,
    list_datasets,
    needs_files,
    num_classes,
)
from semckd_ray.errors import UserError

__all__ = ["Split", "DatasetSplits", "TrainRecord", "load_dataset", "list_datasets", "num_classes", "needs_files",
           "check_dataset", "check_val_size", "prepare_dataset", "stratified_fraction", "symmetric_label_noise",
           "log_training_data", "training_data_metrics", "write_training_data"]

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
class TrainRecord:
    """How the training split was drawn from the official training split: what a run logs to be audited.

    ``index`` int64 [N]: each training image's position in the official training split as loaded
    (CIFAR: its batch files in order; STL-10: ``train_X.bin``; Tiny ImageNet: the wnids sorted, each
    ``train/<wnid>/images`` sorted by file name; digits: scikit-learn's order of its training portion).
    ``clean_labels`` int64 [N]: the labels before ``label_noise``; ``redrawn`` bool [N]: the images
    whose label it redrew (the class drawn may be the original one). ``available`` int64 [C]: each
    class's images once the val split is held out, before ``train_fraction``.
    """

    train_fraction: float
    label_noise: float
    index: Tensor
    clean_labels: Tensor
    redrawn: Tensor
    available: Tensor


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset ready for training: its splits and what normalises them.

    ``mean`` / ``std`` are per-channel, on the [0, 1] scale (``ToTensor`` then ``Normalize``).
    ``record``: how ``load_dataset`` drew the training split (None for splits built otherwise).
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    record: TrainRecord | None = None


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


# ---------------------------------------------------------------------------------------------
# STL-10 and Tiny ImageNet, for the transfer (linear probe) study: read from ``data.root`` in the
# layout of their official archives, and resized to 32x32 so that every model takes them as it takes
# CIFAR. The resize is ``torch.nn.functional.interpolate(mode="bilinear", antialias=True,
# align_corners=False)`` on the uint8 images as float32, rounded back to uint8: with ``antialias``
# the bilinear filter widens to the scale factor (3 for STL-10, 2 for Tiny ImageNet) as PIL's
# resize does, so each output pixel averages its whole 3x3 / 2x2 footprint instead of aliasing.
# Mean and std are those of the resized official training split (before the val split, so they
# depend on neither seed), computed when it is loaded, as for digits.

_RESIZE_CHUNK = 1024  # images resized at a time: 1024 x 3 x 96 x 96 float32 is 113 MB


def _resize_to_32(images: Tensor) -> Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, 32, 32]: antialiased bilinear (see above), chunk by chunk."""
    out = torch.empty((len(images), *IMAGE_SHAPE), dtype=torch.uint8)
    for start in range(0, len(images), _RESIZE_CHUNK):
        chunk = images[start:start + _RESIZE_CHUNK].float()
        resized = F.interpolate(chunk, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=False, antialias=True)
        out[start:start + len(chunk)] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) std of uint8 [N, 3, H, W] images on the [0, 1] scale, in chunks."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), _RESIZE_CHUNK):
        chunk = images[start:start + _RESIZE_CHUNK].double().div_(255.0)
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square().sum(dim=(0, 2, 3))
    n = images.numel() // 3
    mean = total / n
    var = (squares - n * mean.square()) / max(n - 1, 1)
    return tuple(mean.tolist()), tuple(var.clamp_(min=0).sqrt_().tolist())


@dataclass(frozen=True)
class _RootFormat:
    """A dataset read from ``data.root`` in a layout of its own, and how to get it there."""

    info: DatasetInfo
    folder: str  # under data.root
    layout: str  # how messages list the expected files
    url: str
    filename: str  # the archive's name
    md5: str
    extract: str  # the command that extracts the archive into {root}

    @property
    def title(self) -> str:
        return self.info.title

    def missing(self, root: Path) -> list[str]:
        """The expected files and folders (relative to the dataset's folder) that are not there."""
        raise NotImplementedError

    def check(self, root: Path) -> None:
        """What loading would refuse that shows without decoding the images: sizes, labels, lists."""
        raise NotImplementedError

    def read(self, root: Path) -> _Loaded:
        raise NotImplementedError


def _how_to_provide_files(fmt: _RootFormat, root: Path, download_failed: bool = False) -> str:
    by_hand = (f"download {fmt.url} on a machine that can and extract it there: "
               + fmt.extract.format(root=root))
    how = (f"To provide it, {by_hand}" if download_failed else
           f"To provide it, either set `data.download: true` in the config to download {fmt.url} into {root}, "
           f"or {by_hand}")
    return f"{fmt.title} is expected under {root}/{fmt.folder}/ with {fmt.layout}. {how}"


def _root_not_found(fmt: _RootFormat, root: Path, missing: list[str]) -> UserError:
    return UserError(f"{fmt.title} not found: missing {', '.join(missing)} in {root / fmt.folder}. "
                     + _how_to_provide_files(fmt, root))


def _ensure_root_files(fmt: _RootFormat, root: Path, download: bool) -> None:
    missing = fmt.missing(root)
    if not missing:
        return
    if not download:
        raise _root_not_found(fmt, root, missing)
    log.info("downloading %s from %s into %s", fmt.title, fmt.url, root)
    try:
        download_and_extract_archive(fmt.url, str(root), filename=fmt.filename, md5=fmt.md5)
    except Exception as exc:  # network, disk and checksum failures all leave the user the same options
        raise UserError(f"downloading {fmt.title} failed ({type(exc).__name__}: {exc}). "
                        + _how_to_provide_files(fmt, root, download_failed=True)) from exc
    missing = fmt.missing(root)
    if missing:
        raise UserError(f"{fmt.url} was downloaded and extracted into {root}, but {', '.join(missing)} is still "
                        f"missing in {root / fmt.folder}. " + _how_to_provide_files(fmt, root, download_failed=True))


def _check_root_files(fmt: _RootFormat, root: Path, download: bool) -> None:
    """Like ``_check_cifar_files``: missing files, or what shows in the files without decoding images."""
    missing = fmt.missing(root)
    if missing and download:
        _check_writable(root, f"data.download: true downloads {fmt.title} into it")
    elif missing:
        raise _root_not_found(fmt, root, missing)
    else:
        fmt.check(root)


def _load_root(fmt: _RootFormat, root: Path, download: bool) -> _Loaded:
    _ensure_root_files(fmt, root, download)
    log.info("preparing %s from %s (resized to 32x32)", fmt.title, root / fmt.folder)
    return fmt.read(root)


def _truncated(path: Path, problem: str) -> UserError:
    return UserError(f"{path}: {problem}; the file is probably truncated or not the official one -- "
                     "delete it and download the dataset again")


# STL-10: torchvision's STL10 names the folder, files, URL and checksum. Images are uint8, stored
# per image as 3 planes of 96x96, each column-major; labels one byte each, 1..10.

_STL10_IMAGE_BYTES = 3 * 96 * 96


@dataclass(frozen=True)
class _Stl10Format(_RootFormat):
    def _files(self) -> list[str]:
        return [name for name, _ in STL10.train_list[:2] + STL10.test_list] + [STL10.class_names_file]

    def missing(self, root: Path) -> list[str]:
        return [name for name in self._files() if not (root / self.folder / name).is_file()]

    def _labels(self, root: Path, split: str) -> np.ndarray:
        path = root / self.folder / f"{split}_y.bin"
        labels = np.fromfile(path, dtype=np.uint8)
        if len(labels) == 0:
            raise _truncated(path, "it holds no label")
        if labels.min() < 1 or labels.max() > self.info.num_classes:
            raise UserError(f"{path}: labels must lie in [1, {self.info.num_classes}] (one byte per image), "
                            f"found [{labels.min()}, {labels.max()}]; is this an STL-10 label file?")
        return labels.astype(np.int64) - 1

    def _images_path(self, root: Path, split: str, count: int) -> Path:
        path = root / self.folder / f"{split}_X.bin"
        size = path.stat().st_size
        if size != count * _STL10_IMAGE_BYTES:
            raise _truncated(path, f"it holds {size} bytes, expected {count} images of 3x96x96 bytes "
                                   f"({count * _STL10_IMAGE_BYTES} bytes) for the {count} labels of {split}_y.bin")
        return path

    def _class_names(self, root: Path) -> tuple[str, ...]:
        path = root / self.folder / "class_names.txt"
        names = _read_lines(path)
        if len(names) != self.info.num_classes:
            raise UserError(f"{path}: must list {self.info.num_classes} class names, one a line, found {len(names)}")
        return tuple(names)

    def check(self, root: Path) -> None:
        for split in ("train", "test"):
            self._images_path(root, split, len(self._labels(root, split)))
        self._class_names(root)

    def _split(self, root: Path, split: str) -> Split:
        labels = self._labels(root, split)
        path = self._images_path(root, split, len(labels))
        raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
        out = torch.empty((len(labels), *IMAGE_SHAPE), dtype=torch.uint8)
        for start in range(0, len(labels), _RESIZE_CHUNK):
            # Column-major planes: transposing each 96x96 plane gives rows (as torchvision's STL10 does).
            chunk = torch.from_numpy(np.ascontiguousarray(raw[start:start + _RESIZE_CHUNK].transpose(0, 1, 3, 2)))
            out[start:start + len(chunk)] = _resize_to_32(chunk)
        return Split(out, torch.from_numpy(labels))

    def read(self, root: Path) -> _Loaded:
        names = self._class_names(root)
        train, test = self._split(root, "train"), self._split(root, "test")
        mean, std = _channel_stats(train.images)
        return _Loaded(train, test, names, mean, std)


def _read_lines(path: Path) -> list[str]:
    """The non-empty lines of a small text file, stripped; a file that is not text is a UserError."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a text file (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} "
                        "is not UTF-8); the file is probably corrupt -- delete it and download the dataset again") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


# Tiny ImageNet: the official zip extracts to tiny-imagenet-200/ with wnids.txt (the 200 classes),
# words.txt (names of every ImageNet wnid), train/<wnid>/images/<wnid>_<k>.JPEG (500 per class) and
# val/images/val_<k>.JPEG labelled by val/val_annotations.txt (file, wnid, box). Its test images
# have no labels: the official val split is the test split here. Classes are numbered in the sorted
# order of their wnids (as torchvision's ImageFolder numbers train/), named by the first name
# words.txt gives them. Images are 64x64 (grayscale ones are converted to RGB).

_TINY_SIZE = (64, 64)


@dataclass(frozen=True)
class _TinyImageNetFormat(_RootFormat):
    def missing(self, root: Path) -> list[str]:
        folder = root / self.folder
        expected = {"wnids.txt": "file", "words.txt": "file", "train": "dir", "val/images": "dir",
                    "val/val_annotations.txt": "file"}
        return [name + ("/" if kind == "dir" else "") for name, kind in expected.items()
                if not ((folder / name).is_dir() if kind == "dir" else (folder / name).is_file())]

    def _wnids(self, root: Path) -> list[str]:
        path = root / self.folder / "wnids.txt"
        wnids = _read_lines(path)
        if len(wnids) != self.info.num_classes or len(set(wnids)) != len(wnids):
            raise UserError(f"{path}: must list {self.info.num_classes} distinct wnids, one a line, found "
                            f"{len(wnids)} ({len(set(wnids))} distinct)")
        return sorted(wnids)

    def _class_names(self, root: Path, wnids: list[str]) -> tuple[str, ...]:
        path = root / self.folder / "words.txt"
        words = {}
        for line in _read_lines(path):
            wnid, _, names = line.partition("\t")
            words[wnid.strip()] = names.split(",")[0].strip()
        absent = [w for w in wnids if not words.get(w)]
        if absent:
            raise UserError(f"{path}: names no class for {len(absent)} wnid(s) of wnids.txt, e.g. {absent[0]}; "
                            "is it the words.txt of tiny-imagenet-200.zip?")
        return tuple(words[w] for w in wnids)

    def _train_files(self, root: Path, wnids: list[str]) -> list[list[Path]]:
        files = []
        for wnid in wnids:
            images = root / self.folder / "train" / wnid / "images"
            found = sorted(images.glob("*.JPEG")) if images.is_dir() else []
            if not found:
                raise UserError(f"{images}: no .JPEG image of class {wnid} (wnids.txt lists it); the training "
                                "tree is incomplete -- " + _how_to_provide_files(self, root))
            files.append(found)
        return files

    def _val_files(self, root: Path, wnids: list[str]) -> list[tuple[Path, int]]:
        path = root / self.folder / "val" / "val_annotations.txt"
        images = root / self.folder / "val" / "images"
        present = {p.name for p in images.iterdir()}
        index = {w: k for k, w in enumerate(wnids)}
        out = []
        for number, line in enumerate(_read_lines(path), 1):
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise UserError(f"{path}, line {number}: expected '<file>\\t<wnid>\\t<box>' with a wnid of wnids.txt, "
                                f"found {line[:80]!r}")
            if fields[0] not in present:
                raise UserError(f"{path}, line {number}: {fields[0]} is not in {images}; the val split is incomplete "
                                "-- delete tiny-imagenet-200/ and extract the archive again")
            out.append((images / fields[0], index[fields[1]]))
        if not out:
            raise _truncated(path, "it annotates no image")
        return out

    def check(self, root: Path) -> None:
        wnids = self._wnids(root)
        self._class_names(root, wnids)
        self._train_files(root, wnids)
        self._val_files(root, wnids)

    def read(self, root: Path) -> _Loaded:
        wnids = self._wnids(root)
        names = self._class_names(root, wnids)
        train_files = self._train_files(root, wnids)
        train = _decode_jpegs([p for files in train_files for p in files],
                              [k for k, files in enumerate(train_files) for _ in files])
        val = self._val_files(root, wnids)
        test = _decode_jpegs([p for p, _ in val], [k for _, k in val])
        mean, std = _channel_stats(train.images)
        return _Loaded(train, test, names, mean, std)


def _decode_jpegs(paths: list[Path], labels: list[int]) -> Split:
    """Decode 64x64 JPEGs (PIL, as RGB) and resize them to 32x32, ``_RESIZE_CHUNK`` at a time."""
    from PIL import Image

    out = torch.empty((len(paths), *IMAGE_SHAPE), dtype=torch.uint8)
    chunk = np.empty((_RESIZE_CHUNK, *_TINY_SIZE, 3), dtype=np.uint8)
    for start in range(0, len(paths), _RESIZE_CHUNK):
        part = paths[start:start + _RESIZE_CHUNK]
        for k, path in enumerate(part):
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB")  # decodes the whole file: a truncated one fails here
            except Exception as exc:  # PIL fails in several ways on a truncated or foreign file
                raise UserError(f"{path}: cannot be decoded as an image ({type(exc).__name__}: {exc}); the file is "
                                "probably truncated -- delete tiny-imagenet-200/ and extract the archive again") from exc
            if image.size != _TINY_SIZE:
                raise UserError(f"{path}: a {image.size[0]}x{image.size[1]} image, but every Tiny ImageNet image "
                                "is 64x64; is this the official tiny-imagenet-200.zip?")
            chunk[k] = np.asarray(image)
        nchw = torch.from_numpy(chunk[:len(part)]).permute(0, 3, 1, 2)
        out[start:start + len(part)] = _resize_to_32(nchw)
    return Split(out, torch.tensor(labels, dtype=torch.int64))


_STL10 = _Stl10Format(
    DATASETS["stl10"], STL10.base_folder,
    "the files train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt (the layout of the "
    "official binary archive; its unlabeled_X.bin is not used)",
    STL10.url, STL10.filename, STL10.tgz_md5, "tar -xzf " + STL10.filename + " -C {root}")


_TINY_IMAGENET = _TinyImageNetFormat(
    DATASETS["tiny_imagenet"], "tiny-imagenet-200",
    "wnids.txt, words.txt, train/<wnid>/images/*.JPEG and val/images/*.JPEG with val/val_annotations.txt "
    "(the layout of the official zip)",
    "http://cs231n.stanford.edu/tiny-imagenet-200.zip", "tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de",
    "unzip -q tiny-imagenet-200.zip -d {root}")

# The catalog's datasets read from ``data.root`` in a layout of their own (``DatasetInfo.root_files``).
_ROOT_FORMATS: dict[str, _RootFormat] = {"stl10": _STL10, "tiny_imagenet": _TINY_IMAGENET}


# The catalog's datasets not read from CIFAR files (not ``DatasetInfo.cifar_files``), by name, and
# their loaders, (root, download) -> _Loaded: those a library provides, and those of ``_ROOT_FORMATS``.
_BUNDLED: dict[str, Callable[[Path, bool], _Loaded]] = {
    "digits": _load_digits,
    **{name: functools.partial(_load_root, fmt) for name, fmt in _ROOT_FORMATS.items()},
}

# ---------------------------------------------------------------------------------------------


def _cifar_format(name: str) -> _CifarFormat | None:
    """The files of dataset ``name`` under ``data.root``; None for a dataset that a library provides."""
    return _CIFAR[name] if dataset_info(name).cifar_files else None


def _load(name: str, root: Path, download: bool) -> _Loaded:
    fmt = _cifar_format(name)
    return _BUNDLED[name](root, download) if fmt is None else _load_cifar(fmt, root, download)


def check_dataset(name: str, root: str | os.PathLike[str], download: bool = False) -> None:
    """Raise the ``UserError`` loading would raise for files that are missing or cut short, without
    reading the images; with ``download``, missing files only need ``root`` to be writable.

    STL-10: the files' sizes against their labels, the labels and the class names are checked;
    Tiny ImageNet: the class lists, every class's training folder and the val annotations (the
    JPEGs are listed, not decoded: a corrupt one shows when loading)."""
    fmt = _cifar_format(name)
    if fmt is not None:
        _check_cifar_files(fmt, Path(root).expanduser(), download)
    elif is_streamed(name):
        from semckd_ray.data.imagefolder import check_image_folder

        check_image_folder(Path(root).expanduser())
    elif name in _ROOT_FORMATS:
        _check_root_files(_ROOT_FORMATS[name], Path(root).expanduser(), download)


def prepare_dataset(name: str, root: str | os.PathLike[str], download: bool = False) -> None:
    """Make sure the dataset's files are under ``root``, downloading them if ``download``; loads nothing."""
    fmt = _cifar_format(name)
    if fmt is not None:
        _ensure_cifar_files(fmt, Path(root).expanduser(), download)
    elif is_streamed(name):  # nothing to download: a tree of the user's own
        check_dataset(name, root)
    elif name in _ROOT_FORMATS:
        _ensure_root_files(_ROOT_FORMATS[name], Path(root).expanduser(), download)


def _hold_out(size: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train, val) positions of a training split of ``size`` images, by a seeded permutation; both sorted."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


# ---------------------------------------------------------------------------------------------
# Few-shot and label noise: drawn from the split seed, each from a stream of its own, so the val
# split (drawn from the seed itself, as before these existed) is the same whatever they are.

_FRACTION_STREAM = 1
_NOISE_STREAM = 2


def _stream_generator(seed: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence((seed, stream)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


def _first_per_class(labels: Tensor, per_class: list[int], generator: torch.Generator) -> Tensor:
    """The positions of the first ``per_class[c]`` images of each class c in a random order, sorted.

    The official ``dataset/stratified_split.py``: one ``randperm`` over all images, then each class
    takes its images in that order until it has its count.
    """
    order = torch.randperm(len(labels), generator=generator)
    by_class, within = torch.sort(labels[order], stable=True)  # classes in order, each in permutation order
    counts = torch.bincount(labels, minlength=len(per_class))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(labels)) - starts[by_class]  # an image's place among its class's images
    keep = rank < torch.tensor(per_class, dtype=torch.int64)[by_class]
    return order[within[keep]].sort().values


def stratified_fraction(labels: Tensor, fraction: float, num_classes: int, seed: int) -> Tensor:
    """The positions (sorted) that ``data.train_fraction`` keeps of a training split with ``labels``.

    Each class keeps ``kept_per_class(fraction, n_c)`` = round(fraction * n_c) images, at least 1,
    chosen as the official ``dataset/stratified_split.py`` chooses them (``_first_per_class``) from
    a permutation drawn with ``seed`` alone. The permutation does not depend on the fraction, so the
    subsets are nested: a run at 25% trains on a subset of the images of a run at 50% with the same
    seed (the official script draws a new permutation for each size instead). Fraction 1 keeps all.
    """
    check_train_fraction(fraction)
    if fraction >= 1:
        return torch.arange(len(labels))
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    return _first_per_class(labels, [kept_per_class(fraction, n) for n in counts],
                            _stream_generator(seed, _FRACTION_STREAM))


def symmetric_label_noise(labels: Tensor, rate: float, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """``data.label_noise``: (noisy labels, redrawn mask bool [N]) for a training split with ``labels``.

    As the official ``dataset/label_noise.py``: of each class, round(rate * n_c) images are chosen
    (``_first_per_class``, from a permutation drawn with ``seed``), and each chosen image gets a label
    drawn uniformly among all ``num_classes`` classes -- which may be its own: the expected share
    of labels that actually change is rate * (1 - 1 / num_classes). Rate 0 leaves the labels as they are.
    """
    check_label_noise(rate)
    redrawn = torch.zeros(len(labels), dtype=torch.bool)
    if rate == 0:
        return labels.clone(), redrawn
    generator = _stream_generator(seed, _NOISE_STREAM)
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    chosen = _first_per_class(labels, [round(rate * n) for n in counts], generator)
    noisy = labels.clone()
    noisy[chosen] = torch.randint(num_classes, (len(chosen),), generator=generator)
    redrawn[chosen] = True
    return noisy, redrawn


def load_dataset(
    name: str,
    root: str | os.PathLike[str],
    download: bool = False,
    val_size: int | None = None,
    seed: int = 0,
    train_fraction: float = 1.0,
    label_noise: float = 0.0,
) -> DatasetSplits:
    """Load dataset ``name`` (see ``list_datasets()``) from ``root`` into memory.

    ``val_size`` images (default: 5000 for CIFAR, 10% of the training portion for the others) are
    held out of the training set into ``val``, chosen by ``seed``; 0 gives an empty val split. CIFAR is
    read from ``root`` in the layout of the official python archive, and downloaded there by
    torchvision when absent and ``download`` is true; STL-10 and Tiny ImageNet likewise in the layouts
    of their official archives. ``digits`` ignores ``root``.

    Of the images left for training, ``train_fraction`` of each class is kept (``stratified_fraction``)
    and then ``label_noise`` of the labels redrawn (``symmetric_label_noise``), both drawn with
    ``seed``: the val and test splits, and their labels, do not depend on either.
    """
    check_train_fraction(train_fraction)
    check_label_noise(label_noise)
    info = dataset_info(name)
    if info.streamed:
        raise UserError(f"dataset {name!r} is a folder tree streamed through Ray Data (semckd_ray.data.imagefolder), "
                        "not loaded into memory: train on it with semckd_ray.train / semckd_ray.tune")
    loaded = _load(name, Path(root).expanduser(), download)
    official = loaded.train
    if val_size is None:
        val_size = info.default_val_size(len(official))
    check_val_size(name, val_size, len(official))
    train_index, val_index = _hold_out(len(official), val_size, seed)
    num_classes = len(loaded.class_names)
    available = torch.bincount(official.labels[train_index], minlength=num_classes)
    train_index = train_index[stratified_fraction(official.labels[train_index], train_fraction, num_classes, seed)]
    clean = official.labels[train_index]
    noisy, redrawn = symmetric_label_noise(clean, label_noise, num_classes, seed)
    train = Split(official.images[train_index], noisy)
    val = official.subset(val_index)
    record = TrainRecord(float(train_fraction), float(label_noise), train_index, clean, redrawn, available)
    drawn = ""
    if train_fraction < 1:
        drawn += f", train_fraction {train_fraction:g} of {int(available.sum())}"
    if label_noise > 0:
        drawn += f", label_noise {label_noise:g}: {int(redrawn.sum())} labels redrawn, {int((noisy != clean).sum())} changed"
    log.info("%s: %d train / %d val / %d test images%s", name, len(train), len(val), len(loaded.test), drawn)
    return DatasetSplits(
        name, train, val, loaded.test, num_classes, tuple(loaded.mean), tuple(loaded.std), loaded.class_names, record
    )


# ---------------------------------------------------------------------------------------------
# What a run logs about its training split, so that it can be audited


def training_data_metrics(data: DatasetSplits) -> dict[str, float]:
    """The realised counts: images per split, the fewest and most per class, labels redrawn and changed."""
    per_class = torch.bincount(data.record.clean_labels if data.record is not None else data.train.labels,
                               minlength=data.num_classes)
    metrics = {
        "data_train_images": float(len(data.train)),
        "data_val_images": float(len(data.val)),
        "data_test_images": float(len(data.test)),
        "data_train_images_per_class_min": float(per_class.min()) if len(per_class) else 0.0,
        "data_train_images_per_class_max": float(per_class.max()) if len(per_class) else 0.0,
        "data_noisy_labels": 0.0,
        "data_changed_labels": 0.0,
    }
    if data.record is not None:
        metrics["data_noisy_labels"] = float(data.record.redrawn.sum())
        metrics["data_changed_labels"] = float((data.record.clean_labels != data.train.labels).sum())
    return metrics


def _write_csv(path: Path, header: list[str], rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_training_data(data: DatasetSplits, folder: str | os.PathLike[str]) -> list[Path]:
    """Write what the training split is into ``folder``; returns the files written.

    - ``train_class_counts.csv`` (always): ``class, name, available, kept, redrawn, changed``: per
      class, the images left once the val split is held out, those ``train_fraction`` kept, and of
      those the labels ``label_noise`` redrew and that it changed (counted by original class).
    - ``train_subset.csv`` (train_fraction < 1): ``index, label``: every training image kept, by its
      position in the official training split (``TrainRecord.index``), with its clean label.
    - ``label_noise.csv`` (label_noise > 0): ``index, original_label, noisy_label``: every image whose
      label was redrawn, including those that drew their own class (original == noisy), as the
      official ``{index: new label}`` noise files hold them.
    """
    record = data.record
    if record is None:
        return []
    folder = Path(folder)
    noisy = data.train.labels
    c = data.num_classes
    kept = torch.bincount(record.clean_labels, minlength=c)
    redrawn = torch.bincount(record.clean_labels[record.redrawn], minlength=c)
    changed = torch.bincount(record.clean_labels[record.clean_labels != noisy], minlength=c)
    written = [_write_csv(folder / "train_class_counts.csv", ["class", "name", "available", "kept", "redrawn", "changed"],
                          zip(range(c), data.class_names, record.available.tolist(), kept.tolist(),
                              redrawn.tolist(), changed.tolist()))]
    if record.train_fraction < 1:
        written.append(_write_csv(folder / "train_subset.csv", ["index", "label"],
                                  zip(record.index.tolist(), record.clean_labels.tolist())))
    if record.label_noise > 0:
        rows = record.redrawn.nonzero().flatten()
        written.append(_write_csv(folder / "label_noise.csv", ["index", "original_label", "noisy_label"],
                                  zip(record.index[rows].tolist(), record.clean_labels[rows].tolist(),
                                      noisy[rows].tolist())))
    return written


def log_training_data(logger, data: DatasetSplits, folder: str | os.PathLike[str], metrics: bool = True) -> None:
    """Log what the training split is into a run through ``logger`` (a ``semckd_ray.spool.SpooledLogger``).

    The files of ``write_training_data`` go under the run's artifact folder ``data/`` (written into
    ``folder``/data, which must stay until the logger is closed); with ``metrics``, the counts of
    ``training_data_metrics`` are logged at step 0 (a resumed training passes False: the run has them).
    """
    for path in write_training_data(data, Path(folder) / "data"):
        logger.log_artifact(path, "data")
    if metrics:
        logger.log_metrics(training_data_metrics(data), step=0)
