"""SemCKD reproduces the authors' own module on the golden vectors, to float rounding.

Every ``*.pt`` in ``$SEMCKD_GOLDEN_DIR`` (default ``<repo>/../shared/golden``) that holds a
``state_dict`` is a SemCKD vector (golden/README.md); other files there belong to other tests.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from paths import golden_dir, relative_error
from semckd_ray.distill import DistillContext, create_method
from semckd_ray.distill.official import (
    load_official_semckd_state,
    official_grad_state,
    official_names,
)

GOLDEN_DIR = golden_dir()
TOLERANCE = {"float64": 1e-9, "float32": 1e-5}


def _config(path: Path) -> dict | None:
    """The ``config`` of a SemCKD vector (the files holding ``state_dict``), None for other files."""
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return data["config"] if "state_dict" in data else None


CONFIGS = {p: c for p in sorted(GOLDEN_DIR.glob("*.pt")) if (c := _config(p)) is not None}
VECTORS = list(CONFIGS)
needs_golden = pytest.mark.skipif(not VECTORS, reason=f"no SemCKD golden vectors in {GOLDEN_DIR}")


def assert_all_close(actual: dict, expected: dict, tol: float) -> dict[str, float]:
    """Every expected tensor must be matched (same shape, relative error <= tol), nothing extra.

    Returns the relative error of every tensor; raises AssertionError listing every failure.
    """
    failures = [f"missing {k}" for k in expected if k not in actual]
    failures += [f"not in the reference: {k}" for k in actual if k not in expected]
    errors = {}
    for name in expected.keys() & actual.keys():
        a, e = actual[name], expected[name]
        if a.shape != e.shape:
            failures.append(f"{name}: shape {list(a.shape)} vs reference {list(e.shape)}")
            continue
        errors[name] = relative_error(a, e)
        if not errors[name] <= tol:  # also catches NaN
            failures.append(f"{name}: relative error {errors[name]:.3g} > {tol:g}")
    assert not failures, "\n".join(sorted(failures))
    return errors


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


@functools.cache
def _run_vector(path: Path) -> tuple[dict, dict, float]:
    """Our module on one golden vector: (actual tensors, reference tensors, tolerance), by name."""
    gold = torch.load(path, map_location="cpu", weights_only=True)
    config = gold["config"]
    dtype = getattr(torch, config["dtype"])
    module = _build(config).to(dtype)
    load_official_semckd_state(module, gold["state_dict"])
    module.train()

    feat_s = [f.clone().requires_grad_(True) for f in gold["feat_s"]]
    out = module.forward_features(feat_s, [f.clone() for f in gold["feat_t"]])
    out.loss.backward()

    expected = {"loss": gold["loss"], "attention": gold["attention"]}
    actual = {"loss": out.loss, "attention": out.attention}
    for name in ("energy", "ind_loss"):
        if name in gold:
            expected[name], actual[name] = gold[name], getattr(out, name)
    for name in ("proj_value_stu", "value_tea"):
        for i, row in enumerate(gold.get(name, [])):
            for j, value in enumerate(row):
                expected[f"{name}[{i}][{j}]"] = value
                actual[f"{name}[{i}][{j}]"] = getattr(out, name)[i][j]
    if "proj_out_shapes" in config:
        expected["proj_out_shapes"] = torch.tensor(config["proj_out_shapes"])
        actual["proj_out_shapes"] = torch.tensor([[list(p.shape) for p in row] for row in out.proj_value_stu])
    for i, (f, g) in enumerate(zip(feat_s, gold["grad_feat_s"], strict=True)):
        expected[f"grad_feat_s[{i}]"], actual[f"grad_feat_s[{i}]"] = g, f.grad
    skip = set(config["params_without_grad"])
    expected |= {f"grad:{k}": v for k, v in gold["grad_state_dict"].items() if k not in skip}
    actual |= {f"grad:{k}": v for k, v in official_grad_state(module, config["impl"]).items()}
    names = official_names(module, config["impl"])
    state = module.state_dict()
    for official_key, value in gold["buffers_after"].items():
        expected[f"buffer:{official_key}"] = value
    actual |= {f"buffer:{names[k]}": v for k, v in state.items() if f"buffer:{names[k]}" in expected}
    return actual, expected, TOLERANCE[config["dtype"]]


@needs_golden
@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_matches_official_module(path):
    actual, expected, tol = _run_vector(path)
    errors = assert_all_close(actual, expected, tol)
    print(f"{path.stem}: {len(errors)} tensors, max relative error {max(errors.values()):.3g}")


def _fp64_vector() -> Path:
    fp64 = [p for p, c in CONFIGS.items() if c["dtype"] == "float64"]
    if not fp64:
        pytest.skip("no float64 SemCKD golden vector")
    return fp64[0]


@needs_golden
def test_comparison_fails_on_a_perturbed_gradient():
    actual, expected, tol = _run_vector(_fp64_vector())
    name = next(k for k in expected if k.startswith("grad:"))
    bumped = actual[name].clone()
    flat = bumped.view(-1)
    k = flat.abs().argmax()
    flat[k] = flat[k] * (1 + 1e-6)
    with pytest.raises(AssertionError, match="relative error"):
        assert_all_close({**actual, name: bumped}, expected, tol)


@needs_golden
def test_comparison_fails_on_an_unchecked_or_extra_tensor():
    actual, expected, tol = _run_vector(_fp64_vector())
    name = next(k for k in expected if k.startswith("grad:"))
    with pytest.raises(AssertionError, match="missing"):
        assert_all_close({k: v for k, v in actual.items() if k != name}, expected, tol)
    with pytest.raises(AssertionError, match="not in the reference"):
        assert_all_close({**actual, "grad:extra": actual[name]}, expected, tol)


# SimKD-repo vectors register queries before keys and carry unused MLP regressors: another RNG order.
SEEDED = [p for p, c in CONFIGS.items() if c["impl"] == "semckd_repo" and "init_seed" in c]


@pytest.mark.parametrize("path", SEEDED, ids=lambda p: p.stem)
def test_seeded_init_matches_official(path):
    """Same registration order as the official SelfA: the same seed gives the same initial weights."""
    config = CONFIGS[path]
    reference = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    torch.manual_seed(config["init_seed"])
    module = _build(config)
    names = official_names(module, "semckd_repo")
    for ours, value in module.state_dict().items():
        expected = reference[names[ours]]
        torch.testing.assert_close(value.to(expected.dtype), expected, rtol=0, atol=0)
