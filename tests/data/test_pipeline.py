"""The batched input pipeline: augmentation, determinism, sharding, batching and output format."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semckd_ray.data import (
    BatchLoader,
    DatasetSplits,
    Split,
    eval_loader,
    random_crop_flip,
    sample_crop_flip,
    train_loader,
)

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def random_split(n: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 100, (n,), generator=g))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images * std + mean).mul(255).round().to(torch.uint8)


def all_crops(image: torch.Tensor) -> torch.Tensor:
    """The 81 crops x 2 flips of one zero-padded image [C, H, W]: [9, 9, 2, C, H, W]."""
    windows = F.pad(image, (4, 4, 4, 4)).unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4)
    return torch.stack([windows, windows.flip(-1)], dim=2)


def test_crop_flip_cuts_the_requested_window_of_the_zero_padded_image():
    images = torch.arange(1, 2 * 3 * 32 * 32 + 1).view(2, 3, 32, 32)  # every pixel distinct, none zero
    offsets = torch.tensor([[y, x] for y in range(9) for x in range(9)])
    for flip in (False, True):
        for image in images:
            batch = image.expand(len(offsets), -1, -1, -1)
            out = random_crop_flip(batch, offsets, torch.full((len(offsets),), flip))
            expected = all_crops(image)[offsets[:, 0], offsets[:, 1], int(flip)]
            assert torch.equal(out, expected)
    # The corner crops reach 4 pixels into the zero padding.
    corner = random_crop_flip(images[:1], torch.tensor([[0, 0]]), torch.tensor([False]))
    assert (corner[0, :, :4, :] == 0).all() and (corner[0, :, 4:, 4:] > 0).all()


def test_crop_offsets_are_uniform_and_flips_happen_half_the_time():
    offsets, flips = sample_crop_flip(40_000, torch.Generator().manual_seed(0))
    assert offsets.min() == 0 and offsets.max() == 8
    counts = torch.bincount(offsets[:, 0] * 9 + offsets[:, 1], minlength=81).float()
    assert counts.min() > 0.8 * 40_000 / 81 and counts.max() < 1.2 * 40_000 / 81
    assert abs(flips.float().mean().item() - 0.5) < 0.01


def test_training_batches_are_real_crops_of_their_own_images():
    split = random_split(64)
    loader = BatchLoader(split, MEAN, STD, 16, augment=True, shuffle=True, seed=1)
    flipped = 0
    for images, labels, index in loader:
        assert torch.equal(labels, split.labels[index])
        for out, i in zip(to_uint8(images), index):
            matches = (all_crops(split.images[i]) == out).flatten(3).all(-1).nonzero()
            assert len(matches) == 1
            flipped += int(matches[0, 2])
    assert 18 <= flipped <= 46


def test_normalisation_matches_to_tensor_then_normalize():
    split = random_split(10)
    images, _, _ = next(iter(BatchLoader(split, MEAN, STD, 10)))
    expected = (split.images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert images.dtype == torch.float32 and torch.allclose(images, expected, atol=1e-5)


def epoch(loader: BatchLoader, e: int) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(e)
    return list(loader)


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_same_seed_and_epoch_replay_identical_batches_and_other_epochs_differ():
    split = random_split(96)
    make = lambda seed: BatchLoader(split, MEAN, STD, 32, augment=True, shuffle=True, seed=seed)  # noqa: E731
    first, second = make(7), make(7)
    assert same_batches(epoch(first, 3), epoch(second, 3))
    assert same_batches(epoch(first, 3), epoch(first, 3))
    assert not torch.equal(epoch(first, 3)[0][2], epoch(first, 4)[0][2])  # order
    assert not torch.equal(epoch(first, 3)[0][0], epoch(make(8), 3)[0][0])
    # Same order, different augmentation from one epoch to the next.
    unshuffled = BatchLoader(split, MEAN, STD, 32, augment=True, seed=7)
    e0, e1 = epoch(unshuffled, 0), epoch(unshuffled, 1)
    assert torch.equal(e0[0][2], e1[0][2]) and not torch.equal(e0[0][0], e1[0][0])


def shards(n: int, world_size: int, **kwargs) -> list[list[int]]:
    split = random_split(n)
    out = []
    for rank in range(world_size):
        loader = BatchLoader(split, MEAN, STD, 8, rank=rank, world_size=world_size, seed=5, **kwargs)
        loader.set_epoch(2)
        out.append(torch.cat([index for _, _, index in loader]).tolist())
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_training_shards_are_disjoint_equal_and_cover_the_epoch(shuffle):
    parts = shards(96, 4, shuffle=shuffle, augment=True)
    assert [len(p) for p in parts] == [24] * 4
    assert sorted(sum(parts, [])) == list(range(96))


def test_uneven_training_shards_are_padded_by_wrapping_around():
    parts = shards(98, 4, shuffle=True)
    assert [len(p) for p in parts] == [25] * 4  # every rank takes the same number of steps
    everything = sum(parts, [])
    assert set(everything) == set(range(98)) and len(everything) == 100  # two samples seen twice


def test_evaluation_shards_see_every_sample_exactly_once():
    parts = shards(98, 4, pad_shards=False)
    assert [len(p) for p in parts] == [25, 25, 24, 24]
    assert sorted(sum(parts, [])) == list(range(98))


@pytest.mark.parametrize(("drop_last", "sizes"), [(False, [32, 32, 32, 4]), (True, [32, 32, 32])])
def test_drop_last_drops_only_the_partial_batch(drop_last, sizes):
    loader = BatchLoader(random_split(100), MEAN, STD, 32, shuffle=True, augment=True, drop_last=drop_last)
    batches = list(loader)
    assert [len(labels) for _, labels, _ in batches] == sizes and len(loader) == len(sizes)


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
@pytest.mark.parametrize("drop_last", [False, True])
def test_len_is_the_number_of_batches_each_rank_yields(world_size, drop_last):
    split = random_split(50)
    for rank in range(world_size):
        loader = BatchLoader(split, MEAN, STD, 4, drop_last=drop_last, rank=rank, world_size=world_size)
        assert len(loader) == len(list(loader))
        expected_samples = math.ceil(50 / world_size)
        assert len(loader) == (expected_samples // 4 if drop_last else math.ceil(expected_samples / 4))


def test_channels_last_changes_the_memory_format_not_the_values():
    split = random_split(20)
    plain = next(iter(BatchLoader(split, MEAN, STD, 8, augment=True, seed=2)))[0]
    cl = next(iter(BatchLoader(split, MEAN, STD, 8, augment=True, seed=2, channels_last=True)))[0]
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert not plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, plain)


def make_splits(n_train: int, n_test: int) -> DatasetSplits:
    return DatasetSplits("toy", random_split(n_train, 0), random_split(0), random_split(n_test, 1), 100, MEAN, STD,
                         tuple(map(str, range(100))))


def test_eval_loader_keeps_order_no_augmentation_and_the_partial_last_batch():
    data = make_splits(64, 70)
    loader = eval_loader(data, "test", 32)
    batches = list(loader)
    assert [len(labels) for _, labels, _ in batches] == [32, 32, 6] and len(loader) == 3
    assert torch.cat([index for _, _, index in batches]).tolist() == list(range(70))
    assert torch.equal(to_uint8(torch.cat([images for images, _, _ in batches])), data.test.images)
    assert list(eval_loader(data, "val", 32)) == [] and len(eval_loader(data, "val", 32)) == 0


def test_train_loader_shuffles_and_augments_the_training_split():
    data = make_splits(64, 10)
    loader = train_loader(data, 16, seed=3)
    images, labels, index = next(iter(loader))
    assert index.tolist() != list(range(16)) and torch.equal(labels, data.train.labels[index])
    assert not torch.equal(to_uint8(images), data.train.images[index])
    assert len(loader) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("placement", [{"keep_on_device": True}, {"pin_memory": True}, {}])
def test_cuda_batches_equal_cpu_batches(placement):
    split = random_split(100)
    make = lambda **kw: BatchLoader(split, MEAN, STD, 32, augment=True, shuffle=True, seed=4, **kw)  # noqa: E731
    on_cpu = epoch(make(), 1)
    on_cuda = epoch(make(device="cuda", channels_last=True, **placement), 1)
    for cpu_batch, cuda_batch in zip(on_cpu, on_cuda, strict=True):
        assert all(t.device.type == "cuda" for t in cuda_batch)
        assert torch.equal(cuda_batch[1].cpu(), cpu_batch[1]) and torch.equal(cuda_batch[2].cpu(), cpu_batch[2])
        assert torch.allclose(cuda_batch[0].cpu(), cpu_batch[0], atol=1e-6)
