"""SemCKD's contract beyond the golden vectors: options, batch size, dtypes, logging, official weights."""

from __future__ import annotations

import pytest
import torch

from semckd_ray.distill import DistillContext, create_method, get_method_class, make_options
from semckd_ray.distill.official import (
    load_official_semckd_checkpoint,
    load_official_semckd_state,
    official_names,
    to_official_state,
)
from semckd_ray.errors import UserError

BATCH = 8
# Per-sample shapes of whole feature lists: stem output, intermediate maps, pooled vector.
STUDENT = ((3, 32, 32), (4, 8, 8), (8, 4, 4), (8,))
TEACHER = ((3, 32, 32), (6, 16, 16), (12, 8, 8), (16, 2, 2), (16,))
S, T = len(STUDENT) - 2, len(TEACHER) - 2


def _method(batch_size: int = BATCH, **options):
    return create_method("semckd", DistillContext(STUDENT, TEACHER, batch_size), options)


def _features(shapes, batch_size: int = BATCH, dtype=torch.float32, device="cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, *s, generator=gen).relu().to(device, dtype) for s in shapes]


def _maps(batch_size: int = BATCH, **kwargs):
    """Student maps (requiring grad) and teacher maps, i.e. ``feats[1:-1]`` of both models."""
    feat_s = [f.requires_grad_(True) for f in _features(STUDENT[1:-1], batch_size, **kwargs)]
    return feat_s, _features(TEACHER[1:-1], batch_size, seed=1, **kwargs)


def test_registered_with_official_defaults():
    cls = get_method_class("semckd")
    assert cls.default_beta == 400.0
    assert cls.requires_fixed_batch
    assert make_options("semckd", {}) == cls.Options(factor=4, soft=1.0, proj_width=2)


def test_forward_distils_intermediate_maps_only():
    method = _method().train()
    feat_s, feat_t = _maps()
    logits = torch.zeros(BATCH, 10)
    out_s = (logits, [torch.randn(BATCH, *STUDENT[0]), *feat_s, torch.randn(BATCH, *STUDENT[-1])])
    out_t = (logits, [torch.randn(BATCH, *TEACHER[0]), *feat_t, torch.randn(BATCH, *TEACHER[-1])])
    terms = method(out_s, out_t, torch.zeros(BATCH, dtype=torch.long))
    assert list(terms) == ["semckd"]
    torch.testing.assert_close(terms["semckd"], method.forward_features(feat_s, feat_t).loss)


def test_other_batch_size_is_an_error_naming_both_sizes():
    method = _method()
    with pytest.raises(UserError, match=r"batch size 8 .* batch of 6"):
        method.forward_features(*_maps(batch_size=6))


def test_factor_beyond_batch_size_is_an_error():
    with pytest.raises(UserError, match=r"batch size 8 // factor 9 = 0.*empty"):
        _method(factor=9)


@pytest.mark.parametrize(
    "options", [{"factor": 0}, {"factor": 2.0}, {"soft": 0.0}, {"soft": -1.0}, {"proj_width": 0}]
)
def test_invalid_options_are_rejected(options):
    with pytest.raises(UserError, match=next(iter(options))):
        make_options("semckd", options)


@pytest.mark.parametrize("factor, embed_dim", [(4, 2), (3, 2), (1, 8)])
def test_factor_sets_embedding_size(factor, embed_dim):
    """d = B // factor and hidden width 2 * d (not 2B // factor: 4, not 5, for B=8, factor 3)."""
    method = _method(factor=factor)
    for emb in [*method.query_embed, *method.key_embed]:
        assert emb.linear1.weight.shape == (2 * embed_dim, BATCH)
        assert emb.linear2.weight.shape == (embed_dim, 2 * embed_dim)
    out = method.forward_features(*_maps())
    assert out.query.shape == (BATCH, S, embed_dim)
    assert out.key.shape == (BATCH, embed_dim, T)


@pytest.mark.parametrize("width", [1, 2, 3])
def test_proj_width_sets_projection_hidden_width(width):
    method = _method(proj_width=width)
    for i in range(S):
        for j, (channels, height, _) in enumerate(TEACHER[1:-1]):
            proj = method.proj[i][j]
            assert (proj[0].out_channels, proj[3].out_channels, proj[6].out_channels) == (
                width * channels,
                width * channels,
                channels,
            )
    out = method.forward_features(*_maps())
    for i, (_, h_s, _) in enumerate(STUDENT[1:-1]):
        for j, (channels, h_t, _) in enumerate(TEACHER[1:-1]):
            size = min(h_s, h_t)
            assert out.proj_value_stu[i][j].shape == out.value_tea[i][j].shape == (BATCH, channels, size, size)


def test_soft_divides_the_energy():
    sharp, flat = _method(soft=0.5), _method(soft=1.0)
    flat.load_state_dict(sharp.state_dict())
    feat_s, feat_t = _maps()
    out_sharp, out_flat = sharp.forward_features(feat_s, feat_t), flat.forward_features(feat_s, feat_t)
    torch.testing.assert_close(out_sharp.energy, 2 * out_flat.energy)
    assert out_sharp.attention.max() > out_flat.attention.max()


def test_attention_is_a_distribution_over_teacher_layers_and_is_logged():
    method = _method().train()
    assert method.extra_metrics() == {}
    out = method.forward_features(*_maps())
    assert out.attention.shape == (BATCH, S, T)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(BATCH, S))
    assert not method.last_attention.requires_grad
    metrics = method.extra_metrics()
    assert sorted(metrics) == sorted(f"attn_s{i}_t{j}" for i in range(S) for j in range(T))
    mean = out.attention.detach().mean(0)
    assert metrics["attn_s1_t2"] == pytest.approx(mean[1, 2].item())


