"""The input pipeline: batches cut from an in-memory uint8 split, augmented as batched tensor ops.

The paper's augmentation (``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``) is cheap per
pixel, but done per image in PIL by DataLoader workers it costs Python overhead per image and
competes with training for CPU cores; with a GPU training a small CIFAR student at thousands of
images a second, it becomes the bottleneck. Here a batch is gathered from the uint8 split, padded
once, cropped and flipped in one gather of row-sized windows on the batch's device, and normalised
by one in-place multiply and add.

Randomness comes only from CPU ``torch.Generator``s seeded by (seed, epoch[, rank]) and is drawn for
the whole epoch when it starts (three numbers per image), so a run with the same seed, epoch and rank
yields bit-identical batches on any device -- resuming at an epoch boundary replays exactly what an
uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from semckd_ray.data.datasets import DatasetSplits, Split

__all__ = ["Batch", "BatchLoader", "train_loader", "eval_loader", "random_crop_flip", "sample_crop_flip"]

Batch = tuple[Tensor, Tensor, Tensor]  # images float [B,3,32,32] normalised, labels int64 [B], dataset index int64 [B]

CROP_PADDING = 4

# Independent random streams derived from the same seed.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from ``key``; SeedSequence keeps neighbouring keys' streams unrelated."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0]))


def sample_crop_flip(n: int, generator: torch.Generator, padding: int = CROP_PADDING) -> tuple[Tensor, Tensor]:
    """Draw what ``RandomCrop(padding=p)`` + ``RandomHorizontalFlip()`` draw for ``n`` images.

    Returns crop offsets int64 [n, 2] (row, column), each uniform in [0, 2p], and flips bool [n],
    each true with probability 1/2 -- independently per image, as torchvision does.
    """
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.randint(0, 2, (n,), generator=generator).bool()
    return offsets, flips


def random_crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int = CROP_PADDING) -> Tensor:
    """Crop each image of ``images`` [B,C,H,W] from its zero-padded copy at ``offsets``, then flip it where ``flips``.

    Every row of a crop is W contiguous elements of the padded image -- or of its mirror image,
    whose crop at column ``2p - x`` is the mirrored crop at ``x`` -- so crop and flip together are
    one ``index_select`` of row-sized windows, several times faster on a CPU than gathering
    element by element. Any dtype and device; ``offsets`` / ``flips`` must be on the images' device.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    both = torch.stack([padded, padded.flip(-1)])  # [2, B, C, H + 2p, W + 2p]
    plane = (h + 2 * padding) * (w + 2 * padding)
    row = w + 2 * padding
    dev = images.device
    col = torch.where(flips, 2 * padding - offsets[:, 1], offsets[:, 1])
    image_start = (flips.long() * b + torch.arange(b, device=dev)) * (c * plane) + offsets[:, 0] * row + col
    row_starts = (
        image_start[:, None, None]
        + (torch.arange(c, device=dev) * plane)[None, :, None]
        + (torch.arange(h, device=dev) * row)[None, None, :]
    )
    windows = both.view(-1).unfold(0, w, 1)  # windows[i] = the w elements from flat position i
    return windows.index_select(0, row_starts.view(-1)).view(b, c, h, w)


