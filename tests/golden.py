"""The official code's golden vectors: where they are, what kind each file is, how they are compared.

A plain module (not conftest.py, of which the suite has several) so that tests can import it.

Float64 files are compared with the official values directly (relative error <= 1e-9): float64
rounding is the same on every CPU this suite runs on, and our module reproduces them exactly.

Float32 files cannot be compared that way. Their values are one CPU's float32 rounding, and another
CPU (AVX2 instead of AVX-512 kernels, another thread count) rounds elsewhere. Most of the time the
two land within 1e-6 of each other; but SemCKD's gradients pass through ReLUs, and when a
pre-activation sits within float32 rounding of zero, one rounding keeps the element and the other
drops it. One such flip in a projection moves that pair's gradients by up to 2e-2 (measured on
``r32x4_r8x4_div8_b64_f4_fp32``), on whichever pair the rounding happens to flip. So a float32 file
is judged against the float64 truth of the same inputs instead (``assert_float32_faithful``):

- the truth is our module in float64 (the float64 files prove it is the official float64), run on
  the float32 file's inputs and taking the float32 run's branch at every ReLU element where the
  float64 pre-activation is itself within rounding of zero (``ReluBranches`` / ``SameBranches``:
  anywhere else a differing branch is a bug and fails);
- tensor by tensor, our float32 error against that truth must be at most ``FLOAT32_FACTOR`` times
  the official float32 file's own error against the float64 truth, and never needs to be below
  ``FLOAT32_FLOOR``.

Neither side depends on the CPU: a float32 file made on another machine is judged by its own error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from paths import REPO
from torch.overrides import TorchFunctionMode

FLOAT64_TOLERANCE = 1e-9
FLOAT32_FACTOR = 2.0
FLOAT32_FLOOR = 1e-5
# A ReLU element may take the float32 run's branch only where the float64 pre-activation is this
# close to zero, relative to the largest pre-activation of that call: float32 rounding of the
# pre-activations is about 1e-6 of it, so 1e-4 leaves room and still catches a wrong activation.
KINK_TOLERANCE = 1e-4


def golden_dir() -> Path:
    """``$SEMCKD_GOLDEN_DIR``, else the ``shared/golden`` folder next to the repository."""
    env = os.environ.get("SEMCKD_GOLDEN_DIR")
    return Path(env) if env else REPO.parent / "shared" / "golden"


def golden_files(pattern: str) -> list:
    """One ``pytest.param`` per golden file matching ``pattern``, for ``@pytest.mark.parametrize``.

    Looping over whatever the directory holds means a new vector file is checked without code
    changes; when there is nothing to check, a single skipped param says why.
    """
    directory = golden_dir()
    if not directory.is_dir():
        reason = f"golden directory {directory} not found (set SEMCKD_GOLDEN_DIR)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    files = sorted(directory.glob(pattern))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {pattern} in {directory}"))]
    return [pytest.param(path, id=path.name) for path in files]


def load_vector(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def vector_kind(data: Mapping) -> str | None:
    """Which test checks a golden file, from the keys it holds (golden/README.md); None: unknown."""
    if "state_dict" in data:
        return "semckd"
    if "at_losses" in data:
        return "baselines"
    if {"logits_s", "T", "loss"} <= data.keys():
        return "kd"
    if {"model", "model_name"} <= data.keys():
        return "model"
    return None


def golden_kinds(directory: Path | None = None) -> dict[Path, str | None]:
    """The kind of every ``*.pt`` in ``directory`` (default ``golden_dir()``), None where unknown."""
    return {p: vector_kind(load_vector(p)) for p in sorted((directory or golden_dir()).glob("*.pt"))}


def vectors_of_kind(*kinds: str) -> dict[Path, str]:
    """Every ``*.pt`` of the golden directory that holds a vector of one of ``kinds``, with its kind."""
    return {p: kind for p, kind in golden_kinds().items() if kind in kinds}


def cast_floats(value, dtype: torch.dtype):
    """``value`` with every floating tensor in it (alone or in a list) cast to ``dtype``."""
    if isinstance(value, (list, tuple)):
        return [cast_floats(v, dtype) for v in value]
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the parity measure of the golden vectors' README."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)


def _same_names_and_shapes(actual: Mapping, expected: Mapping) -> list[str]:
    failures = [f"missing {k}" for k in expected if k not in actual]
    failures += [f"not in the reference: {k}" for k in actual if k not in expected]
    failures += [
        f"{k}: shape {list(actual[k].shape)} vs reference {list(expected[k].shape)}"
        for k in expected.keys() & actual.keys()
        if actual[k].shape != expected[k].shape
    ]
    return failures


def assert_all_close(actual: Mapping, expected: Mapping, tol: float) -> dict[str, float]:
    """Every expected tensor is matched (same shape, relative error <= tol), nothing extra.

    Returns the relative error of every tensor; raises AssertionError listing every failure.
    """
    failures = _same_names_and_shapes(actual, expected)
    errors = {}
    for name in expected.keys() & actual.keys():
        if actual[name].shape != expected[name].shape:
            continue
        errors[name] = relative_error(actual[name], expected[name])
        if not errors[name] <= tol:  # also catches NaN
            failures.append(f"{name}: relative error {errors[name]:.3g} > {tol:g}")
    assert not failures, "\n".join(sorted(failures))
    return errors


def assert_float32_faithful(
    ours: Mapping,
    ours_truth: Mapping,
    official: Mapping,
    official_truth: Mapping,
    *,
    factor: float = FLOAT32_FACTOR,
    floor: float = FLOAT32_FLOOR,
) -> dict[str, tuple[float, float]]:
    """Our float32 tensors are as close to the float64 truth as the official float32 ones are.

    Tensor by tensor: ``err(ours, ours_truth) <= max(floor, factor * err(official, official_truth))``
    with the relative error of ``relative_error``. The two truths are the same float64 computation,
    ``ours_truth`` on our float32 run's ReLU branches (``SameBranches``), ``official_truth`` on its
    own (the official run's branches are not recorded). All four must hold the same names and shapes.
    Returns ``{name: (our error, official error)}``; raises AssertionError listing every failure.
    """
    failures = [
        problem
        for other in (ours, ours_truth, official_truth)
        for problem in _same_names_and_shapes(other, official)
    ]
    errors = {}
    for name, reference in official.items():
        if not all(name in m and m[name].shape == reference.shape for m in (ours, ours_truth, official_truth)):
            continue
        ours_err = relative_error(ours[name], ours_truth[name])
        official_err = relative_error(reference, official_truth[name])
        errors[name] = ours_err, official_err
        bound = max(floor, factor * official_err)
        if not ours_err <= bound:  # also catches NaN
            failures.append(
                f"{name}: relative error to float64 {ours_err:.3g} > {bound:.3g} "
                f"(official float32: {official_err:.3g})"
            )
    assert not failures, "\n".join(sorted(set(failures)))
    return errors


_RELUS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})


class ReluBranches(TorchFunctionMode):
    """Records which elements every ReLU call keeps, in call order (``masks``)."""

    def __init__(self):
        super().__init__()
        self.masks: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _RELUS:
            self.masks.append((out > 0).detach().clone())
        return out


class SameBranches(TorchFunctionMode):
    """Replays recorded ReLU branches, where they differ from this run's only within rounding of zero.

    Every ReLU call ``n`` computes ``x * masks[n]`` instead of ``relu(x)``: the same values and
    gradients wherever the two runs agree. Where they differ, ``|x|`` must be at most
    ``KINK_TOLERANCE`` of the call's largest ``|x|``, else the recorded run took another branch for
    a reason other than rounding and this raises AssertionError; so does a different number or
    shape of ReLU calls. ``flips`` counts the elements that took the recorded branch.
    """

    def __init__(self, masks: list[torch.Tensor]):
        super().__init__()
        self.masks = masks
        self.calls = 0
        self.flips = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in _RELUS:
            return func(*args, **(kwargs or {}))
        x = args[0]
        assert self.calls < len(self.masks), f"ReLU call {self.calls + 1}, the recorded run made {len(self.masks)}"
        mask = self.masks[self.calls]
        assert mask.shape == x.shape, f"ReLU call {self.calls}: shape {list(x.shape)}, recorded {list(mask.shape)}"
        self.calls += 1
        with torch.no_grad():
            differ = mask != (x > 0)
            if differ.any():
                worst = x[differ].abs().max().item() / max(x.abs().max().item(), 1e-30)
                assert worst <= KINK_TOLERANCE, (
                    f"ReLU call {self.calls - 1}: {int(differ.sum())} elements took another branch, "
                    f"up to {worst:.3g} of the largest pre-activation away from zero "
                    f"(rounding explains at most {KINK_TOLERANCE:g})"
                )
                self.flips += int(differ.sum())
        return x * mask.to(x.dtype)

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        if exc[0] is None:
            assert self.calls == len(self.masks), f"{self.calls} ReLU calls, the recorded run made {len(self.masks)}"
        return result
