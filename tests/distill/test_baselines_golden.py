"""AT, SP and KD reproduce the official code's parameter-free losses on the golden vectors.

Every ``*.pt`` in ``$SEMCKD_GOLDEN_DIR`` (default ``<repo>/../shared/golden``) is dispatched on its
keys (golden/README.md): a file holding ``at_losses`` is a baseline vector (per-pair AT losses, the
SP loss, the KD loss and the gradients of their sum), a file holding ``logits_s``, ``T`` and
``loss`` but no ``state_dict`` is a KD vector. Other files belong to other tests.
"""

from __future__ import annotations

import pytest
import torch

from golden import (
    FLOAT64_TOLERANCE,
    assert_all_close,
    assert_float32_faithful,
    cast_floats,
    load_vector,
    vectors_of_kind,
)
from semckd_ray.distill import DistillContext, create_method, kd_loss
from semckd_ray.distill.at import at_loss

VECTORS = vectors_of_kind("baselines", "kd")
needs_golden = pytest.mark.skipif(not VECTORS, reason="no baseline or KD golden vectors (set SEMCKD_GOLDEN_DIR)")


def _flatten(values: dict) -> dict[str, torch.Tensor]:
    """Lists of tensors become ``name[i]`` entries, so every tensor is compared on its own."""
    flat = {}
    for name, value in values.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{name}[{i}]": v for i, v in enumerate(value)})
        else:
            flat[name] = value
    return flat


def _with_stem_and_pool(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """The vectors hold only ``features[1:-1]``; the methods read whole feature lists, so wrap
    them in placeholder stem and pooled entries (which the methods must ignore)."""
    bsz, dtype = maps[0].shape[0], maps[0].dtype
    stem = torch.full((bsz, 1, 2, 2), float("nan"), dtype=dtype)
    pooled = torch.full((bsz, 1), float("nan"), dtype=dtype)
    return [stem, *maps, pooled]


def compute_baselines(data: dict) -> dict:
    """Our values for every tensor of a baseline vector, through the registered methods."""
    feat_s = [f.detach().clone().requires_grad_(True) for f in data["feat_s"]]
    feat_t = [f.detach().clone() for f in data["feat_t"]]
    logits_s = data["logits_s"].detach().clone().requires_grad_(True)
    logits_t = data["logits_t"]
    out_s = (logits_s, _with_stem_and_pool(feat_s))
    out_t = (logits_t, _with_stem_and_pool(feat_t))
    ctx = DistillContext(
        student_shapes=tuple(tuple(f.shape[1:]) for f in out_s[1]),
        teacher_shapes=tuple(tuple(f.shape[1:]) for f in out_t[1]),
        batch_size=logits_s.shape[0],
    )
    target = torch.zeros(logits_s.shape[0], dtype=torch.long)
    at_total = create_method("at", ctx)(out_s, out_t, target)["at"]
    sp = create_method("sp", ctx)(out_s, out_t, target)["sp"]
    kd = kd_loss(logits_s, logits_t, data["kd_T"])
    grads = torch.autograd.grad(at_total + sp + kd, [*feat_s, logits_s])
    return {
        "at_losses": torch.stack([at_loss(s, t) for s, t in zip(feat_s, feat_t)]),
        "at_total": at_total,  # the method's term: the pairs summed with equal weight
        "sp_loss": sp,
        "kd_loss": kd,
        "grad_feat_s_of_sum": list(grads[:-1]),
        "grad_logits_s_of_sum": grads[-1],
    }


def expected_baselines(data: dict) -> dict:
    keys = ("at_losses", "sp_loss", "kd_loss", "grad_feat_s_of_sum", "grad_logits_s_of_sum")
    return {**{k: data[k] for k in keys}, "at_total": data["at_losses"].sum()}


def compute_kd(data: dict) -> dict:
    logits_s = data["logits_s"].detach().clone().requires_grad_(True)
    loss = kd_loss(logits_s, data["logits_t"], data["T"])
    (grad,) = torch.autograd.grad(loss, logits_s)
    return {"loss": loss, "grad_logits_s": grad}


def expected_kd(data: dict) -> dict:
    return {"loss": data["loss"], "grad_logits_s": data["grad_logits_s"]}


CHECKS = {"baselines": (compute_baselines, expected_baselines), "kd": (compute_kd, expected_kd)}


def check_vector(data: dict, kind: str) -> dict:
    """A float64 vector is matched to FLOAT64_TOLERANCE; a float32 one by its error against the
    float64 truth of the same inputs (these losses are smooth: no branch to match, see golden.py)."""
    compute, expected = CHECKS[kind]
    ours, official = _flatten(compute(data)), _flatten(expected(data))
    if data["logits_s"].dtype == torch.float64:
        return assert_all_close(ours, official, FLOAT64_TOLERANCE)
    truth = _flatten(compute({k: cast_floats(v, torch.float64) for k, v in data.items()}))
    return assert_float32_faithful(ours, truth, official, truth)


@needs_golden
@pytest.mark.parametrize("path", list(VECTORS), ids=lambda p: p.stem)
def test_matches_golden_vector(path):
    errors = check_vector(load_vector(path), VECTORS[path])
    assert errors  # something was compared


def _perturbed(data: dict, key: str) -> dict:
    data = dict(data)
    value = data[key]
    if isinstance(value, list):
        value = [value[0].clone(), *value[1:]]
        value[0].view(-1)[0] += 1e-6 * value[0].abs().max()
    else:
        value = value.clone()
        value.view(-1)[-1] += 1e-6 * value.abs().max()
    data[key] = value
    return data


@needs_golden
@pytest.mark.parametrize(
    "kind, key",
    [
        ("baselines", "at_losses"),
        ("baselines", "sp_loss"),
        ("baselines", "kd_loss"),
        ("baselines", "grad_feat_s_of_sum"),
        ("baselines", "grad_logits_s_of_sum"),
        ("kd", "loss"),
        ("kd", "grad_logits_s"),
    ],
)
def test_checker_rejects_a_perturbed_reference(kind, key):
    path = next((p for p, k in VECTORS.items() if k == kind), None)
    if path is None:
        pytest.skip(f"no {kind} vector")
    data = load_vector(path)
    check_vector(data, kind)
    with pytest.raises(AssertionError, match="relative error"):
        check_vector(_perturbed(data, key), kind)


@needs_golden
@pytest.mark.parametrize("kind", ["baselines", "kd"])
def test_float32_vector_is_judged_against_float64(kind, monkeypatch):
    """A float32 copy (inputs and official values rounded to float32) passes; a KD loss 1e-4 off in
    float32 only fails."""
    path = next((p for p, k in VECTORS.items() if k == kind), None)
    if path is None:
        pytest.skip(f"no {kind} vector")
    data = {k: cast_floats(v, torch.float32) for k, v in load_vector(path).items()}
    errors = check_vector(data, kind)
    assert max(ours for ours, _ in errors.values()) < 1e-5
    right = kd_loss
    monkeypatch.setitem(
        globals(), "kd_loss", lambda s, t, T: right(s, t, T) * (1 + 1e-4 * (s.dtype == torch.float32))
    )
    with pytest.raises(AssertionError, match="relative error to float64"):
        check_vector(data, kind)
