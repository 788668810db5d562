"""Properties over random input: the config loader fails only with a UserError, SemCKD never breaks.

Example counts are bounded so that the file runs in well under a minute on loaded CI cores.
"""

from __future__ import annotations

import copy
import string

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from semckd_ray.config import TrainConfig, apply_overrides, flatten, parse_train_config, set_dotted
from semckd_ray.distill import DistillContext, create_method
from semckd_ray.errors import UserError

BOUNDED = settings(max_examples=60, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# A valid config that touches every section, a teacher and method options included.
VALID = {
    "name": "prop",
    "seed": 0,
    "data": {"dataset": "digits", "root": "data"},
    "teacher": {"model": "resnet20", "checkpoint": "teacher.pt"},
    "student": {"model": "resnet8"},
    "method": {"name": "semckd", "beta": 50.0, "options": {"factor": 4, "soft": 1.0, "proj_width": 2}},
    "optim": {"epochs": 3, "batch_size": 32, "lr": 0.05, "lr_decay_epochs": [2]},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1.0, "max_failures": 1},
    "checkpoint": {"every": 1, "keep": 2},
    "tracking": {"experiment": "prop"},
}
VALID_KEYS = sorted(flatten(parse_train_config(VALID).model_dump(mode="json")))

# Strings that trip path handling and YAML as well as random ones.
tricky_text = st.sampled_from(["", "\x00", "a\x00b", "~", "..", "/", ".inf", "null", "runs:/", "s3://b/p"])
scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | tricky_text)
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)


def parses_or_user_error(raw) -> TrainConfig | None:
    """Parse ``raw``; any exception but a UserError fails the test (that is what the CLI shows as a traceback)."""
    try:
        return parse_train_config(raw)
    except UserError:
        return None


def assert_round_trips(cfg: TrainConfig) -> None:
    """What the driver hands the workers (and logs to MLflow) describes exactly the same config."""
    dumped = cfg.model_dump(mode="json")
    assert parse_train_config(dumped) == cfg
    assert TrainConfig.model_validate(dumped) == cfg


@st.composite
def config_like_dicts(draw):
    """A valid config with random sections replaced or overlaid: deep enough to reach every validator."""
    raw = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(sorted(VALID) + ["search", "extra"]))
        fields = sorted(VALID[section]) if isinstance(VALID.get(section), dict) else []
        if fields and draw(st.booleans()):
            raw.setdefault(section, {})
            if isinstance(raw[section], dict):
                raw[section][draw(st.sampled_from(fields) | st.text(max_size=6))] = draw(json_like)
        else:
            raw[section] = draw(json_like)
    return raw


@BOUNDED
@given(raw=config_like_dicts() | st.dictionaries(st.text(max_size=8), json_like, max_size=5))
def test_random_dicts_load_or_fail_with_user_error(raw):
    cfg = parses_or_user_error(raw)
    if cfg is not None:
        assert_round_trips(cfg)


def _typo(draw, word: str) -> str:
    letters = string.ascii_lowercase + "_"
    i = draw(st.integers(0, len(word) - 1))
    kind = draw(st.sampled_from(["drop", "insert", "replace", "swap"]))
    if kind == "drop" or len(word) == 1 and kind == "swap":
        return word[:i] + word[i + 1:]
    if kind == "insert":
        return word[:i] + draw(st.sampled_from(letters)) + word[i:]
    if kind == "replace":
        return word[:i] + draw(st.sampled_from(letters.replace(word[i], ""))) + word[i + 1:]
    j = min(i + 1, len(word) - 1)
    i = j - 1
    return word[:i] + word[j] + word[i] + word[j + 1:]


@st.composite
def typo_keys(draw):
    key = draw(st.sampled_from([k for k in VALID_KEYS if "." in k or k in ("name", "seed")]))
    parts = key.split(".")
    depth = draw(st.integers(0, len(parts) - 1))
    siblings = {k.split(".")[depth] for k in VALID_KEYS if k.split(".")[:depth] == parts[:depth]}
    wrong = _typo(draw, parts[depth])
    assume(wrong and wrong not in siblings)
    return key, ".".join([*parts[:depth], wrong, *parts[depth + 1:]]), wrong


