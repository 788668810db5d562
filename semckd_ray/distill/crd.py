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
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from semckd_ray.distill.base import DistillContext, DistillMethod, register_method
from semckd_ray.distill.catalog import CRDSpec
from semckd_ray.errors import UserError

__all__ = ["CRD", "Embed", "nce_loss"]

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
        stdv = 1.0 / math.sqrt(opts.feat_dim / 3)
        # memory_s holds student embeddings (the negatives for the teacher's anchors), memory_t
        # the teacher's; RepDistiller's memory_v1 and memory_v2.
        self.register_buffer("memory_s", torch.rand(num_train, opts.feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("memory_t", torch.rand(num_train, opts.feat_dim) * (2 * stdv) - stdv)
        # NCE normalisation constants (student anchors, teacher anchors), fixed on the first step
        # from that batch's mean score; negative means not yet set.
        self.register_buffer("z", torch.full((2,), -1.0))
        # Labels move with the module but are not state: they come from the dataset on every build.
        self.register_buffer("train_labels", labels, persistent=False)

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

    def _exp_scores(self, anchors: Tensor, memory: Tensor, contrast_idx: Tensor) -> Tensor:
        """exp(<memory[contrast_idx[b, k]], anchors[b]> / T), shape [B, 1 + K].

        Scoring against the whole memory and picking the columns is the same arithmetic as
        RepDistiller's gather-then-bmm but never materialises a [B, 1 + K, feat_dim] copy of the
        memory (537 MB at the official sizes), and is several times faster. The product keeps a
        copy of the memory for its backward because the memory is updated in place before that.
        """
        scores = (anchors @ memory.t().clone()).gather(1, contrast_idx)
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
