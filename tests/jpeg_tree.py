"""A small class-per-folder image tree in ImageNet's layout, written with PIL, for tests and benchmarks.

``root/train/<class>/*`` and ``root/val/<class>/*``, as ``semckd_ray.data.imagefolder`` reads them.
The images are real files of the kinds an ImageNet tree holds: JPEGs of varied sizes and aspect
ratios, some of them grayscale, one PNG, and on request corrupt ones. A plain module (not a
fixture) so that the CLI tests and ``bench/imagenet_ingest.py`` can import it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["write_jpeg_tree", "class_name", "CORRUPT_MARK"]

CORRUPT_MARK = "corrupt"  # in the file name of every corrupt file, so that tests can find them
_GRAYSCALE_EVERY = 7  # every 7th image is written as a grayscale JPEG, as ImageNet has some
_DETAIL = 8  # images are a random 8x8 colour grid upscaled: cheap to encode, yet not constant


def class_name(c: int) -> str:
    """The folder name of class ``c``: a WordNet-id-like name that sorts in the order of ``c``."""
    return f"n{c:08d}"


def _image(rng: np.random.Generator, sizes: tuple[int, int], gray: bool, noise: int) -> Image.Image:
    width, height = (int(v) for v in rng.integers(sizes[0], sizes[1], size=2, endpoint=True))
    grid = Image.fromarray(rng.integers(0, 256, (_DETAIL, _DETAIL, 3), dtype=np.uint8))
    image = grid.resize((width, height), Image.BILINEAR)
    if noise:
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-noise, noise, (height, width, 3), dtype=np.int16,
                                                                  endpoint=True)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    return image.convert("L") if gray else image


def _write_split(folder: Path, classes: int, per_class: int, sizes, rng, png: bool, noise: int) -> list[Path]:
    written = []
    for c in range(classes):
        class_dir = folder / class_name(c)
        class_dir.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            image = _image(rng, sizes, (c * per_class + k) % _GRAYSCALE_EVERY == 0, noise)
            if png and c == 0 and k == 0:
                path = class_dir / f"{class_name(c)}_{k}.png"
                image.save(path)
            else:
                path = class_dir / f"{class_name(c)}_{k}.JPEG"
                image.save(path, quality=85)
            written.append(path)
    return written


def _write_corrupt(train: Path, classes: int, count: int, written: list[Path], rng) -> None:
    """``count`` extra training files that PIL cannot decode, spread over the classes: truncated JPEGs
    (a good file's first half) and garbage bytes, alternately."""
    for k in range(count):
        c = k % classes
        path = train / class_name(c) / f"{class_name(c)}_{CORRUPT_MARK}{k}.JPEG"
        if k % 2 == 0:
            good = written[k % len(written)].read_bytes()
            path.write_bytes(good[: len(good) // 2])
        else:
            path.write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())


def write_jpeg_tree(root: Path, classes: int = 10, train_per_class: int = 16, val_per_class: int = 4,
                    sizes: tuple[int, int] = (64, 96), seed: int = 0, corrupt: int = 0, noise: int = 0) -> Path:
    """Write ``classes`` classes of ``train_per_class`` training and ``val_per_class`` val images under ``root``.

    Each image's width and height are drawn independently in ``sizes`` (inclusive), so the aspect
    ratios vary; every 7th image is grayscale; the first training image of the first class is a
    PNG, all others are ``.JPEG`` files. ``corrupt`` more training files (names containing
    ``CORRUPT_MARK``) hold a truncated JPEG or garbage. ``noise``: uniform noise in [-noise, noise] added
    to every pixel (0-255 scale), for benchmarks: smooth images decode faster than photographs, and
    ``noise=60`` at 350-500 px gives JPEGs of ~100 kB, about ImageNet's average (~110 kB at
    ~470x390 px). Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    written = _write_split(root / "train", classes, train_per_class, sizes, rng, True, noise)
    _write_split(root / "val", classes, val_per_class, sizes, rng, False, noise)
    if corrupt:
        _write_corrupt(root / "train", classes, corrupt, written, rng)
    return root