@BOUNDED
@given(case=typo_keys())
def test_a_typo_in_any_key_is_a_user_error_naming_it(case):
    valid_key, typo_key, wrong_part = case
    raw = copy.deepcopy(VALID)
    value = 1
    set_dotted(raw, typo_key, value)
    with pytest.raises(UserError) as info:
        parse_train_config(raw)
    assert wrong_part in str(info.value), (valid_key, typo_key, str(info.value))


@BOUNDED
@given(key=st.sampled_from(VALID_KEYS), value=json_like)
def test_any_value_for_a_valid_key_loads_or_fails_with_user_error(key, value):
    raw = copy.deepcopy(VALID)
    set_dotted(raw, key, value)
    cfg = parses_or_user_error(raw)
    if cfg is not None:
        assert_round_trips(cfg)


@BOUNDED
@given(key=st.sampled_from(VALID_KEYS) | st.text(max_size=20), text=st.text(max_size=20))
def test_any_override_text_loads_or_fails_with_user_error(key, text):
    """``--set KEY=TEXT`` parses TEXT as YAML: whatever is typed there is a UserError at worst."""
    try:
        raw = apply_overrides(VALID, [f"{key}={text}"])
    except UserError:
        return
    cfg = parses_or_user_error(raw)
    if cfg is not None:
        assert_round_trips(cfg)


@st.composite
def search_sections(draw):
    spec = st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["loguniform", "uniform", "randint", "choice"]) | scalars,
        "low": scalars, "high": scalars, "values": st.lists(scalars, max_size=3) | scalars,
    })
    keys = st.sampled_from(["method.beta", "method.options.factor", "optim.lr", "optim.epohcs"]) | st.text(max_size=12)
    return {
        "num_samples": draw(st.integers(-1, 4) | scalars),
        "space": draw(st.dictionaries(keys, spec | scalars, max_size=3) | scalars),
        "scheduler": draw(st.fixed_dictionaries({}, optional={"type": st.sampled_from(["asha", "none"]) | scalars,
                                                              "grace_period": scalars}) | scalars),
    }


@BOUNDED
@given(search=search_sections())
def test_random_search_sections_load_or_fail_with_user_error(search, tmp_path_factory):
    from semckd_ray.tune import parse_search

    raw = {**copy.deepcopy(VALID), "search": search}
    try:
        parse_search(raw, tmp_path_factory.getbasetemp())
    except UserError:
        pass


# ------------------------------------------------------------------------------------------
# SemCKD over random architectures

SIZES = [1, 2, 4, 8, 16]


@st.composite
def semckd_cases(draw):
    batch = draw(st.integers(2, 12))

    def maps():
        return [(draw(st.integers(1, 16)), draw(st.sampled_from(SIZES))) for _ in range(draw(st.integers(1, 4)))]

    return {
        "batch": batch,
        "student": maps(),
        "teacher": maps(),
        "options": {"factor": draw(st.integers(1, batch)), "soft": draw(st.floats(0.1, 10.0)),
                    "proj_width": draw(st.integers(1, 3))},
        "scale": draw(st.sampled_from([1e-3, 1.0, 30.0])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _shapes(maps: list[tuple[int, int]]) -> tuple[tuple[int, ...], ...]:
    """A whole feature list as models return it: stem output, the maps, the pooled vector."""
    return ((3, 32, 32), *((c, s, s) for c, s in maps), (maps[-1][0],))


@settings(BOUNDED, max_examples=40)
@given(case=semckd_cases())
def test_semckd_is_well_behaved_for_any_layer_layout(case):
    torch.manual_seed(case["seed"])
    batch = case["batch"]
    ctx = DistillContext(_shapes(case["student"]), _shapes(case["teacher"]), batch)
    method = create_method("semckd", ctx, case["options"]).train()
    gen = torch.Generator().manual_seed(case["seed"])
    feat_s = [(case["scale"] * torch.randn(batch, c, s, s, generator=gen)).requires_grad_(True)
              for c, s in case["student"]]
    feat_t = [case["scale"] * torch.randn(batch, c, s, s, generator=gen) for c, s in case["teacher"]]

    out = method.forward_features(feat_s, feat_t)

    num_s, num_t = len(case["student"]), len(case["teacher"])
    assert out.attention.shape == (batch, num_s, num_t)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(batch, num_s))
    assert torch.isfinite(out.loss) and out.loss.item() >= 0.0
    out.loss.backward()
    grads = [f.grad for f in feat_s] + [p.grad for p in method.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(f.grad is not None for f in feat_s)
