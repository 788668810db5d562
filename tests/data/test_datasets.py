"""Loading CIFAR from the official on-disk layout, its error messages, digits, and the val split."""

from __future__ import annotations

import logging
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from semckd_ray.data import datasets as datasets_module
from semckd_ray.data import list_datasets, load_dataset
from semckd_ray.errors import UserError


def _images_with_ids(n: int, first_id: int, rng: np.random.Generator) -> np.ndarray:
    """CIFAR rows (uint8 [n, 3072]) whose first two bytes encode a unique image id."""
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    ids = np.arange(first_id, first_id + n)
    data[:, 0], data[:, 1] = ids % 256, ids // 256
    return data


def _image_ids(images: torch.Tensor) -> list[int]:
    flat = images.reshape(len(images), -1).long()
    return (flat[:, 0] + 256 * flat[:, 1]).tolist()


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar100(root: Path, n_train: int = 300, n_test: int = 50) -> dict[str, np.ndarray]:
    """A small CIFAR-100 in the layout and pickle format of cifar-100-python.tar.gz."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    arrays = {}
    for name, n, first in (("train", n_train, 0), ("test", n_test, n_train)):
        data = _images_with_ids(n, first, rng)
        fine = rng.integers(0, 100, size=n)
        _dump(folder / name, {b"data": data, b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist()})
        arrays[name], arrays[name + "_labels"] = data, fine
    _dump(folder / "meta", {b"fine_label_names": [f"class{i}" for i in range(100)],
                            b"coarse_label_names": [f"super{i}" for i in range(20)]})
    return arrays


def write_cifar10(root: Path, per_batch: int = 40, n_test: int = 30) -> None:
    """A small CIFAR-10 in the layout of cifar-10-python.tar.gz: five training batches and a test batch."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        _dump(folder / name, {b"data": _images_with_ids(n, k * per_batch, rng),
                              b"labels": rng.integers(0, 10, size=n).tolist()})
    _dump(folder / "batches.meta", {b"label_names": [f"class{i}" for i in range(10)]})


def test_cifar100_reads_the_official_layout_as_nchw_uint8(tmp_path):
    arrays = write_cifar100(tmp_path)
    data = load_dataset("cifar100", tmp_path, val_size=0)
    assert data.name == "cifar100" and data.num_classes == 100
    assert data.mean == (0.5071, 0.4867, 0.4408) and data.std == (0.2675, 0.2565, 0.2761)
    assert data.class_names[:2] == ("class0", "class1") and len(data.class_names) == 100
    for split, key in ((data.train, "train"), (data.test, "test")):
        assert split.images.dtype == torch.uint8 and split.images.shape == (len(arrays[key]), 3, 32, 32)
        assert split.labels.dtype == torch.int64
        # A CIFAR row is the red plane, then green, then blue, each row-major.
        assert torch.equal(split.images, torch.from_numpy(arrays[key].reshape(-1, 3, 32, 32)))
        assert split.labels.tolist() == arrays[key + "_labels"].tolist()
    assert len(data.val) == 0


def test_cifar10_reads_all_five_training_batches(tmp_path):
    write_cifar10(tmp_path)
    data = load_dataset("cifar10", tmp_path, val_size=20)
    assert data.num_classes == 10 and data.mean == (0.4914, 0.4822, 0.4465)
    assert len(data.train) + len(data.val) == 200 and len(data.val) == 20 and len(data.test) == 30
    assert sorted(_image_ids(data.train.images) + _image_ids(data.val.images)) == list(range(200))


def test_val_split_is_held_out_of_train_disjointly_and_chosen_by_the_seed(tmp_path):
    write_cifar100(tmp_path)
    first = load_dataset("cifar100", tmp_path, val_size=50, seed=3)
    train_ids, val_ids = set(_image_ids(first.train.images)), set(_image_ids(first.val.images))
    assert len(val_ids) == 50 and len(train_ids) == 250
    assert not train_ids & val_ids and train_ids | val_ids == set(range(300))
    # Labels travel with their images.
    full = load_dataset("cifar100", tmp_path, val_size=0)
    label_of = dict(zip(_image_ids(full.train.images), full.train.labels.tolist()))
    assert first.val.labels.tolist() == [label_of[i] for i in _image_ids(first.val.images)]

    again = load_dataset("cifar100", tmp_path, val_size=50, seed=3)
    other = load_dataset("cifar100", tmp_path, val_size=50, seed=4)
    assert torch.equal(again.val.images, first.val.images)
    assert set(_image_ids(other.val.images)) != val_ids
    assert torch.equal(other.test.images, first.test.images)


@pytest.mark.parametrize("val_size", [-1, 300, 1.5])
def test_val_size_outside_the_training_set_is_a_user_error(tmp_path, val_size):
    write_cifar100(tmp_path)
    with pytest.raises(UserError, match="data.val_size"):
        load_dataset("cifar100", tmp_path, val_size=val_size)


def test_default_cifar_val_split_is_5000_images(tmp_path):
    write_cifar100(tmp_path, n_train=5100, n_test=10)
    assert len(load_dataset("cifar100", tmp_path).val) == 5000


