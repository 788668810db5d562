"""SemCKD's attention (student layer x teacher layer), averaged over the validation split, and its heat map.

The attention of sample ``b`` is a softmax over teacher layers for every student layer, so each row
of the average sums to 1. It is measured on validation batches of exactly ``optim.batch_size``
images (the query/key MLPs read whole rows of the batch Gram matrix; the split's remainder is
dropped) in a fixed order, with the student and teacher in eval mode -- the models as they are
evaluated and selected.

The method's modules run in eval mode under ``torch.no_grad``. The authors never run SelfA in eval
mode, but the attention does not depend on the mode: it comes from the query/key MLPs, which have
no BatchNorm or dropout. Eval mode only changes the projections' BatchNorm, which then reads its
running statistics instead of updating them -- so a measurement leaves the training state untouched
(no save-and-restore of running statistics needed).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from semckd_ray.data import BatchLoader, DatasetSplits

__all__ = ["has_attention", "attention_loader", "mean_attention", "attention_metrics", "plot_attention"]

# Heat-map geometry: the PNG is exactly FIGSIZE * DPI pixels (no tight bounding box).
FIGSIZE = (5.0, 4.0)
DPI = 100


def has_attention(method: nn.Module) -> bool:
    """Whether the method exposes a per-sample layer attention (``last_attention`` [B, S, T]) after a forward."""
    return hasattr(method, "last_attention")


def attention_loader(splits: DatasetSplits, batch_size: int, *, rank: int = 0, world_size: int = 1,
                     **placement) -> BatchLoader:
    """The validation split in full batches of ``batch_size``, fixed order, this rank's shard."""
    return BatchLoader(
        splits.val, splits.mean, splits.std, batch_size,
        drop_last=True, rank=rank, world_size=world_size, pad_shards=False, **placement,
    )  # fmt: skip


@torch.no_grad()
def mean_attention(student: nn.Module, method: nn.Module, teacher: nn.Module, loader: BatchLoader) -> Tensor | None:
    """The attention averaged over every sample of ``loader`` (and of every rank): float64 [S, T] on the CPU.

    ``None`` when no rank has a full batch. Under ``torch.distributed`` every rank must call it.
    Runs under whatever autocast the caller has entered.
    """
    modes = [(m, m.training) for m in (student, method)]
    student.eval()
    method.eval()
    total: Tensor | None = None
    seen = 0
    try:
        for x, y, index in loader:
            method(student(x), teacher(x), y, index)
            batch_sum = method.last_attention.double().sum(0)
            total = batch_sum if total is None else total + batch_sum
            seen += y.numel()
    finally:
        for module, training in modes:
            module.train(training)
    if dist.is_initialized():
        # Ranks without a full batch still take part, with zeros of the right shape.
        # (gloo reduces CPU tensors, nccl CUDA ones: use the device the batches live on.)
        shape = torch.tensor(total.shape if total is not None else (0, 0), device=loader.device)
        dist.all_reduce(shape, op=dist.ReduceOp.MAX)
        packed = torch.zeros(int(shape.prod()) + 1, dtype=torch.float64, device=loader.device)
        if total is not None:
            packed[:-1] = total.flatten().to(packed.device)
        packed[-1] = seen
        dist.all_reduce(packed)
        seen = int(packed[-1])
        total = packed[:-1].view(*shape.tolist())
    if seen == 0:
        return None
    return (total / seen).cpu()


def attention_metrics(attention: Tensor | None) -> dict[str, float]:
    """``attn_s{i}_t{j}`` for every pair (the names of ``SemCKD.extra_metrics``); empty without attention."""
    if attention is None:
        return {}
    return {f"attn_s{i}_t{j}": float(a) for i, row in enumerate(attention.tolist()) for j, a in enumerate(row)}


def plot_attention(attention: Tensor, path: str | Path, *, epoch: int, title: str | None = None) -> Path:
    """Write the heat map of ``attention`` [S, T] as a PNG: rows student layers, columns teacher layers."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    values = attention.detach().double().cpu().numpy()
    s, t = values.shape
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=max(float(values.max()), 1e-12), aspect="auto")
    fig.colorbar(image, ax=ax, label="mean attention")
    for i in range(s):
        for j in range(t):
            bright = image.norm(values[i, j]) > 0.6
            ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center",
                    color="black" if bright else "white", fontsize=9)
    ax.set_xticks(range(t), [f"t{j}" for j in range(t)])
    ax.set_yticks(range(s), [f"s{i}" for i in range(s)])
    ax.set_xlabel("teacher layer")
    ax.set_ylabel("student layer")
    ax.set_title(f"{title + chr(10) if title else ''}validation attention, epoch {epoch}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path

