"""Where things are (the repository, the official code's golden vectors) and how vectors are compared.

A plain module (not conftest.py, of which the suite has several) so that tests can import it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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




def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the parity measure of the golden vectors' README."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
