"""The golden directory: every file in it is checked by some test, and it holds at least one.

Any subset of kinds is a valid directory (a float32 SemCKD file alone, say): the parity tests loop
over what is there, and this guard makes sure that something was.
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import pytest
import torch
from golden import golden_dir, golden_kinds


def check_directory(directory: Path) -> dict[str, int]:
    """How many files of each kind ``directory`` holds; AssertionError if none, or one of no known kind."""
    kinds = golden_kinds(directory)
    unknown = [path.name for path, kind in kinds.items() if kind is None]
    assert not unknown, f"no test checks {unknown} (known kinds: golden/README.md); none of its keys is recognised"
    assert kinds, f"no golden vector in {directory}: no parity test would check anything"
    return collections.Counter(kinds.values())


def test_golden_directory_is_checked_whole():
    directory = golden_dir()
    if not directory.is_dir():
        pytest.skip(f"golden directory {directory} not found (set SEMCKD_GOLDEN_DIR)")
    print(check_directory(directory))


def test_a_directory_with_one_kind_is_valid(tmp_path):
    source = next(golden_dir().glob("kd_*.pt"), None) or next(golden_dir().glob("*.pt"), None)
    if source is None:
        pytest.skip("no golden vector to copy")
    shutil.copy(source, tmp_path)
    assert len(check_directory(tmp_path)) == 1


def test_an_empty_directory_or_an_unknown_file_fails(tmp_path):
    with pytest.raises(AssertionError, match="no golden vector"):
        check_directory(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "something_else.pt")
    with pytest.raises(AssertionError, match="something_else.pt"):
        check_directory(tmp_path)
