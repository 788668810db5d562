"""CRD: the negatives it draws, its NCE loss and memory update against a plain per-sample
computation of RepDistiller's formulas, and its memory bank under torch.distributed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semckd_ray.distill import DistillContext, create_method
from semckd_ray.distill import crd as crd_module
from semckd_ray.errors import UserError

NUM_TRAIN, S_DIM, T_DIM = 40, 6, 5


def _crd(train_labels=None, num_train=NUM_TRAIN, **options):
    ctx = DistillContext(
        student_shapes=((3, 4, 4), (S_DIM,)),
        teacher_shapes=((3, 4, 4), (T_DIM,)),
        batch_size=4,
        num_train=num_train,
        train_labels=train_labels,
    )
    return create_method("crd", ctx, options)


def _outputs(bsz: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    feat_s = torch.randn(bsz, S_DIM, generator=gen, dtype=dtype)
    feat_t = torch.randn(bsz, T_DIM, generator=gen, dtype=dtype)
    return (None, [None, feat_s]), (None, [None, feat_t])


def test_exact_negatives_are_other_classes_without_repeats():
    labels = torch.arange(NUM_TRAIN) % 4  # 30 other-class samples per sample
    crd = _crd(labels, nce_k=25)
    index = torch.tensor([0, 5, 10, 39])
    idx = crd._contrast_indices(index)
    assert idx.shape == (4, 26)
    assert torch.equal(idx[:, 0], index)
    negatives = idx[:, 1:]
    assert (labels[negatives] != labels[index][:, None]).all()
    assert all(row.unique().numel() == 25 for row in negatives)


def test_exact_negatives_repeat_only_when_a_class_has_too_few():
    labels = torch.zeros(NUM_TRAIN, dtype=torch.long)
    labels[:3] = 1  # class 1 has 37 negatives, class 0 only 3
    crd = _crd(labels, nce_k=20)
    idx = crd._contrast_indices(torch.tensor([0, 10]))
    assert (labels[idx[0, 1:]] == 0).all() and idx[0, 1:].unique().numel() == 20
    assert (labels[idx[1, 1:]] == 1).all() and idx[1, 1:].unique().numel() <= 3


def test_without_labels_negatives_are_uniform_over_the_memory():
    crd = _crd(None, nce_k=500)
    index = torch.tensor([7, 8])
    idx = crd._contrast_indices(index)
    assert torch.equal(idx[:, 0], index)
    assert crd.num_negatives == NUM_TRAIN - 1  # clamped for a tiny training set
    assert idx.min() >= 0 and idx.max() < NUM_TRAIN


@pytest.fixture
def sparse(monkeypatch):
    """CRDs built from here on draw negatives as at ImageNet's size, by the class-sorted sampler."""
    monkeypatch.setattr(crd_module, "_DENSE_MAX_ELEMENTS", 0)


def test_sampled_negatives_are_other_classes_without_repeats(sparse):
    labels = torch.tensor([3, 0, 1, 2] * 10)  # not sorted: the sampler sorts by class itself
    crd = _crd(labels, nce_k=25)
    assert not crd.dense
    index = torch.tensor([0, 5, 10, 39])
    idx = crd._contrast_indices(index)
    assert idx.shape == (4, 26) and torch.equal(idx[:, 0], index)
    negatives = idx[:, 1:]
    assert (labels[negatives] != labels[index][:, None]).all()
    assert all(row.unique().numel() == 25 for row in negatives)


def test_sampled_negatives_repeat_only_when_a_class_has_too_few(sparse):
    labels = torch.zeros(NUM_TRAIN, dtype=torch.long)
    labels[:3] = 1  # class 1 has 37 negatives, class 0 only 3
    crd = _crd(labels, nce_k=20)
    idx = crd._contrast_indices(torch.tensor([0, 10]))
    assert (labels[idx[0, 1:]] == 0).all() and idx[0, 1:].unique().numel() == 20
    assert (labels[idx[1, 1:]] == 1).all() and set(idx[1, 1:].tolist()) <= {0, 1, 2}


def test_sampled_negatives_are_a_uniform_subset(sparse):
    """Every other-class sample is picked equally often, and pairs of them too (a subset, not a sequence
    of independent draws: the redrawing must not favour any candidate)."""
    torch.manual_seed(0)
    labels = torch.arange(NUM_TRAIN) % 4  # 30 candidates for sample 1
    crd = _crd(labels, nce_k=6)
    rows = 6000
    negatives = crd._contrast_indices(torch.ones(rows, dtype=torch.long))[:, 1:]
    candidates = (labels != labels[1]).nonzero().flatten()
    counts = torch.bincount(negatives.flatten(), minlength=NUM_TRAIN)[candidates].double()
    expected = rows * 6 / 30  # 1200; binomial sd ~31
    assert counts.sum() == rows * 6
    assert (counts - expected).abs().max() < 0.15 * expected
    together = torch.zeros(NUM_TRAIN, NUM_TRAIN)
    member = torch.zeros(rows, NUM_TRAIN).scatter_(1, negatives, 1.0)
    together = member.t() @ member
    pairs = together[candidates][:, candidates][~torch.eye(30, dtype=torch.bool)]
    expected_pairs = rows * (6 * 5) / (30 * 29)  # 207; sd ~14
    assert (pairs - expected_pairs).abs().max() < 0.35 * expected_pairs


