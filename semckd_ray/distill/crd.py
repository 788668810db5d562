"""Contrastive Representation Distillation (Tian et al., ICLR 2020), as RepDistiller's ``crd/``.

The pooled feature vectors of both models are embedded (Linear + L2 normalisation, 128-d) and
trained with an NCE objective in both directions: the student's embedding of a sample must pick
out the teacher's embedding of the same sample among ``nce_k`` embeddings of other samples, and
vice versa. The other samples' embeddings come from a memory bank with one slot per training
sample per model, updated by momentum after every step, which is why the method needs the batch's
dataset indices.

Negatives are drawn as RepDistiller's ``CIFAR100InstanceSample`` in ``exact`` mode does: for each
sample, ``nce_k`` training samples of other classes, without replacement unless there are fewer
than that. The draw happens here rather than in the data loader, from ``ctx.train_labels``; without
labels it falls back to RepDistiller's sampler-less path, uniform over the whole memory.

At ImageNet's 1.28M samples the bank is 1.3 GB (two banks of feat_dim floats per sample), allocated
once on the device that trains (``ctx.device``) after checking it fits there, and no step touches
O(N) memory: negatives come from a sampler over the class-sorted sample order (O(B K) per step) and
the scores from gathering the picked rows. Small training sets (CIFAR) keep the dense path, where
one [B, N] product is cheaper than a [B, 1 + K, feat_dim] gather.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from semckd_ray.distill.base import DistillContext, DistillMethod, register_method
from semckd_ray.distill.catalog import CRDSpec
from semckd_ray.errors import UserError

__all__ = ["CRD", "Embed", "nce_loss", "memory_bank_bytes", "check_memory_bank_fits"]

_NCE_EPS = 1e-7  # RepDistiller's crd/criterion.py eps


class Embed(nn.Module):
    """Flatten, Linear, L2-normalise each row (no epsilon, as RepDistiller's ``Normalize``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x.flatten(1))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()


def nce_loss(probs: Tensor, noise: float) -> Tensor:
    """RepDistiller's ``ContrastLoss``: NCE with the positive in column 0 and K negatives after it.

    ``probs`` are the unnormalised model probabilities exp(score / T) / Z, ``noise`` is K times the
    uniform noise probability 1 / num_train.
    """
    pos, neg = probs[:, 0], probs[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + _NCE_EPS))
    log_d0 = torch.log(noise / (neg + noise + _NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / probs.shape[0]


def _gather_rows(*tensors: Tensor) -> list[Tensor]:
    """Each tensor's rows from every rank, in rank order; the ranks' batch sizes may differ."""
    world = dist.get_world_size()
    count = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    gathered = []
    for t in tensors:
        padded = t.new_zeros((max(counts), *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([p[:c] for p, c in zip(parts, counts)]))
    return gathered


# Above B x N elements per step, negatives come from the sparse sampler (CIFAR: 64 x 45000 = 2.9M).
_DENSE_MAX_ELEMENTS = 1 << 24


def memory_bank_bytes(num_train: int, feat_dim: int) -> int:
    """Bytes of CRD's two float32 memory banks (one row per training sample each)."""
    return 2 * num_train * feat_dim * 4


def _free_bytes(device: torch.device) -> int | None:
    """Memory free on ``device`` now, or None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available
    return None


def check_memory_bank_fits(num_train: int, feat_dim: int, device: torch.device) -> None:
    """A ``UserError`` naming the memory the bank would take when ``device`` has less free."""
    need, free = memory_bank_bytes(num_train, feat_dim), _free_bytes(device)
    if free is not None and need > free:
        gib = 1 << 30
        raise UserError(
            f"crd's memory bank needs {need / gib:.2f} GiB on {device} (2 banks x {num_train} training samples "
            f"x feat_dim {feat_dim} x 4 bytes), which has {free / gib:.2f} GiB free: lower "
            "method.options.feat_dim, train on fewer samples (data.train_fraction) or use a device with more memory"
        )


@register_method
class CRD(CRDSpec, DistillMethod):
    """CRD on the pooled feature vectors ``feats[-1]``.

    Under ``torch.distributed`` the memory bank stays identical on every rank without DDP's help:
    the first step broadcasts rank 0's random initial memory and averages the normalisation
    constants over ranks, and every step gathers all ranks' embeddings and indices before the
    momentum update, so each rank's memory sees every sample. Hence ``syncs_own_buffers``: DDP must
    not overwrite the memory with rank 0's copy (which has seen only rank 0's samples in the
    reference's DDP mode). The forward then makes collective calls, so every rank must run it.
    """

    # name, default_beta, Options: CRDSpec (semckd_ray.distill.catalog)
    needs_index = True
    syncs_own_buffers = True
    # Its random negatives alone would replay fine (the CUDA generator advances with each replay) and so
    # would the in-place memory update, but the forward reads GPU values on the CPU: bool(self.z[0] < 0)
    # every step, and too_few.any(), a data-dependent branch whose captured side would be replayed for
    # every batch, right or not.
    graph_unsafe_reason = ("CRD's forward reads GPU values on the CPU to choose its path (whether its NCE "
                           "constants are set yet; whether some class has fewer than nce_k negatives), and a "
                           "graph would replay one path for every batch")

    def __init__(self, ctx: DistillContext, options: CRDSpec.Options | None = None):
        super().__init__(ctx, options)
        opts = self.options
        num_train = ctx.num_train
        if num_train < 2:
            raise UserError(
                f"crd keeps one memory slot per training sample and needs num_train >= 2, got {num_train}"
            )
        labels = ctx.train_labels
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != (num_train,):
                raise UserError(
                    f"crd: train_labels must hold one label per training sample ({num_train}), "
                    f"got shape {tuple(labels.shape)}"
                )
            if labels.unique().numel() < 2:
                raise UserError("crd draws its negatives from other classes and needs at least 2 classes")
        self.num_train = num_train
        self.num_negatives = min(opts.nce_k, num_train - 1)
        self.temperature = float(opts.nce_t)
        self.momentum = float(opts.nce_m)
        self.embed_s = Embed(math.prod(ctx.student_shapes[-1]), opts.feat_dim)
        self.embed_t = Embed(math.prod(ctx.teacher_shapes[-1]), opts.feat_dim)
        device = torch.device("cpu") if ctx.device is None else torch.device(ctx.device)
        check_memory_bank_fits(num_train, opts.feat_dim, device)
        stdv = 1.0 / math.sqrt(opts.feat_dim / 3)
        # memory_s holds student embeddings (the negatives for the teacher's anchors), memory_t
        # the teacher's; RepDistiller's memory_v1 and memory_v2. Drawn on the CPU (the same numbers
        # on any device), one bank at a time, and moved.
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, (torch.rand(num_train, opts.feat_dim) * (2 * stdv) - stdv).to(device))
        # NCE normalisation constants (student anchors, teacher anchors), fixed on the first step
        # from that batch's mean score; negative means not yet set.
        self.register_buffer("z", torch.full((2,), -1.0, device=device))
        # Labels move with the module but are not state: they come from the dataset on every build.
        self.register_buffer("train_labels", None if labels is None else labels.to(device), persistent=False)
        # The dense paths cost O(B N) per step (B the batch): fine for CIFAR, not for ImageNet.
        self.dense = ctx.batch_size * num_train <= _DENSE_MAX_ELEMENTS
        self.dense_scores = num_train <= ctx.batch_size * (self.num_negatives + 1)
        if labels is not None and not self.dense:
            # Samples sorted by class: class c's samples are positions [start[c], start[c] + count[c]).
            counts = torch.bincount(labels)
            self.register_buffer("by_class", labels.argsort(stable=True).to(device), persistent=False)
            self.register_buffer("class_count", counts.to(device), persistent=False)
            self.register_buffer("class_start", (counts.cumsum(0) - counts).to(device), persistent=False)

    def forward(self, out_s, out_t, target, index=None):
        if index is None:
            raise ValueError("crd needs the dataset indices of the batch (index=...)")
        index = index.long()  # index_copy_ and gather take int64 only
        v_s = self.embed_s(out_s[1][-1])
        v_t = self.embed_t(out_t[1][-1])
        contrast_idx = self._contrast_indices(index)
        distributed = dist.is_available() and dist.is_initialized()
        first_step = bool(self.z[0] < 0)
        if first_step and distributed:
            dist.broadcast(self.memory_s, src=0)
            dist.broadcast(self.memory_t, src=0)

        # Each side's anchors are scored against the other model's memory, which gets no gradient.
        probs_s = self._exp_scores(v_s, self.memory_t, contrast_idx)
        probs_t = self._exp_scores(v_t, self.memory_s, contrast_idx)
        if first_step:
            self._set_normalisers(probs_s, probs_t, distributed)
        noise = self.num_negatives / self.num_train
        loss = nce_loss(probs_s / self.z[0], noise) + nce_loss(probs_t / self.z[1], noise)

        rows = (index, v_s.detach(), v_t.detach())
        self._update_memory(*(_gather_rows(*rows) if distributed else rows))
        return {"crd": loss}

    def _contrast_indices(self, index: Tensor) -> Tensor:
        """[B, 1 + K] dataset indices: the sample itself, then its K negatives."""
        bsz, k = index.shape[0], self.num_negatives
        if self.train_labels is None:
            idx = torch.randint(0, self.num_train, (bsz, k + 1), device=index.device)
            idx[:, 0] = index
            return idx
        if not self.dense:
            return torch.cat([index[:, None], self._other_class_sample(index)], dim=1)
        same = self.train_labels[None, :] == self.train_labels[index][:, None]  # [B, N]
        # The K smallest of iid uniform keys are a uniform K-subset; same-class samples get a key
        # above every other one, so they are never picked while other-class samples remain.
        keys = torch.rand(same.shape, device=index.device).masked_fill_(same, 2.0)
        negatives = keys.topk(k, dim=1, largest=False, sorted=False).indices
        too_few = (~same).sum(1) < k
        if too_few.any():
            # RepDistiller's np.random.choice(replace=True) when a class has < K negatives.
            negatives[too_few] = torch.multinomial((~same[too_few]).float(), k, replacement=True)
        return torch.cat([index[:, None], negatives], dim=1)

    def _other_class_sample(self, index: Tensor) -> Tensor:
        """[B, K] negatives: for each sample a uniform K-subset of the samples of other classes.

        The j-th sample of another class than c is ``by_class[j]`` below c's block and
        ``by_class[j + count[c]]`` from it on, so a draw of j in [0, N - count[c]) is a draw among
        them. Draws with replacement become a subset by redrawing repeated values until none is
        left; the procedure only compares values, so its result is invariant under any permutation
        of the candidates, which makes it uniform. With fewer than K candidates, with replacement
        (as RepDistiller). O(B K) memory and time per step, at any N.
        """
        labels = self.train_labels[index]
        start, count = self.class_start[labels][:, None], self.class_count[labels][:, None]
        others = self.num_train - count  # [B, 1]
        k = self.num_negatives
        draws = (torch.rand((len(index), k), device=index.device) * others).long().minimum(others - 1)
        unique_possible = others >= k  # [B, 1]
        while True:
            ordered, order = draws.sort(dim=1)
            repeated = torch.zeros_like(draws, dtype=torch.bool)
            repeated.scatter_(1, order[:, 1:], ordered[:, 1:] == ordered[:, :-1])
            repeated &= unique_possible
            if not bool(repeated.any()):
                break
            fresh = (torch.rand(draws.shape, device=index.device) * others).long().minimum(others - 1)
            draws = torch.where(repeated, fresh, draws)
        positions = torch.where(draws < start, draws, draws + count)
        return self.by_class[positions]

    def _exp_scores(self, anchors: Tensor, memory: Tensor, contrast_idx: Tensor) -> Tensor:
        """exp(<memory[contrast_idx[b, k]], anchors[b]> / T), shape [B, 1 + K].

        While the memory is smaller than the B (1 + K) rows a gather would copy (CIFAR: 50000 rows
        against 64 x 16385), scoring against the whole memory and picking the columns is the same
        arithmetic as RepDistiller's gather-then-bmm, never materialises the [B, 1 + K, feat_dim]
        copy (537 MB at the official sizes), and is several times faster; the product keeps a copy
        of the memory for its backward because the memory is updated in place before that. A larger
        memory (ImageNet) is gathered, which copies B (1 + K) rows and not all N.
        """
        if self.dense_scores:
            scores = (anchors @ memory.t().clone()).gather(1, contrast_idx)
        else:
            scores = torch.bmm(memory[contrast_idx], anchors[:, :, None].to(memory.dtype))[:, :, 0]
        return torch.exp(scores / self.temperature)

    @torch.no_grad()
    def _set_normalisers(self, probs_s: Tensor, probs_t: Tensor, distributed: bool) -> None:
        """Z = mean exp-score of the first batch x num_train (RepDistiller), averaged over ranks."""
        z = torch.stack([probs_s.mean(), probs_t.mean()]).to(self.z.dtype) * self.num_train
        if distributed:
            dist.all_reduce(z)
            z /= dist.get_world_size()
        self.z.copy_(z)

    @torch.no_grad()
    def _update_memory(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """Momentum update of the batch's slots, then re-normalisation to unit length."""
        for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            slots = memory.index_select(0, index) * self.momentum + v.to(memory.dtype) * (1 - self.momentum)
            memory.index_copy_(0, index, slots / slots.pow(2).sum(1, keepdim=True).sqrt())
