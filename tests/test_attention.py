"""The validation attention of SemCKD: what is averaged, over which batches, across ranks, and its heat map."""

from __future__ import annotations

import os
import socket

import matplotlib.image
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from semckd_ray.attention import (
    DPI,
    FIGSIZE,
    attention_loader,
    attention_metrics,
    has_attention,
    mean_attention,
    plot_attention,
)
from semckd_ray.data import DatasetSplits, Split
from semckd_ray.distill import DistillContext, create_method
from semckd_ray.models import create_model
from semckd_ray.train_loop import feature_shapes

BATCH = 8
NUM_VAL = 3 * BATCH + 5  # the remainder of 5 images cannot go through SemCKD's MLPs


def _splits(num_val: int = NUM_VAL) -> DatasetSplits:
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
        return Split(images, torch.randint(0, 10, (n,), generator=gen))

    return DatasetSplits("synthetic", split(16), split(num_val), split(8), 10,
                         (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), tuple(map(str, range(10))))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet14", num_classes=10).eval()
    ctx = DistillContext(feature_shapes(student, torch.device("cpu")), feature_shapes(teacher, torch.device("cpu")),
                         BATCH, num_classes=10)
    return student, teacher, create_method("semckd", ctx)


def _bn_state(*modules: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for m in modules for name, b in m.named_buffers() if "running" in name or "num_batches" in name]


def test_loader_drops_the_remainder_and_keeps_the_order():
    loader = attention_loader(_splits(), BATCH)
    batches = list(loader)
    assert len(batches) == 3 and all(x.shape[0] == BATCH for x, _, _ in batches)
    assert torch.equal(torch.cat([i for _, _, i in batches]), torch.arange(3 * BATCH))


def test_mean_is_the_sample_average_of_the_eval_mode_attention_and_rows_sum_to_one(models):
    student, teacher, method = models
    student.train(), method.train()
    loader = attention_loader(_splits(), BATCH)
    before = _bn_state(student, method)

    got = mean_attention(student, method, teacher, loader)

    assert student.training and method.training  # modes restored
    for a, b in zip(before, _bn_state(student, method)):
        assert torch.equal(a, b)  # no running statistic moved
    student.eval()
    with torch.no_grad():
        per_batch = [
            method.forward_features(student(x)[1][1:-1], teacher(x)[1][1:-1]).attention for x, _, _ in loader
        ]
    student.train()
    expected = torch.cat(per_batch).double().mean(0)
    s, t = len(method.query_embed), len(method.key_embed)
    assert got.shape == (s, t) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(1), torch.ones(s, dtype=torch.float64))


def test_method_mode_does_not_change_the_attention(models):
    """Why eval mode is safe: the attention comes from BatchNorm-free MLPs, only the projections have BN."""
    student, teacher, method = models
    loader = attention_loader(_splits(), BATCH)
    x = next(iter(loader))[0]
    with torch.no_grad():
        feats_s, feats_t = student.eval()(x)[1][1:-1], teacher(x)[1][1:-1]
        in_train = method.train().forward_features(feats_s, feats_t).attention
        in_eval = method.eval().forward_features(feats_s, feats_t).attention
    torch.testing.assert_close(in_train, in_eval, rtol=0, atol=0)
    method.train(), student.train()


def test_no_full_batch_gives_none(models):
    student, teacher, method = models
    assert mean_attention(student, method, teacher, attention_loader(_splits(BATCH - 1), BATCH)) is None


def test_only_methods_with_attention_are_measured(models):
    assert has_attention(models[2])
    kd = create_method("kd", DistillContext((), (), BATCH))
    assert not has_attention(kd)


def test_metrics_are_named_by_student_and_teacher_layer():
    attention = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    assert attention_metrics(attention) == {
        "attn_s0_t0": 0.25, "attn_s0_t1": 0.75, "attn_s1_t0": 0.5, "attn_s1_t1": 0.5,
        "attn_s2_t0": 1.0, "attn_s2_t1": 0.0,
    }
    assert attention_metrics(None) == {}


def test_heat_map_is_a_png_of_the_documented_size(tmp_path):
    attention = torch.softmax(torch.randn(3, 4, dtype=torch.float64), dim=1)
    path = plot_attention(attention, tmp_path / "attention" / "epoch_007.png", epoch=7, title="resnet14 -> resnet8")
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))


# ---- two ranks (gloo, CPU): the average weighs every sample once, whichever rank holds it


class _FixedAttention(nn.Module):
    """A stand-in method whose attention of sample k is row-softmax(k * W), so the expected mean is known."""

    def __init__(self):
        super().__init__()
        self.weight = torch.arange(6, dtype=torch.float64).view(2, 3) / 10
        self.last_attention = None

    def forward(self, out_s, out_t, target, index=None):
        self.last_attention = torch.softmax(index.double()[:, None, None] * self.weight, dim=-1)
        return {}


# Validation sizes: with 3 images rank 1 has no full batch of 2, with 9 both ranks have two.
NUM_VALS = (3, 9)


def _rank_main(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        identity = nn.Identity()
        for num_val in NUM_VALS:
            loader = attention_loader(_splits(num_val), 2, rank=rank, world_size=world)
            result = mean_attention(identity, _FixedAttention(), identity, loader)
            # A list, not a tensor: torch shares tensors through the sender's file descriptors, gone at its exit.
            queue.put((rank, num_val, result.tolist()))
    finally:
        dist.destroy_process_group()


def test_ranks_average_every_full_batch_once():
    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {(r, n): torch.tensor(a, dtype=torch.float64)
               for r, n, a in (queue.get(timeout=120) for _ in range(world * len(NUM_VALS)))}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for num_val in NUM_VALS:
        # Rank r reads indices r, r + 2, ... of the split, in batches of 2; remainders are dropped.
        used = []
        for r in range(world):
            shard = list(range(r, num_val, world))
            used += shard[: len(shard) // 2 * 2]
        expected = _FixedAttention()
        expected.forward(None, None, None, torch.tensor(used))
        for r in range(world):
            torch.testing.assert_close(results[r, num_val], expected.last_attention.mean(0))