def test_a_memory_bank_that_does_not_fit_is_refused_with_its_size(monkeypatch):
    monkeypatch.setattr(crd_module, "_free_bytes", lambda device: 1 << 30)
    with pytest.raises(UserError, match=r"needs 1[.]22 GiB on cpu .*1281167 training samples.*1[.]00 GiB free") as err:
        crd_module.check_memory_bank_fits(1281167, 128, torch.device("cpu"))
    err.match("feat_dim")  # what to lower
    monkeypatch.setattr(crd_module, "_free_bytes", lambda device: 1 << 20)
    with pytest.raises(UserError, match="crd's memory bank needs"):
        _crd(num_train=NUM_TRAIN, feat_dim=8192)
    assert crd_module.memory_bank_bytes(1281167, 128) == 2 * 1281167 * 128 * 4


def _reference_loss(v_s, v_t, memory_s, memory_t, idx, z, temperature, num_train):
    """RepDistiller's ContrastLoss, one sample and one candidate at a time."""
    noise = (idx.shape[1] - 1) / num_train
    total = 0.0
    for anchors, memory, z_side in ((v_s, memory_t, z[0]), (v_t, memory_s, z[1])):
        for b in range(idx.shape[0]):
            for k, j in enumerate(idx[b].tolist()):
                p = torch.exp(memory[j] @ anchors[b] / temperature) / z_side
                d = p / (p + noise + 1e-7) if k == 0 else noise / (p + noise + 1e-7)
                total = total - torch.log(d)
    return total / idx.shape[0]


@pytest.mark.parametrize("dense_scores", [True, False], ids=["scores-all-rows", "gathered-rows"])
def test_loss_normalisers_and_memory_update_follow_repdistiller(monkeypatch, dense_scores):
    torch.manual_seed(0)
    crd = _crd(torch.arange(NUM_TRAIN) % 5, nce_k=12).double()
    crd.dense_scores = dense_scores  # both ways of scoring compute RepDistiller's loss
    out_s, out_t = _outputs(4, seed=1, dtype=torch.float64)
    index = torch.tensor([3, 1, 4, 33])
    idx = crd._contrast_indices(index)
    monkeypatch.setattr(crd, "_contrast_indices", lambda index: idx)
    memory_s, memory_t = crd.memory_s.clone(), crd.memory_t.clone()
    feat_s = out_s[1][1].requires_grad_(True)

    loss = crd(out_s, out_t, None, index)["crd"]

    v_s, v_t = crd.embed_s(feat_s), crd.embed_t(out_t[1][1])
    first_z = [
        torch.exp(v @ m.t() / 0.07).gather(1, idx).mean().item() * NUM_TRAIN
        for v, m in ((v_s, memory_t), (v_t, memory_s))
    ]
    assert crd.z.tolist() == pytest.approx(first_z, rel=1e-12)
    expected = _reference_loss(v_s, v_t, memory_s, memory_t, idx, first_z, 0.07, NUM_TRAIN)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, feat_s, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected, feat_s)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=0)

    for memory, before, v in ((crd.memory_s, memory_s, v_s), (crd.memory_t, memory_t, v_t)):
        slots = 0.5 * before[index] + 0.5 * v.detach()
        torch.testing.assert_close(memory[index], slots / slots.norm(dim=1, keepdim=True), rtol=1e-12, atol=0)
        untouched = torch.ones(NUM_TRAIN, dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(memory[untouched], before[untouched])

    crd(*_outputs(4, seed=2, dtype=torch.float64), None, index)
    assert crd.z.tolist() == pytest.approx(first_z, rel=1e-12)  # fixed after the first step


def test_forward_without_index_is_refused():
    with pytest.raises(ValueError, match="indices"):
        _crd()(*_outputs(4, seed=0), None)


# --- torch.distributed: two CPU ranks (gloo) with different batch sizes -------------------------

RANK_INDEX = [torch.tensor([0, 1, 2, 3]), torch.tensor([20, 21, 22])]


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        crd = _crd(torch.arange(NUM_TRAIN) % 4, nce_k=8)
        if rank == 1:  # a rank that drew another random initial memory
            crd.memory_s.add_(1.0)
            crd.memory_t.mul_(-1.0)
        index = RANK_INDEX[rank]
        loss = crd(*_outputs(len(index), seed=10 + rank), None, index)["crd"]
        assert math.isfinite(loss.item())
        torch.save(
            {"memory_s": crd.memory_s, "memory_t": crd.memory_t, "z": crd.z}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_memory_bank_stays_identical_across_ranks_and_sees_every_sample(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ("memory_s", "memory_t", "z"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key

    # Expected: rank 0's initial memory, updated with both ranks' samples.
    torch.manual_seed(0)
    crd = _crd(torch.arange(NUM_TRAIN) % 4, nce_k=8)
    outs = [_outputs(len(index), seed=10 + rank) for rank, index in enumerate(RANK_INDEX)]
    with torch.no_grad():
        v_s = torch.cat([crd.embed_s(out_s[1][1]) for out_s, _ in outs])
        v_t = torch.cat([crd.embed_t(out_t[1][1]) for _, out_t in outs])
    crd._update_memory(torch.cat(RANK_INDEX), v_s, v_t)
    torch.testing.assert_close(ranks[0]["memory_s"], crd.memory_s)
    torch.testing.assert_close(ranks[0]["memory_t"], crd.memory_t)
