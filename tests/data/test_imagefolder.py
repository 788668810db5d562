"""The streamed class-per-folder image tree: listing and its errors, then the Ray Data pipeline on the
session's two-node cluster -- batch format, normalisation, the eval transform, sharding across two
consumers, per-epoch shuffles and corrupt files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from jpeg_tree import CORRUPT_MARK, class_name, write_jpeg_tree
from PIL import Image

from semckd_ray.data.imagefolder import (
    EVAL_SPLITS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FileSplit,
    FolderSplits,
    StreamLoader,
    build_datasets,
    check_image_folder,
    data_config,
    default_val_size,
    folder_num_classes,
    list_image_folder,
    random_resized_crop_box,
    shard_samples,
)
from semckd_ray.errors import UserError

SIZE, RESIZE = 32, 37  # small images keep the pipeline tests fast
TRANSFORM = dict(image_size=SIZE, crop_scale=(0.08, 1.0), eval_resize=RESIZE, seed=0)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """6 classes of 10 training and 3 val images, 2 corrupt training files more."""
    return write_jpeg_tree(tmp_path_factory.mktemp("tree"), classes=6, train_per_class=10, val_per_class=3,
                           corrupt=2)


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory) -> Path:
    return write_jpeg_tree(tmp_path_factory.mktemp("clean"), classes=6, train_per_class=10, val_per_class=3)


# ------------------------------------------------------------------------------------------
# Listing


def test_listing_numbers_sorted_class_folders_and_holds_out_val_by_seed(tree):
    splits = list_image_folder(tree, val_size=12, split_seed=3)
    assert splits.classes == tuple(class_name(c) for c in range(6)) and splits.num_classes == 6
    assert folder_num_classes(tree) == 6
    assert (len(splits.train), len(splits.val), len(splits.test)) == (62 - 12, 12, 18)
    for split in (splits.train, splits.val, splits.test):
        assert split.labels.dtype == np.int64 and len(split.labels) == len(split)
        assert all(os.path.isabs(p) for p in split.paths)
        assert [splits.classes[k] for k in split.labels] == [Path(p).parent.name for p in split.paths]
    assert all(Path(p).parts[-3] == "val" for p in splits.test.paths)
    train, val = set(splits.train.paths), set(splits.val.paths)
    assert not train & val and len(train | val) == 62
    assert train | val == {str(p) for p in (tree / "train").rglob("*") if p.is_file()}
    # Deterministic by split_seed, and another seed holds out other images.
    again = list_image_folder(tree, val_size=12, split_seed=3)
    assert again.val.paths == splits.val.paths and again.train.paths == splits.train.paths
    assert set(list_image_folder(tree, val_size=12, split_seed=4).val.paths) != val
    assert splits.mean == (0.485, 0.456, 0.406) and splits.std == (0.229, 0.224, 0.225)


def test_default_val_split_is_10000_images_or_a_tenth_of_train(tree):
    assert default_val_size(1_281_167) == 10_000 and default_val_size(50_000) == 5_000
    assert len(list_image_folder(tree, val_size=None, split_seed=0).val) == round(0.1 * 62)
    assert len(list_image_folder(tree, val_size=0, split_seed=0).val) == 0
    with pytest.raises(UserError, match=r"data.val_size must be an integer in \[0, 62\)"):
        list_image_folder(tree, val_size=62, split_seed=0)


def test_train_fraction_and_label_noise_act_on_the_training_split_only(clean_tree):
    full = list_image_folder(clean_tree, val_size=6, split_seed=1)
    few = list_image_folder(clean_tree, val_size=6, split_seed=1, train_fraction=0.5, label_noise=0.5)
    assert few.val.paths == full.val.paths and few.test.paths == full.test.paths
    kept = np.bincount(few.record.clean_labels.numpy(), minlength=6)
    available = few.record.available.numpy()
    assert kept.tolist() == [max(1, round(0.5 * n)) for n in available]
    assert set(few.train.paths) < set(full.train.paths)
    redrawn = few.record.redrawn.numpy()
    assert redrawn.sum() > 0
    assert (few.train.labels[~redrawn] == few.record.clean_labels.numpy()[~redrawn]).all()


def _bare_tree(root: Path, train: dict[str, int], val: dict[str, int] | None) -> Path:
    for split, counts in (("train", train), ("val", val)):
        if counts is None:
            continue
        (root / split).mkdir(parents=True)
        for name, count in counts.items():
            (root / split / name).mkdir()
            for k in range(count):
                Image.new("RGB", (8, 8)).save(root / split / name / f"{k}.JPEG")
    return root


@pytest.mark.parametrize("make, expected", [
    (lambda root: root / "absent", r"absent: no such folder"),
    (lambda root: root, r"no train/ folder"),
    (lambda root: _bare_tree(root, {}, {}), r"train: no class folders"),
    (lambda root: _bare_tree(root, {"cat": 2}, None), r"no val/ folder"),
    (lambda root: _bare_tree(root, {"cat": 2, "dog": 0}, {"cat": 1}), r"no image file in the class folder\(s\) dog"),
    (lambda root: _bare_tree(root, {"cat": 2}, {"cat": 0}), r"val: no image file in any class folder"),
    (lambda root: _bare_tree(root, {"cat": 2}, {"cat": 1, "cow": 1}), r"class folder\(s\) cow not in"),
], ids=["missing root", "empty folder", "no classes", "missing val", "empty class", "empty val", "unknown val class"])
def test_a_tree_not_in_the_layout_is_refused_with_the_layout_and_how_to_sort_val(tmp_path, make, expected):
    root = make(tmp_path)
    for call in (check_image_folder, lambda r: list_image_folder(r, val_size=0, split_seed=0)):
        with pytest.raises(UserError, match=expected) as info:
            call(root)
        assert "<root>/train/<class>/*.JPEG" in str(info.value) and "valprep.sh" in str(info.value)


def test_the_official_val_tarball_unsorted_is_refused_with_valprep(tmp_path):
    root = _bare_tree(tmp_path, {"cat": 2}, {})
    Image.new("RGB", (8, 8)).save(root / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(UserError, match=r"1 image files lie directly in val/ .*ILSVRC2012_val_00000001.*valprep.sh"):
        check_image_folder(root)


def test_crop_boxes_follow_torchvisions_random_resized_crop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(300, 400, (0.08, 1.0), rng)
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        assert 0.08 * 120_000 * 0.9 < h * w < 120_000 * 1.01 and 3 / 4 * 0.9 < w / h < 4 / 3 * 1.1
    # No crop of 90-100% of a 10x1000 strip has an aspect ratio in [3/4, 4/3]: the central fallback.
    assert random_resized_crop_box(10, 1000, (0.9, 1.0), rng) == (0, (1000 - 13) // 2, 10, 13)


def test_shard_samples():
    assert [shard_samples(11, 3, r, equal=True) for r in range(3)] == [3, 3, 3]
    assert [shard_samples(11, 3, r, equal=False) for r in range(3)] == [4, 4, 3]


# ------------------------------------------------------------------------------------------
# The pipeline on the session's cluster


def loader(shard, num_samples: int, batch_size: int = 8, drop_last: bool = False, **options) -> StreamLoader:
    return StreamLoader(shard, IMAGENET_MEAN, IMAGENET_STD, batch_size, num_samples=num_samples, drop_last=drop_last,
                        device="cpu", **options)


def indices(batches) -> list[int]:
    return [i for _, _, index in batches for i in index.tolist()]


def test_batches_have_the_training_loops_format(ray_cluster, clean_tree):
    splits = list_image_folder(clean_tree, val_size=6, split_seed=0)
    datasets = build_datasets(splits, **TRANSFORM)
    assert sorted(datasets) == ["test", "train", "val"]
    for name, drop_last in (("train", True), ("val", False), ("test", False)):
        split = getattr(splits, name)
        stream = loader(datasets[name].iterator(), len(split), drop_last=drop_last)
        batches = list(stream)
        assert len(batches) == len(stream) == (len(split) // 8 if drop_last else -(-len(split) // 8))
        images, labels, index = batches[0]
        assert images.shape == (min(8, len(split)), 3, SIZE, SIZE) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and index.dtype == torch.int64
        seen = indices(batches)
        assert len(set(seen)) == len(seen) and set(seen) <= set(range(len(split)))
        for _, labels, index in batches:
            assert labels.tolist() == split.labels[index.numpy()].tolist()
        assert stream.skipped_last_epoch == []
    nhwc = loader(datasets["test"].iterator(), len(splits.test), channels_last=True)
    assert all(images.is_contiguous(memory_format=torch.channels_last) for images, _, _ in nhwc)
    assert "val" not in build_datasets(list_image_folder(clean_tree, val_size=0, split_seed=0), **TRANSFORM)


def test_normalisation_of_constant_colour_images(ray_cluster, tmp_path):
    colours = [(0, 128, 255), (200, 30, 90)]
    for split in ("train", "val"):
        for c, colour in enumerate(colours):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for k in range(3):
                Image.new("RGB", (50 + 10 * k, 40), colour).save(tmp_path / split / f"c{c}" / f"{k}.png")
    splits = list_image_folder(tmp_path, val_size=0, split_seed=0)
    datasets = build_datasets(splits, **TRANSFORM)
    mean, std = torch.tensor(splits.mean).view(3, 1, 1), torch.tensor(splits.std).view(3, 1, 1)
    for name in ("train", "test"):
        batches = list(loader(datasets[name].iterator(), 6))
        assert sum(len(labels) for _, labels, _ in batches) == 6
        for images, labels, _ in batches:
            for image, label in zip(images, labels):
                colour = torch.tensor(colours[label], dtype=torch.float32).view(3, 1, 1)
                expected = ((colour / 255 - mean) / std).expand(3, SIZE, SIZE)
                torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)


def test_eval_transform_is_torchvisions_resize_and_center_crop(ray_cluster, clean_tree):
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    splits = list_image_folder(clean_tree, val_size=0, split_seed=0)
    test = build_datasets(splits, **TRANSFORM)["test"]
    reference = v2.Compose([v2.Resize(RESIZE), v2.CenterCrop(SIZE)])
    passes = []
    for _ in range(2):
        rows = {}
        for batch in test.iter_batches(batch_size=None, batch_format="numpy"):
            rows.update(zip(batch["index"].tolist(), batch["image"]))
        passes.append(rows)
    assert sorted(passes[0]) == list(range(len(splits.test)))
    for i, image in passes[0].items():
        assert image.dtype == np.uint8 and image.shape == (3, SIZE, SIZE)
        np.testing.assert_array_equal(image, passes[1][i])
        expected = reference(decode_image(splits.test.paths[i], mode=ImageReadMode.RGB)).numpy()
        np.testing.assert_array_equal(image, expected)


def consume(shards: list, num_samples: list[int], batch_size: int = 4, drop_last: bool = False) -> list:
    """One epoch of every shard, each in its own thread (``streaming_split`` shards start together)."""
    loaders = [loader(shard, n, batch_size, drop_last) for shard, n in zip(shards, num_samples)]
    seen: list = [None] * len(shards)

    def run(k):
        seen[k] = indices(loaders[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(s is not None for s in seen), "a shard's consumer failed or hung"
    return seen


def test_two_workers_train_on_equal_disjoint_shards_and_evaluate_each_sample_once(ray_cluster, clean_tree):
    splits = list_image_folder(clean_tree, val_size=7, split_seed=0)  # 53 train, 7 val, 18 test
    datasets = build_datasets(splits, **TRANSFORM)
    config = data_config(decode_cpus=1)
    shards = config.configure(datasets, world_size=2, worker_handles=None, worker_node_ids=None)
    assert [sorted(s) for s in shards] == [["test", "train", "val"]] * 2
    assert shards[0]["train"].get_context().execution_options.resource_limits.cpu == 1
    n = len(splits.train)
    epochs = []
    for _ in range(2):
        train = consume([s["train"] for s in shards], [shard_samples(n, 2, r, equal=True) for r in range(2)])
        assert len(train[0]) == len(train[1]) == n // 2
        assert len(set(train[0] + train[1])) == 2 * (n // 2)  # disjoint, none twice
        epochs.append(train)
    assert epochs[0] != epochs[1]  # reshuffled for the second epoch
    for name in EVAL_SPLITS:
        m = len(getattr(splits, name))
        seen = consume([s[name] for s in shards], [shard_samples(m, 2, r, equal=False) for r in range(2)])
        assert sorted(seen[0] + seen[1]) == list(range(m))


def test_a_corrupt_file_is_replaced_in_its_batch_and_reported(ray_cluster, tree):
    splits = list_image_folder(tree, val_size=0, split_seed=0)
    corrupt = sorted(p for p in splits.train.paths if CORRUPT_MARK in p)
    assert len(corrupt) == 2
    stream = loader(build_datasets(splits, **TRANSFORM)["train"].iterator(), len(splits.train))
    batches = list(stream)
    assert sum(len(labels) for _, labels, _ in batches) == len(splits.train)  # replaced, not dropped
    assert sorted(stream.skipped_last_epoch) == corrupt
    seen = indices(batches)
    bad = {splits.train.paths.index(p) for p in corrupt}
    assert not bad & set(seen) and len(seen) - len(set(seen)) == 2  # two good samples twice instead


def test_a_decode_batch_without_a_decodable_file_names_its_files(ray_cluster, tree):
    splits = list_image_folder(tree, val_size=0, split_seed=0)
    corrupt = tuple(sorted(p for p in splits.train.paths if CORRUPT_MARK in p))
    broken = FolderSplits(splits.root, splits.classes, splits.train, FileSplit((), np.zeros(0, np.int64)),
                          FileSplit(corrupt, np.zeros(len(corrupt), np.int64)))
    datasets = build_datasets(broken, **TRANSFORM)
    shard = data_config(None).configure(datasets, world_size=1, worker_handles=None, worker_node_ids=None)[0]["test"]
    with pytest.raises(UserError, match="none of the 2 images of a decode batch could be decoded") as info:
        list(loader(shard, len(corrupt)))
    assert all(p in str(info.value) for p in corrupt)
