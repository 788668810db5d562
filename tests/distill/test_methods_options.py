"""The baselines' options and build-time checks: a bad value is refused with a UserError that
names the option and what is allowed; official weights and the shapes their modules produce."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from semckd_ray.distill import DistillContext, create_method, get_method_class, make_options
from semckd_ray.distill.fitnet import ConvReg
from semckd_ray.errors import UserError

# resnet8-like student, resnet20-like teacher (per-sample shapes of the whole feature list)
STUDENT = ((16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,))
TEACHER = ((16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,))


def _ctx(student=STUDENT, teacher=TEACHER, **kwargs):
    return DistillContext(student_shapes=student, teacher_shapes=teacher, batch_size=4, **kwargs)


@pytest.mark.parametrize(
    "name, beta",
    [("fitnet", 100.0), ("at", 1000.0), ("sp", 3000.0), ("vid", 1.0), ("crd", 0.8)],
)
def test_default_beta_is_the_official_run_scripts(name, beta):
    assert get_method_class(name).default_beta == beta


def test_crd_declares_that_it_needs_indices_and_syncs_its_memory():
    cls = get_method_class("crd")
    assert cls.needs_index and cls.syncs_own_buffers


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("fitnet", {"hint_layer": -1}, "hint_layer must be an integer >= 0"),
        ("fitnet", {"hint_layer": 1.5}, "hint_layer must be an integer >= 0"),
        ("fitnet", {"hint_layer": True}, "hint_layer must be an integer >= 0"),
        ("at", {"p": 0}, "p must be a number > 0"),
        ("at", {"p": "2"}, "p must be a number > 0"),
        ("vid", {"eps": 0.0}, "eps must be a number > 0"),
        ("vid", {"init_pred_var": 1e-6}, r"init_pred_var must be a number > eps"),
        ("crd", {"feat_dim": 0}, "feat_dim must be an integer >= 1"),
        ("crd", {"nce_k": 16384.0}, "nce_k must be an integer >= 1"),
        ("crd", {"nce_t": -0.07}, "nce_t must be a number > 0"),
        ("crd", {"nce_m": 1.0}, r"nce_m must be a number in \[0, 1\)"),
    ],
)
def test_invalid_option_is_refused_naming_it(name, options, match):
    with pytest.raises(UserError, match=f"{name} option {match}"):
        make_options(name, options)


@pytest.mark.parametrize("name", ["fitnet", "at", "sp", "vid", "crd"])
def test_unknown_option_is_refused_listing_the_allowed_ones(name):
    allowed = ", ".join(sorted(get_method_class(name).Options.__dataclass_fields__)) or "none"
    with pytest.raises(UserError, match=f"unknown option.*no_such_knob.*allowed options: {allowed}$"):
        make_options(name, {"no_such_knob": 1})


def test_fitnet_hint_layer_must_index_a_map_of_both_models():
    with pytest.raises(UserError, match=r"hint_layer=4 .* allowed: \[0, 1, 2, 3\]"):
        create_method("fitnet", _ctx(), {"hint_layer": 4})


@pytest.mark.parametrize("name", ["at", "vid"])
def test_map_methods_refuse_models_without_intermediate_maps(name):
    with pytest.raises(UserError, match=f"{name} needs the student's intermediate feature maps"):
        create_method(name, _ctx(student=((16, 32, 32), (64,))))


def test_crd_needs_the_training_set():
    with pytest.raises(UserError, match="num_train >= 2"):
        create_method("crd", _ctx())
    with pytest.raises(UserError, match="one label per training sample"):
        create_method("crd", _ctx(num_train=10, train_labels=torch.zeros(9, dtype=torch.long)))
    with pytest.raises(UserError, match="at least 2 classes"):
        create_method("crd", _ctx(num_train=10, train_labels=torch.zeros(10, dtype=torch.long)))


@pytest.mark.parametrize(
    "s_shape, t_shape, compared_at",
    [
        ((8, 32, 32), (12, 16, 16), (16, 16)),  # student twice as tall: stride-2 conv
        ((8, 8, 8), (12, 16, 16), (16, 16)),  # half as tall: transposed conv
        ((8, 8, 8), (12, 8, 8), (8, 8)),  # same size: 1x1 conv
        ((8, 10, 10), (12, 8, 8), (8, 8)),  # a bit taller: valid 3x3 conv
        ((8, 4, 4), (12, 16, 16), (4, 4)),  # 4x smaller: size-keeping conv, teacher pooled
    ],
)
def test_fitnet_regressor_meets_the_teacher_map(s_shape, t_shape, compared_at):
    reg = ConvReg(s_shape, t_shape)
    out = reg(torch.randn(2, *s_shape))
    assert out.shape == (2, t_shape[0], *compared_at)
    assert reg.pool_teacher == (compared_at != t_shape[1:])


def test_vid_starts_at_the_initial_variance():
    vid = create_method("vid", _ctx(), {"init_pred_var": 3.0})
    for pair in vid.pairs:
        var = F.softplus(pair.log_scale) + pair.eps
        torch.testing.assert_close(var, torch.full_like(var, 3.0))
