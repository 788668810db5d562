"""Import and export SemCKD weights under the authors' parameter names (SEMCKD_SPEC sections 8-9).

The official training script saves the attention module as ``state["attention"]`` of its
checkpoint. Two namings exist:

* SemCKD repo (``semckd_repo``): ``key_weight{j}``, ``query_weight{i}``, ``regressor{i}{j}.regressor.{k}``.
* SimKD repo (``simkd_repo``): ``key_{j}``, ``query_{i}``, the same ``regressor{i}{j}``; its MLPs
  also carry a ``regressor`` sub-module that the forward never uses, whose keys are ignored here.

Our module names them ``key_embed.{j}``, ``query_embed.{i}`` and ``proj.{i}.{j}.{k}``.
"""

from __future__ import annotations

import os
import re

import torch
from torch import Tensor

from semckd_ray.distill.semckd import SemCKD
from semckd_ray.errors import UserError

__all__ = [
    "NAMINGS",
    "official_names",
    "official_grad_state",
    "to_official_state",
    "load_official_semckd_state",
    "load_official_semckd_checkpoint",
]

NAMINGS = ("semckd_repo", "simkd_repo")

_MLP_PREFIX = {
    "semckd_repo": {"key_embed": "key_weight", "query_embed": "query_weight"},
    "simkd_repo": {"key_embed": "key_", "query_embed": "query_"},
}
_OUR_KEY = re.compile(r"(?:(key_embed|query_embed)\.(\d+)|proj\.(\d+)\.(\d+))\.(.+)")
# The SimKD repo's MLPEmbed builds a `regressor` Sequential that its forward never calls.
_SIMKD_UNUSED = re.compile(r"(?:key|query)_\d+\.regressor\.")


def _official_name(name: str, naming: str) -> str:
    match = _OUR_KEY.fullmatch(name)
    if match is None:
        raise ValueError(f"not a SemCKD parameter or buffer name: {name!r}")
    mlp, idx, i, j, rest = match.groups()
    if mlp is not None:
        return f"{_MLP_PREFIX[naming][mlp]}{idx}.{rest}"
    return f"regressor{i}{j}.regressor.{rest}"


def official_names(module: SemCKD, naming: str = "semckd_repo") -> dict[str, str]:
    """``{our state_dict key: official key}`` for every parameter and buffer, in state_dict order.

    Also serves to compare gradients with the official ones (see ``official_grad_state``).
    """
    if naming not in NAMINGS:
        raise UserError(f"unknown SemCKD naming {naming!r}; valid namings: {', '.join(NAMINGS)}")
    names = {ours: _official_name(ours, naming) for ours in module.state_dict()}
    if len(set(names.values())) != len(names):
        # `regressor{i}{j}` is a plain concatenation: i=1, j=11 and i=11, j=1 collide.
        raise UserError(
            "the official names are ambiguous for this module (10 or more feature maps on one side); "
            "it cannot be exported to or loaded from the official format"
        )
    return names


def official_grad_state(module: SemCKD, naming: str = "semckd_repo") -> dict[str, Tensor]:
    """Gradients of the parameters that have one, under their official names."""
    names = official_names(module, naming)
    return {names[n]: p.grad for n, p in module.named_parameters() if p.grad is not None}


def to_official_state(module: SemCKD) -> dict[str, Tensor]:
    """The module's state dict under the SemCKD repo's names, in the official key order."""
    names = official_names(module, "semckd_repo")
    return {names[n]: t.detach().clone() for n, t in module.state_dict().items()}


def _detect_naming(keys) -> str:
    if any(k.startswith(("key_weight", "query_weight")) for k in keys):
        return "semckd_repo"
    return "simkd_repo"


def load_official_semckd_state(module: SemCKD, state_dict: dict[str, Tensor]) -> str:
    """Load an official SelfA state dict (either naming) into ``module``; returns the naming found.

    Strict: every parameter and buffer must be present with the module's shape, and nothing but
    the SimKD repo's unused MLP ``regressor`` keys may be left over; otherwise a ``UserError``
    lists every problem. A checkpoint saved from DDP (keys prefixed ``module.``) is accepted.
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    naming = _detect_naming(state_dict)
    names = official_names(module, naming)
    own = module.state_dict()

    problems: list[str] = []
    mapped: dict[str, Tensor] = {}
    for ours, theirs in names.items():
        if theirs not in state_dict:
            problems.append(f"missing {theirs}")
            continue
        value = state_dict[theirs]
        if value.shape != own[ours].shape:
            problems.append(f"{theirs}: checkpoint shape {list(value.shape)}, module {list(own[ours].shape)}")
            continue
        mapped[ours] = value
    expected = set(names.values())
    unexpected = [
        k for k in state_dict if k not in expected and not (naming == "simkd_repo" and _SIMKD_UNUSED.match(k))
    ]
    problems += [f"unexpected {k}" for k in unexpected]
    if problems:
        width = module.query_embed[0].linear1.in_features
        raise UserError(
            f"official SemCKD state ({naming} naming) does not fit this module "
            f"(S={len(module.query_embed)} student maps, T={len(module.key_embed)} teacher maps, "
            f"batch size {width}, which is the query/key MLPs' input width):\n  " + "\n  ".join(problems)
        )
    module.load_state_dict(mapped, strict=True)
    return naming


def load_official_semckd_checkpoint(module: SemCKD, path: str | os.PathLike) -> str:
    """Load the ``"attention"`` entry of an official SemCKD/SimKD student checkpoint into ``module``."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "attention" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(
            f"{os.fspath(path)} is not an official SemCKD student checkpoint: expected a dict with an "
            f"'attention' entry (the SelfA state dict), found {found}"
        )
    return load_official_semckd_state(module, checkpoint["attention"])
