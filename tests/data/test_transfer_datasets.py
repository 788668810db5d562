"""STL-10 and Tiny ImageNet from small files in their official layouts: shapes, labels, class names,
the 32x32 resize, and the errors for missing, truncated and foreign files."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from semckd_ray.data import check_dataset, load_dataset, needs_files, num_classes, prepare_dataset
from semckd_ray.data import datasets as datasets_module
from semckd_ray.errors import UserError

STL10_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def reference_resize(images: torch.Tensor) -> torch.Tensor:
    """What the loaders document: bilinear with antialias on float32, rounded back to uint8."""
    out = F.interpolate(images.float(), size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------
# STL-10


def write_stl10(root: Path, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    """An stl10_binary/ folder: images [N, 3, 96, 96] (row-major here) written column-major, labels 1..10."""
    rng = np.random.default_rng(0)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        images[0] = 0
        images[0, :, :48, :] = 255  # image 0: top half white, bottom half black
        labels = np.arange(n) % 10  # 0-based here, 1..10 on disk
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        arrays[split], arrays[split + "_labels"] = images, labels
    (folder / "class_names.txt").write_text("\n".join(STL10_NAMES) + "\n")
    return arrays


def test_stl10_reads_the_binary_layout_resized_to_32x32(tmp_path):
    arrays = write_stl10(tmp_path)
    data = load_dataset("stl10", tmp_path, val_size=0)
    assert data.name == "stl10" and data.num_classes == 10 == num_classes("stl10")
    assert data.class_names == tuple(STL10_NAMES)
    for split, key in ((data.train, "train"), (data.test, "test")):
        assert split.images.dtype == torch.uint8 and split.images.shape == (len(arrays[key]), 3, 32, 32)
        assert split.labels.tolist() == arrays[key + "_labels"].tolist()  # 1..10 on disk, 0..9 here
        assert torch.equal(split.images, reference_resize(torch.from_numpy(arrays[key])))
    # Column-major planes read the right way round: the white half is the top, not the left.
    first = data.train.images[0].float()
    assert first[:, :15].min() == 255 and first[:, 17:].max() == 0
    # Mean and std of the resized training images.
    pixels = data.train.images.double() / 255
    assert data.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist())
    assert data.std == pytest.approx(pixels.std(dim=(0, 2, 3)).tolist())


def test_stl10_holds_out_a_tenth_of_the_training_images_by_default(tmp_path):
    write_stl10(tmp_path)
    data = load_dataset("stl10", tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (18, 2, 10)


def test_missing_stl10_says_how_to_provide_it(tmp_path):
    assert needs_files("stl10") and needs_files("tiny_imagenet")
    for call in (lambda: load_dataset("stl10", tmp_path / "data"), lambda: check_dataset("stl10", tmp_path / "data")):
        with pytest.raises(UserError) as info:
            call()
        message = str(info.value)
        assert f"{tmp_path / 'data'}/stl10_binary/" in message
        for name in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt"):
            assert name in message
        assert "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz" in message
        assert f"tar -xzf stl10_binary.tar.gz -C {tmp_path / 'data'}" in message
        assert "data.download: true" in message


def test_stl10_downloads_through_torchvisions_url_and_checksum(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        write_stl10(Path(root))

    monkeypatch.setattr(datasets_module, "download_and_extract_archive", fake_download)
    prepare_dataset("stl10", tmp_path, download=True)
    assert calls == [("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "stl10_binary.tar.gz",
                      "91f7769df0f17e558f3565bffb0c7dfb")]
    assert len(load_dataset("stl10", tmp_path, download=True, val_size=0).train) == 20
    assert len(calls) == 1  # present now: not downloaded again


def test_failed_stl10_download_leaves_the_manual_route(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(datasets_module, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match=r"downloading STL-10 failed .*no route to host.*tar -xzf") as info:
        load_dataset("stl10", tmp_path, download=True)
    assert "data.download: true" not in str(info.value)


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


@pytest.mark.parametrize(("corrupt", "file", "problem"), [
    (_cut, "train_X.bin", r"holds 551960 bytes, expected 20 images of 3x96x96 bytes"),
    (_cut, "test_X.bin", r"expected 10 images"),
    (lambda p: p.write_bytes(bytes([1, 2, 11])), "train_y.bin", r"labels must lie in \[1, 10\]"),
    (lambda p: p.write_bytes(b""), "test_y.bin", "holds no label"),
    (lambda p: p.write_text("a\nb\n"), "class_names.txt", "must list 10 class names"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00"), "class_names.txt", "not a text file"),
])
def test_malformed_stl10_file_is_a_user_error_naming_the_file(tmp_path, corrupt, file, problem):
    write_stl10(tmp_path)
    path = tmp_path / "stl10_binary" / file
    corrupt(path)
    for call in (lambda: check_dataset("stl10", tmp_path), lambda: load_dataset("stl10", tmp_path, val_size=0)):
        with pytest.raises(UserError, match=problem) as info:
            call()
        assert str(info.value).startswith(str(path))


# ------------------------------------------------------------------------------------------
# Tiny ImageNet: the loader wants the official 200 classes, so the tree has 200 wnids with a few
# images each. Each image is one colour that encodes its class, so labels can be read back from pixels.

CLASSES = 200


def wnid(k: int) -> str:
    return f"n{10_000_000 + 7 * k:08d}"  # wnids.txt is not in sorted order below: classes follow sorted wnids


def colour(k: int) -> tuple[int, int, int]:
    return (k % 20) * 12, (k // 20) * 24, 200


def _jpeg(path: Path, rgb: tuple[int, int, int], size=(64, 64), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, rgb)
    (image.convert("L") if mode == "L" else image).save(path, "JPEG", quality=95)


def write_tiny_imagenet(root: Path, per_class: int = 2, val_classes: int = 5) -> Path:
    folder = root / "tiny-imagenet-200"
    ids = [wnid(k) for k in range(CLASSES)]
    (folder).mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(reversed(ids)) + "\n")
    words = [f"{w}\tclass{k}, synonym{k}" for k, w in enumerate(ids)] + ["n99999999\tunused, other"]
    (folder / "words.txt").write_text("\n".join(words) + "\n")
    for k, w in enumerate(ids):
        for i in range(per_class):
            _jpeg(folder / "train" / w / "images" / f"{w}_{i}.JPEG", colour(k))
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")  # in the official tree; not an image
    lines = []
    for i in range(val_classes * 2):
        k = (i * 37) % CLASSES
        _jpeg(folder / "val" / "images" / f"val_{i}.JPEG", colour(k))
        lines.append(f"val_{i}.JPEG\t{wnid(k)}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def _classes_from_pixels(images: torch.Tensor) -> list[int]:
    mean = images.double().mean(dim=(2, 3))
    return [int(round(float(r) / 12)) + 20 * int(round(float(g) / 24)) for r, g, _ in mean]


def test_tiny_imagenet_reads_the_official_tree_resized_to_32x32(tmp_path):
    write_tiny_imagenet(tmp_path)
    data = load_dataset("tiny_imagenet", tmp_path, val_size=0)
    assert data.num_classes == 200 == num_classes("tiny_imagenet")
    assert data.class_names[:2] == ("class0", "class1")  # sorted wnids, first name of words.txt
    assert data.train.images.shape == (400, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.train.labels.tolist() == [k for k in range(CLASSES) for _ in range(2)]
    assert _classes_from_pixels(data.train.images) == data.train.labels.tolist()
    # The official val split is the test split, labelled by val_annotations.txt.
    assert data.test.labels.tolist() == [(i * 37) % CLASSES for i in range(10)]
    assert _classes_from_pixels(data.test.images) == data.test.labels.tolist()
    assert data.mean == pytest.approx((data.train.images.double() / 255).mean(dim=(0, 2, 3)).tolist())


def test_tiny_imagenet_resize_is_antialiased_bilinear(tmp_path):
    folder = write_tiny_imagenet(tmp_path, per_class=1, val_classes=1)
    path = folder / "train" / wnid(0) / "images" / f"{wnid(0)}_0.JPEG"
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "PNG")  # PIL reads it whatever the name: exact pixels
    decoded = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None]
    data = load_dataset("tiny_imagenet", tmp_path, val_size=0)
    assert torch.equal(data.train.images[:1], reference_resize(decoded))


def test_tiny_imagenet_grayscale_images_become_rgb(tmp_path):
    folder = write_tiny_imagenet(tmp_path, per_class=1, val_classes=1)
    _jpeg(folder / "train" / wnid(3) / "images" / f"{wnid(3)}_0.JPEG", (90, 90, 90), mode="L")
    image = load_dataset("tiny_imagenet", tmp_path, val_size=0).train.images[3]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_missing_tiny_imagenet_says_how_to_provide_it(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(UserError) as info:
        load_dataset("tiny_imagenet", root)
    message = str(info.value)
    assert f"{root}/tiny-imagenet-200/" in message
    for part in ("wnids.txt", "words.txt", "train/<wnid>/images/*.JPEG", "val/images/*.JPEG", "val_annotations.txt"):
        assert part in message
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in message
    assert f"unzip -q tiny-imagenet-200.zip -d {root}" in message and "data.download: true" in message


def test_tiny_imagenet_download_that_leaves_files_missing_is_a_user_error(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(datasets_module, "download_and_extract_archive", lambda *a, **k: calls.append((a, k)))
    with pytest.raises(UserError, match="downloaded and extracted .* still missing"):
        prepare_dataset("tiny_imagenet", tmp_path, download=True)
    assert calls[0][1] == {"filename": "tiny-imagenet-200.zip", "md5": "90528d7ca1a48142e341f4ef8d21d0de"}
    check_dataset("tiny_imagenet", tmp_path / "new", download=True)  # missing, but it could be downloaded there


def _truncate_jpeg(folder: Path) -> Path:
    path = folder / "train" / wnid(5) / "images" / f"{wnid(5)}_1.JPEG"
    path.write_bytes(path.read_bytes()[:200])
    return path


def _small_image(folder: Path) -> Path:
    path = folder / "val" / "images" / "val_3.JPEG"
    _jpeg(path, (1, 2, 3), size=(32, 32))
    return path


def _few_wnids(folder: Path) -> Path:
    path = folder / "wnids.txt"
    path.write_text("\n".join(path.read_text().split()[:3]))
    return path


def _unknown_wnid(folder: Path) -> Path:
    path = folder / "val" / "val_annotations.txt"
    path.write_text(path.read_text() + "val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    return path


def _missing_val_image(folder: Path) -> Path:
    (folder / "val" / "images" / "val_4.JPEG").unlink()
    return folder / "val" / "val_annotations.txt"


def _empty_class(folder: Path) -> Path:
    images = folder / "train" / wnid(7) / "images"
    for p in images.iterdir():
        p.unlink()
    return images


def _unnamed_class(folder: Path) -> Path:
    path = folder / "words.txt"
    path.write_text("\n".join(line for line in path.read_text().splitlines() if not line.startswith(wnid(9))))
    return path


@pytest.mark.parametrize(("corrupt", "problem", "checked"), [
    (_truncate_jpeg, "cannot be decoded as an image", False),  # found when decoding: check lists, not decodes
    (_small_image, "a 32x32 image, but every Tiny ImageNet image is 64x64", False),
    (_few_wnids, "must list 200 distinct wnids", True),
    (_unknown_wnid, "line 7: expected .* with a wnid of wnids.txt", True),
    (_missing_val_image, "val_4.JPEG is not in", True),
    (_empty_class, "no .JPEG image of class", True),
    (_unnamed_class, "names no class for 1 wnid", True),
])
def test_malformed_tiny_imagenet_is_a_user_error_naming_the_file(tmp_path, corrupt, problem, checked):
    folder = write_tiny_imagenet(tmp_path, per_class=2, val_classes=3)
    path = corrupt(folder)
    with pytest.raises(UserError, match=problem) as info:
        load_dataset("tiny_imagenet", tmp_path, val_size=0)
    assert str(info.value).startswith(str(path))
    if checked:
        with pytest.raises(UserError, match=problem):
            check_dataset("tiny_imagenet", tmp_path)
    else:
        check_dataset("tiny_imagenet", tmp_path)


def test_every_dataset_read_in_a_layout_of_its_own_has_its_format():
    from semckd_ray.data import catalog

    assert {n for n, info in catalog.DATASETS.items() if info.root_files} == set(datasets_module._ROOT_FORMATS)
    assert all(fmt.info is catalog.DATASETS[n] for n, fmt in datasets_module._ROOT_FORMATS.items())
