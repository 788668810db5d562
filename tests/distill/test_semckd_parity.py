"""SemCKD reproduces the authors' own module on the golden vectors, to float rounding.

Every ``*.pt`` in ``$SEMCKD_GOLDEN_DIR`` (default ``<repo>/../shared/golden``) that holds a
``state_dict`` is a SemCKD vector (golden/README.md); other files there belong to other tests.
Float64 files are matched directly; float32 files by their error against the float64 truth of the
same inputs (``golden.py`` says why and how).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from golden import (
    FLOAT32_FLOOR,
    FLOAT64_TOLERANCE,
    ReluBranches,
    SameBranches,
    assert_all_close,
    assert_float32_faithful,
    cast_floats,
    load_vector,
    vectors_of_kind,
)

import semckd_ray.distill.semckd as semckd
from semckd_ray.distill import DistillContext, create_method
from semckd_ray.distill.official import (
    load_official_semckd_state,
    official_grad_state,
    official_names,
)

CONFIGS = {p: load_vector(p)["config"] for p in vectors_of_kind("semckd")}
VECTORS = list(CONFIGS)
needs_golden = pytest.mark.skipif(not VECTORS, reason="no SemCKD golden vectors (set SEMCKD_GOLDEN_DIR)")


def _vectors(dtype: str) -> list[Path]:
    return [p for p, c in CONFIGS.items() if c["dtype"] == dtype]


def _first(dtype: str) -> Path:
    if not _vectors(dtype):
        pytest.skip(f"no {dtype} SemCKD golden vector")
    return _vectors(dtype)[0]


def _build(config: dict):
    """The method for the config's maps; the placeholders stand for f0 and the pooled vector."""
    maps_s = tuple(tuple(s[1:]) for s in config["s_shapes"])
    maps_t = tuple(tuple(s[1:]) for s in config["t_shapes"])
    ctx = DistillContext(
        student_shapes=((3, 32, 32), *maps_s, (1,)),
        teacher_shapes=((3, 32, 32), *maps_t, (1,)),
        batch_size=config["bsz"],
    )
    return create_method("semckd", ctx, {"factor": config["factor"], "soft": config["soft"]})