def test_gradient_reaches_student_through_attention_and_projections():
    method = _method().train()
    feat_s, feat_t = _maps()
    method.forward_features(feat_s, feat_t).loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feat_s)
    assert all(p.grad is not None for p in method.parameters())


def _devices():
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_runs_in_each_dtype(dtype, device):
    method = _method().to(device, dtype).train()
    feat_s, feat_t = _maps(dtype=dtype, device=device)
    out = method.forward_features(feat_s, feat_t)
    out.loss.backward()
    assert out.loss.dtype == dtype and out.loss.device.type == device
    assert torch.isfinite(out.loss) and all(torch.isfinite(f.grad).all() for f in feat_s)


@pytest.mark.parametrize("device", _devices())
def test_bf16_autocast_is_close_to_fp32(device):
    method = _method().to(device).train()
    feat_s, feat_t = _maps(device=device)
    reference = method.forward_features(feat_s, feat_t).loss.item()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = method.forward_features(feat_s, feat_t).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(f.grad).all() for f in feat_s)
    assert all(torch.isfinite(p.grad).all() for p in method.parameters())
    assert loss.item() == pytest.approx(reference, rel=0.02)


def test_official_state_round_trip():
    torch.manual_seed(0)
    source = _method()
    source.forward_features(*_maps())  # non-trivial BatchNorm statistics
    official = to_official_state(source)
    assert list(official)[:2] == ["key_weight0.linear1.weight", "key_weight0.linear1.bias"]
    assert "regressor12.regressor.6.weight" in official
    target = _method()
    assert load_official_semckd_state(target, official) == "semckd_repo"
    for name, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[name], value, rtol=0, atol=0)


def test_loads_simkd_naming_and_ignores_its_unused_mlp_regressor():
    source = _method()
    names = official_names(source, "simkd_repo")
    state = {names[k]: v for k, v in source.state_dict().items()}
    state["query_0.regressor.0.weight"] = torch.zeros(3, 3)
    state["key_2.regressor.3.bias"] = torch.zeros(3)
    target = _method()
    assert load_official_semckd_state(target, state) == "simkd_repo"
    for name, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[name], value, rtol=0, atol=0)


def test_loader_lists_every_problem():
    state = to_official_state(_method(batch_size=16))  # MLP input width 16 instead of 8
    del state["regressor00.regressor.6.weight"]
    state["regressor99.regressor.0.weight"] = torch.zeros(1)
    with pytest.raises(UserError) as err:
        load_official_semckd_state(_method(), state)
    message = str(err.value)
    assert "missing regressor00.regressor.6.weight" in message
    assert "unexpected regressor99.regressor.0.weight" in message
    assert "key_weight0.linear1.weight: checkpoint shape [8, 16], module [4, 8]" in message
    assert "batch size 8" in message


def test_loads_attention_entry_of_an_official_checkpoint(tmp_path):
    source = _method()
    path = tmp_path / "resnet8x4_best.pth"
    torch.save({"epoch": 240, "model": {}, "best_acc": 76.2, "attention": to_official_state(source)}, path)
    target = _method()
    load_official_semckd_checkpoint(target, path)
    for name, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[name], value, rtol=0, atol=0)

    torch.save({"model": {}}, tmp_path / "teacher.pth")
    with pytest.raises(UserError, match="'attention' entry"):
        load_official_semckd_checkpoint(target, tmp_path / "teacher.pth")