@pytest.mark.parametrize(
    ("name", "folder", "archive"),
    [
        ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
        ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
    ],
)
def test_missing_cifar_offline_says_how_to_provide_it(tmp_path, name, folder, archive):
    with pytest.raises(UserError) as info:
        load_dataset(name, tmp_path / "data")
    message = str(info.value)
    assert f"{tmp_path / 'data'}/{folder}/" in message
    assert f"https://www.cs.toronto.edu/~kriz/{archive}" in message
    assert "data.download: true" in message


def test_failed_download_is_a_user_error_with_the_manual_route(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(datasets_module, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match=r"downloading CIFAR-100 failed .*no route to host.*tar -xzf") as info:
        load_dataset("cifar100", tmp_path, download=True)
    assert "data.download: true" not in str(info.value)  # it is set already: only the manual route is left


def test_download_is_skipped_when_the_files_are_present(tmp_path, monkeypatch):
    write_cifar100(tmp_path)
    monkeypatch.setattr(datasets_module, "download_and_extract_archive", pytest.fail)
    assert len(load_dataset("cifar100", tmp_path, download=True, val_size=0).train) == 300


def test_preparation_is_logged_and_unofficial_files_are_flagged(tmp_path, caplog):
    write_cifar100(tmp_path)
    with caplog.at_level(logging.INFO, logger="semckd_ray.data"):
        load_dataset("cifar100", tmp_path, val_size=10)
    assert "preparing CIFAR-100" in caplog.text
    assert "differ from the official release" in caplog.text
    assert "290 train / 10 val / 50 test" in caplog.text


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _rewrite(path: Path, **changes) -> None:
    with open(path, "rb") as f:
        entry = pickle.load(f)
    entry.update({k.encode(): v for k, v in changes.items()})
    _dump(path, entry)


@pytest.mark.parametrize(
    ("corrupt", "file", "problem"),
    [
        (_truncate, "train", "cannot be read as a CIFAR pickle"),
        (lambda p: _rewrite(p, data=np.zeros((300, 1024), np.uint8)), "train", r"uint8 array of shape \[N, 3072\]"),
        (lambda p: _rewrite(p, data=np.zeros((300, 3072), np.float32)), "test", "found float32"),
        (lambda p: _rewrite(p, fine_labels=[0] * 7), "train", "must hold 300 integer labels"),
        (lambda p: _rewrite(p, fine_labels=[100] * 50), "test", r"labels must lie in \[0, 100\)"),
        (lambda p: _dump(p, {b"fine_label_names": ["a", "b"]}), "meta", "must list 100 class names"),
        (lambda p: _dump(p, {b"pixels": 1}), "train", "no 'data' entry"),
        (lambda p: p.write_bytes(pickle.dumps([1, 2])), "test", "expected a pickled dict"),
    ],
)
def test_malformed_cifar_file_is_a_user_error_naming_the_file(tmp_path, corrupt, file, problem):
    write_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / file
    corrupt(path)
    with pytest.raises(UserError, match=problem) as info:
        load_dataset("cifar100", tmp_path)
    assert str(info.value).startswith(str(path))


def test_unknown_dataset_lists_the_valid_names(tmp_path):
    assert list_datasets() == ["cifar10", "cifar100", "digits", "imagefolder", "stl10", "tiny_imagenet"]
    with pytest.raises(UserError, match="unknown dataset 'imagenet'; valid datasets: cifar10, cifar100, digits, "
                                        "imagefolder, stl10, tiny_imagenet"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(UserError, match="'imagefolder' is a folder tree streamed through Ray Data"):
        load_dataset("imagefolder", tmp_path)


def test_digits_runs_offline_as_32x32_rgb_with_its_own_statistics(tmp_path):
    data = load_dataset("digits", tmp_path / "unused")
    assert data.num_classes == 10 and data.class_names == tuple("0123456789")
    assert (len(data.train), len(data.val), len(data.test)) == (1293, 144, 360)  # 1797 = 80/20, 10% of train to val
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert torch.equal(split.images[:, 0], split.images[:, 2])  # gray replicated to 3 channels
        assert set(split.labels.unique().tolist()) == set(range(10))
    assert data.train.images.max() >= 250  # 0..16 scaled to the full uint8 range
    # Mean / std of the whole training portion (train + val), per channel, on the [0, 1] scale.
    pixels = torch.cat([data.train.images, data.val.images]).double() / 255
    assert data.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist())
    assert data.std == pytest.approx(pixels.std(dim=(0, 2, 3)).tolist())


def test_digits_test_split_does_not_depend_on_the_seed(tmp_path):
    a, b = load_dataset("digits", tmp_path, seed=0), load_dataset("digits", tmp_path, seed=1)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.val.images, b.val.images)


class _Payload:
    """Pickles as a call of ``open(marker, "w")``: what a malicious dataset file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_dataset_file_that_would_run_code_is_refused_unrun(tmp_path):
    write_cifar100(tmp_path)
    train = tmp_path / "cifar-100-python" / "train"
    marker = tmp_path / "payload-ran"
    with open(train, "rb") as f:
        content = pickle.load(f, encoding="latin1")
    content["payload"] = _Payload(marker)
    _dump(train, content)
    with pytest.raises(UserError, match=r"refused for safety.*open"):
        load_dataset("cifar100", tmp_path)
    assert not marker.exists()