def official_tensors(gold: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a vector that the module must reproduce, by name."""
    config = gold["config"]
    expected = {"loss": gold["loss"], "attention": gold["attention"]}
    expected |= {name: gold[name] for name in ("energy", "ind_loss") if name in gold}
    for name in ("proj_value_stu", "value_tea"):
        for i, row in enumerate(gold.get(name, [])):
            expected |= {f"{name}[{i}][{j}]": value for j, value in enumerate(row)}
    if "proj_out_shapes" in config:
        expected["proj_out_shapes"] = torch.tensor(config["proj_out_shapes"])
    expected |= {f"grad_feat_s[{i}]": g for i, g in enumerate(gold["grad_feat_s"])}
    skip = set(config["params_without_grad"])
    expected |= {f"grad:{k}": v for k, v in gold["grad_state_dict"].items() if k not in skip}
    expected |= {f"buffer:{k}": v for k, v in gold["buffers_after"].items()}
    return expected


def our_tensors(gold: dict, dtype: torch.dtype, *, within=contextlib.nullcontext, state=None) -> dict[str, torch.Tensor]:
    """Our module on a vector's inputs and state, cast to ``dtype``: the same names as ``official_tensors``.

    ``within()`` is entered around the forward (a ReLU-branch mode, or a deliberate bug for the
    checker tests); ``state`` replaces the vector's ``state_dict``.
    """
    config = gold["config"]
    module = _build(config).to(dtype)
    load_official_semckd_state(module, {k: cast_floats(v, dtype) for k, v in (state or gold["state_dict"]).items()})
    module.train()
    feat_s = [f.clone().requires_grad_(True) for f in cast_floats(gold["feat_s"], dtype)]
    feat_t = [f.clone() for f in cast_floats(gold["feat_t"], dtype)]
    with within():
        out = module.forward_features(feat_s, feat_t)
    out.loss.backward()

    actual = {"loss": out.loss, "attention": out.attention}
    actual |= {name: getattr(out, name) for name in ("energy", "ind_loss") if name in gold}
    for name in ("proj_value_stu", "value_tea"):
        for i, row in enumerate(gold.get(name, [])):
            actual |= {f"{name}[{i}][{j}]": getattr(out, name)[i][j] for j in range(len(row))}
    if "proj_out_shapes" in config:
        actual["proj_out_shapes"] = torch.tensor([[list(p.shape) for p in row] for row in out.proj_value_stu])
    actual |= {f"grad_feat_s[{i}]": f.grad for i, f in enumerate(feat_s)}
    actual |= {f"grad:{k}": v for k, v in official_grad_state(module, config["impl"]).items()}
    names = official_names(module, config["impl"])
    buffers = {f"buffer:{names[k]}": v for k, v in module.state_dict().items()}
    actual |= {k: v for k, v in buffers.items() if k[len("buffer:"):] in gold["buffers_after"]}
    return actual


def check_vector(gold: dict, *, within=contextlib.nullcontext, state=None) -> str:
    """Raises AssertionError unless our module reproduces the vector; returns a one-line summary.

    For a float32 vector, ``within`` and ``state`` apply to our float32 run only (another rounding,
    or a deliberate bug); the float64 truth is always the unchanged module.
    """
    dtype = gold["config"]["dtype"]
    official = official_tensors(gold)
    truth = our_tensors(gold, torch.float64)
    if dtype == "float64":
        errors = assert_all_close(truth, official, FLOAT64_TOLERANCE)
        return f"{len(errors)} tensors, max relative error {max(errors.values()):.3g}"
    assert dtype == "float32", f"unknown dtype {dtype!r} in the vector's config"
    # The truth is the official function on these inputs: the official forward values agree with it
    # to float32 rounding (forward values are continuous in the ReLU branches; gradients are not).
    forward = [k for k in official if not k.startswith("grad")]
    assert_all_close({k: truth[k] for k in forward}, {k: official[k] for k in forward}, FLOAT32_FLOOR)

    branches = ReluBranches()

    @contextlib.contextmanager
    def recorded():
        with within(), branches:
            yield

    ours = our_tensors(gold, torch.float32, within=recorded, state=state)
    same = SameBranches(branches.masks)
    ours_truth = our_tensors(gold, torch.float64, within=lambda: same)
    errors = assert_float32_faithful(ours, ours_truth, official, truth)
    name, (ours_err, official_err) = max(errors.items(), key=lambda item: item[1][0])
    return (
        f"{len(errors)} tensors, {same.flips} ReLU elements on the float32 branch; worst error to "
        f"float64 {ours_err:.3g} ({name}; official float32 {official_err:.3g})"
    )


@functools.cache
def _gold(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@needs_golden
@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_matches_official_module(path):
    print(f"{path.stem}: {check_vector(_gold(path))}")


class OtherRounding(TorchFunctionMode):
    """Another CPU's float32 rounding, simulated: every computed float32 result moves by one ulp.

    Each element of each result of a torch function that computes (not a view, copy or
    rearrangement, which are exact everywhere) moves one ulp up, one down or stays, at random from
    ``seed``, as a kernel with another reduction order or vector width would land. Results that
    autograd saves carry the change into the backward pass.
    """

    EXACT = frozenset({"view", "reshape", "permute", "flatten", "t", "contiguous", "clone", "to", "stack",
                       "cat", "__getitem__", "detach", "requires_grad_", "relu", "relu_", "size", "dim"})

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or name in self.EXACT or name.endswith("_"):
            return out
        step = torch.randint(-1, 2, out.shape, generator=self.generator).to(out)
        with torch.no_grad():
            moved = torch.nextafter(out, step * float("inf")) - out
        return out + moved.where(step != 0, 0.0)


OTHER_ROUNDINGS = {
    # convolutions by another algorithm (oneDNN off)
    "no_onednn": lambda: torch.backends.mkldnn.flags(enabled=False),
    **{f"ulp_noise_{seed}": functools.partial(OtherRounding, seed) for seed in range(3)},
}


@needs_golden
@pytest.mark.parametrize("rounding", list(OTHER_ROUNDINGS))
def test_float32_criterion_accepts_another_rounding(rounding):
    gold = _gold(_first("float32"))
    ours, theirs = our_tensors(gold, torch.float32), our_tensors(gold, torch.float32, within=OTHER_ROUNDINGS[rounding])
    if all(torch.equal(ours[k], theirs[k]) for k in ours):
        # An ulp moved at random always changes something; oneDNN may not serve these convolutions.
        assert rounding == "no_onednn", "the simulated rounding changed nothing"
        pytest.skip("oneDNN off changes nothing on this CPU: the convolutions do not use it here")
    print(f"{rounding}: {check_vector(gold, within=OTHER_ROUNDINGS[rounding])}")


@needs_golden
def test_float32_vector_from_another_rounding_passes(tmp_path, monkeypatch):
    """A float32 file written by another CPU's rounding, dropped into the directory, passes unchanged."""
    gold = _gold(_first("float32"))
    theirs = our_tensors(gold, torch.float32, within=lambda: OtherRounding(seed=10))
    other = dict(gold)
    other["loss"], other["attention"] = theirs["loss"].detach(), theirs["attention"].detach()
    other |= {name: theirs[name].detach() for name in ("energy", "ind_loss") if name in gold}
    other["grad_feat_s"] = [theirs[f"grad_feat_s[{i}]"] for i in range(len(gold["grad_feat_s"]))]
    other["grad_state_dict"] = {
        k: theirs.get(f"grad:{k}", v) for k, v in gold["grad_state_dict"].items()
    }
    other["buffers_after"] = {k: theirs[f"buffer:{k}"] for k in gold["buffers_after"]}
    assert any(not torch.equal(theirs[k], v) for k, v in official_tensors(gold).items())
    torch.save(other, tmp_path / "other_cpu_fp32.pt")
    monkeypatch.setenv("SEMCKD_GOLDEN_DIR", str(tmp_path))
    (path,) = vectors_of_kind("semckd")
    print(check_vector(torch.load(path, weights_only=True)))


def _scaled_element(state: dict, key: str, factor: float) -> dict:
    state = dict(state)
    value = state[key].clone()
    flat = value.view(-1)
    flat[flat.abs().argmax()] *= factor
    state[key] = value
    return state


@contextlib.contextmanager
def _patched(target, name: str, replacement):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(target, name, replacement)
        yield


def _first_pair_dropped():
    calls = []
    original = semckd._pair_mse

    def pair_mse(proj, target):
        calls.append(None)
        return original(proj, target) * (len(calls) > 1)

    return _patched(semckd, "_pair_mse", pair_mse)


def _max_pool_to(feat, size):
    return feat if feat.shape[2] == size else torch.nn.functional.adaptive_max_pool2d(feat, (size, size))


_gram = semckd._gram

# Deliberate bugs in our float32 path (the float64 truth stays right): each must fail the check.
BUGS = {
    # one element of a projection's last convolution read 1e-3 off
    "perturbed_weight": lambda gold: {
        "state": _scaled_element(gold["state_dict"], "regressor11.regressor.6.weight", 1 + 1e-3)
    },
    # one (student, teacher) pair left out of the loss
    "dropped_pair": lambda gold: {"within": _first_pair_dropped},
    # no gradient through the student's Gram matrices, the attention's path back to the student
    "dropped_gram_gradient": lambda gold: {
        "within": lambda: _patched(semckd, "_gram", lambda feat: _gram(feat.detach()))
    },
    # max instead of average pooling to the pair's resolution
    "wrong_pooling": lambda gold: {"within": lambda: _patched(semckd, "_pool_to", _max_pool_to)},
    # the projections' ReLUs left out
    "no_activation": lambda gold: {"within": lambda: _patched(torch.nn.ReLU, "forward", lambda self, x: x)},
    # the projections' ReLUs keeping negative values (a wrong branch, not a rounding flip)
    "leaky_branch": lambda gold: {
        "within": lambda: _patched(torch.nn.ReLU, "forward", lambda self, x: torch.relu(x) + 1e-3 * x.clamp(max=0))
    },
}


@needs_golden
@pytest.mark.parametrize("bug", list(BUGS))
def test_float32_criterion_rejects_a_wrong_float32_path(bug):
    gold = _gold(_first("float32"))
    with pytest.raises(AssertionError) as failure:
        check_vector(gold, **BUGS[bug](gold))
    print(f"{bug}: {str(failure.value).splitlines()[0]}")


@needs_golden
def test_float64_vector_with_a_perturbed_tensor_fails(tmp_path, monkeypatch):
    """A float64 file whose largest gradient element is 1e-6 off is rejected."""
    gold = dict(_gold(_first("float64")))
    name = next(iter(gold["grad_state_dict"]))
    gold["grad_state_dict"] = {**gold["grad_state_dict"], name: gold["grad_state_dict"][name].clone()}
    flat = gold["grad_state_dict"][name].view(-1)
    flat[flat.abs().argmax()] *= 1 + 1e-6
    torch.save(gold, tmp_path / "perturbed_fp64.pt")
    monkeypatch.setenv("SEMCKD_GOLDEN_DIR", str(tmp_path))
    (path,) = vectors_of_kind("semckd")
    with pytest.raises(AssertionError, match=f"grad:{name}: relative error"):
        check_vector(torch.load(path, weights_only=True))


@needs_golden
def test_comparison_fails_on_an_unchecked_or_extra_tensor():
    gold = _gold(_first("float64"))
    actual, expected = our_tensors(gold, torch.float64), official_tensors(gold)
    name = next(k for k in expected if k.startswith("grad:"))
    with pytest.raises(AssertionError, match="missing"):
        assert_all_close({k: v for k, v in actual.items() if k != name}, expected, FLOAT64_TOLERANCE)
    with pytest.raises(AssertionError, match="not in the reference"):
        assert_all_close({**actual, "grad:extra": actual[name]}, expected, FLOAT64_TOLERANCE)


# SimKD-repo vectors register queries before keys and carry unused MLP regressors: another RNG order.
SEEDED = [p for p, c in CONFIGS.items() if c["impl"] == "semckd_repo" and "init_seed" in c]


@pytest.mark.parametrize("path", SEEDED, ids=lambda p: p.stem)
def test_seeded_init_matches_official(path):
    """Same registration order as the official SelfA: the same seed gives the same initial weights."""
    config = CONFIGS[path]
    reference = load_vector(path)["state_dict"]
    torch.manual_seed(config["init_seed"])
    module = _build(config)
    names = official_names(module, "semckd_repo")
    for ours, value in module.state_dict().items():
        expected = reference[names[ours]]
        torch.testing.assert_close(value.to(expected.dtype), expected, rtol=0, atol=0)