def normalisation(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` [1, C, 1, 1] on ``device`` with ``x * scale + shift == (x / 255 - mean) / std``:
    a uint8 batch normalised by one multiply and one add."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std_t), -mean_t / std_t


class BatchLoader:
    """Iterates over one split in batches ``(images, labels, index)``; ``len()`` is batches per epoch.

    ``index`` is each sample's position in the split (CRD's memory bank is keyed by it).

    Order: with ``shuffle`` a fresh permutation per epoch from (``seed``, epoch) -- call
    ``set_epoch(e)`` before each epoch, as with ``DistributedSampler``.

    Sharding: rank ``rank`` of ``world_size`` takes every ``world_size``-th index of the epoch's
    order, so shards are disjoint. With ``pad_shards`` (training) the order is first padded by
    wrapping around to a multiple of ``world_size``, exactly as ``DistributedSampler(drop_last=False)``
    does: every rank gets ``ceil(N / world_size)`` samples and takes the same number of steps, and
    up to ``world_size - 1`` samples are seen twice per epoch. Without it (evaluation) every sample
    is seen exactly once and shard sizes may differ by one, so ranks may take different numbers of
    steps: combine evaluation results once at the end, not per step.

    ``cut_shards`` (instead of ``pad_shards``) cuts the order to a multiple of ``world_size``, as
    ``DistributedSampler(drop_last=True)`` does: equal shards, each sample seen at most once.

    ``drop_last`` drops this rank's last partial batch.

    Placement: the uint8 split is copied to ``device`` once when ``keep_on_device`` (150 MB for
    CIFAR); otherwise batches are gathered on the CPU and copied over, from pinned memory with
    non-blocking copies when ``pin_memory`` and ``device`` is CUDA. Augmentation and
    normalisation run on ``device``. ``channels_last`` sets the memory format of the images.
    """

    def __init__(
        self,
        split: Split,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        *,
        augment: bool = False,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_shards: bool = True,
        cut_shards: bool = False,
        device: torch.device | str = "cpu",
        keep_on_device: bool = False,
        channels_last: bool = False,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad_shards = pad_shards
        self.cut_shards = cut_shards and not pad_shards
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.epoch = 0

        self._data_on_device = keep_on_device or self.device.type == "cpu"
        data_device = self.device if self._data_on_device else torch.device("cpu")
        self._images = split.images.to(data_device)
        self._labels = split.labels.to(data_device)
        self._pin = pin_memory and not self._data_on_device and self.device.type == "cuda"
        self._scale, self._shift = normalisation(mean, std, self.device)

    @property
    def dataset_size(self) -> int:
        return len(self._labels)

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch (before ``drop_last``)."""
        n = self.dataset_size
        if self.pad_shards:
            return math.ceil(n / self.world_size)
        if self.cut_shards:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration replays."""
        self.epoch = epoch

    def epoch_indices(self) -> Tensor:
        """This rank's dataset indices for the current epoch, in order (CPU int64)."""
        n = self.dataset_size
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, self.epoch, _SHUFFLE_STREAM))
        else:
            order = torch.arange(n)
        if self.pad_shards and n:
            total = self.num_samples * self.world_size
            order = order.repeat(math.ceil(total / n))[:total]
        elif self.cut_shards:
            order = order[: self.num_samples * self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        used = len(self) * self.batch_size
        indices = self.epoch_indices()[:used]
        if self.augment:
            generator = _generator(self.seed, self.epoch, self.rank, _AUGMENT_STREAM)
            offsets, flips = sample_crop_flip(len(indices), generator)
            offsets, flips = offsets.to(self.device), flips.to(self.device)
        indices = indices.to(self._images.device)
        for start in range(0, len(indices), self.batch_size):
            batch = slice(start, start + self.batch_size)
            images, labels, index = self._gather(indices[batch])
            if self.augment:
                images = random_crop_flip(images, offsets[batch], flips[batch])
            images = images.float().mul_(self._scale).add_(self._shift)
            if self.channels_last:  # last: per-channel broadcasts over NHWC are several times slower on a CPU
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels, index

    def _gather(self, index: Tensor) -> Batch:
        """The batch's uint8 images, labels and index, on ``self.device``."""
        if self._data_on_device:
            return self._images.index_select(0, index), self._labels.index_select(0, index), index
        images = torch.empty((len(index), *self._images.shape[1:]), dtype=torch.uint8, pin_memory=self._pin)
        labels = torch.empty(len(index), dtype=torch.int64, pin_memory=self._pin)
        torch.index_select(self._images, 0, index, out=images)
        torch.index_select(self._labels, 0, index, out=labels)
        if self._pin:
            index = index.pin_memory()
        # Pinned buffers come from PyTorch's caching host allocator, which does not reuse them
        # before their asynchronous copies have finished.
        return tuple(t.to(self.device, non_blocking=self._pin) for t in (images, labels, index))


def train_loader(
    data: DatasetSplits,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    **placement,
) -> BatchLoader:
    """The training loader of ``data``: shuffled, augmented as in the paper, shards of equal length.

    ``batch_size`` is the per-worker batch. Shards are padded to equal length by wrapping around
    (``DistributedSampler``'s default) or, with ``drop_last``, cut to it, so that an epoch has the
    same number of steps of the same global batch at any ``world_size``: ``ceil(N / global batch)``,
    or ``N // global batch`` with ``drop_last``.

    ``placement``: ``device``, ``keep_on_device``, ``channels_last``, ``pin_memory`` (see ``BatchLoader``).
    """
    return BatchLoader(
        data.train, data.mean, data.std, batch_size,
        augment=True, shuffle=True, drop_last=drop_last, seed=seed, rank=rank, world_size=world_size,
        pad_shards=not drop_last, cut_shards=drop_last, **placement,
    )  # fmt: skip


def eval_loader(
    data: DatasetSplits,
    split: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    **placement,
) -> BatchLoader:
    """A loader over ``data.val`` or ``data.test`` (``split``): no augmentation, fixed order, partial last batch kept.

    Sharded without padding, so each image is evaluated exactly once across ranks.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    return BatchLoader(
        getattr(data, split), data.mean, data.std, batch_size,
        rank=rank, world_size=world_size, pad_shards=False, **placement,
    )  # fmt: skip
