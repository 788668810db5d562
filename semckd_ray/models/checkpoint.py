"""Loading model weights, from our checkpoints and from the official SemCKD / RepDistiller ones.

There is one checkpoint format, the official one: a dict whose ``"model"`` entry is the model's
state dict, next to any other entries (``"epoch"``, ``"best_acc"``, ``"optimizer"``, SemCKD's
``"attention"`` module...). Since the zoo keeps the reference module names, a teacher trained
with the official code loads as it is. A bare state dict is accepted too, which is what
torchvision's published weight files are: they load into the zoo's ImageNet models as they are.

Files are always read with ``torch.load(..., weights_only=True)``: a checkpoint is data, and a
pickle that would import or call code is refused rather than run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from torch import Tensor, nn

from semckd_ray.errors import UserError

__all__ = ["load_checkpoint", "read_checkpoint"]

_DDP_PREFIX = "module."
_MAX_LISTED = 8


def load_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Load the weights in ``source`` (a file, or a checkpoint already in memory) into ``model``.

    Returns the checkpoint in the one format, ``{"model": state_dict, **other_entries}`` (a bare
    state dict comes back wrapped), so callers can read its other entries. Raises ``UserError``
    when the file is missing, unreadable, refused for safety, or made for another architecture.
    """
    if isinstance(source, Mapping):
        label = "the given checkpoint"
        checkpoint: Any = source
    else:
        path = Path(source)
        label = f"checkpoint file '{path}'"
        checkpoint = read_checkpoint(path, published=getattr(model, "pretrained_file", None))
    found = _find_state_dict(checkpoint, label)
    state_dict = _strip_ddp_prefix(found)
    _check_compatible(model, state_dict, label)
    model.load_state_dict(state_dict)
    other_entries = {} if found is checkpoint else checkpoint
    return {**other_entries, "model": state_dict}


def read_checkpoint(path: Path, *, published: tuple[str, str] | None = None) -> Any:
    """The contents of a checkpoint file, read with ``weights_only=True``; a ``UserError`` if it cannot be.

    ``published``: ``(file name, URL)`` of published weights that fit the model the file is for (a
    zoo model's ``pretrained_file``), which the message of a missing file says to put there.
    """
    if not path.is_file():
        raise UserError(f"checkpoint file '{path}' does not exist or is not a file; {_where_to_get(path, published)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as err:
        forbidden = re.search(r"GLOBAL (\S+)", str(err))
        if forbidden:
            raise UserError(
                f"checkpoint file '{path}' was refused for safety: it holds pickled code or objects "
                f"({forbidden.group(1)}) that loading with weights_only=True will not run. A checkpoint "
                "should hold only tensors, numbers and strings; if you trust the file, load it yourself "
                "and re-save its state dict with torch.save({'model': state_dict}, path)."
            ) from None
        raise _unreadable(path, err) from None
    except Exception as err:  # a damaged file can fail anywhere in the unpickler, with any error type
        raise _unreadable(path, err) from None


def _where_to_get(path: Path, published: tuple[str, str] | None) -> str:
    if published is None:
        return "check the path."
    name, url = published
    return (f"check the path, or save there the published ImageNet weights (1000 classes) of this model: "
            f"torchvision's {name}, from {url}")


def _unreadable(path: Path, err: Exception) -> UserError:
    # torch's weights-only errors end with a pointer to its docs; the line before says what failed.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith("Check the documentation")]
    reason = reasons[-1] if reasons else type(err).__name__
    return UserError(
        f"checkpoint file '{path}' could not be read: it is corrupt, truncated, not a PyTorch checkpoint, "
        f"or holds pickled objects that loading with weights_only=True refuses for safety "
        f"(torch.load said: {reason})."
    )


def _find_state_dict(checkpoint: Any, label: str) -> Mapping[str, Tensor]:
    if isinstance(checkpoint, Mapping):
        if isinstance(checkpoint.get("model"), Mapping):
            return checkpoint["model"]
        if checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
            return checkpoint
        found = ", ".join(repr(k) for k in list(checkpoint)[:_MAX_LISTED]) or "none"
    else:
        found = f"a {type(checkpoint).__name__}, not a dict"
    raise UserError(
        f"{label} holds no model weights: expected a dict with a 'model' entry holding a state dict "
        f"(the official SemCKD / RepDistiller format) or a bare state dict; found keys: {found}."
    )


def _strip_ddp_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoints saved from a DistributedDataParallel wrapper prefix every key with ``module.``."""
    if state_dict and all(k.startswith(_DDP_PREFIX) for k in state_dict):
        return {k[len(_DDP_PREFIX) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _check_compatible(model: nn.Module, state_dict: Mapping[str, Tensor], label: str) -> None:
    """Raise one message that lists every difference, instead of load_state_dict's first failure."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} (checkpoint {list(v.shape)}, model {list(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = [
        f"{len(keys)} {what}: {_truncate(keys)}"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("keys with a different shape", mismatched),
        )
        if keys
    ]
    raise UserError(
        f"{label} does not fit the model {type(model).__name__}: {'; '.join(problems)}. It was probably "
        "saved from another architecture or with another number of classes; check the model name and num_classes."
    )


def _truncate(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown if len(items) <= _MAX_LISTED else f"{shown}, ... ({len(items) - _MAX_LISTED} more)"
