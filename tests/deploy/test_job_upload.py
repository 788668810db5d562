"""What ``ray job submit --working-dir .`` uploads: the code and configs, never history, environments, data or results.

Ray packs the working dir by its own function, honouring .gitignore, .rayignore and its default
excludes; these tests call that function, as the CLI does, on the repository's ignore files.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Far below Ray's upload cap (its gRPC message size); the code and configs are well under 1 MiB.
MAX_UPLOAD_BYTES = 5 * 1024 * 1024
RUN_TIME_OUTPUT = [".git/objects/pack/big.pack", ".venv/lib/torch.so", "data/cifar-100-python/train", "mlflow.db",
                   "mlruns/0/meta.yaml", "mlartifacts/1/ckpt.pt", "ray_results/sweep/epoch_1/ckpt.pt",
                   "bench/results/raw.json", "semckd_ray/__pycache__/tune.cpython-311.pyc"]


def ray_package(working_dir: Path, tmp_path: Path) -> list[str]:
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / "package.zip"
    create_package(str(working_dir), target, include_gitignore=True, excludes=get_runtime_env_default_excludes())
    assert target.stat().st_size < MAX_UPLOAD_BYTES, f"{target.stat().st_size} bytes"
    with zipfile.ZipFile(target) as package:
        return [info.filename for info in package.infolist() if not info.is_dir()]


@pytest.fixture
def checkout_with_outputs(tmp_path):
    """The repository's ignore files and code, beside everything a user's checkout accumulates."""
    root = tmp_path / "checkout"
    for name in (".gitignore", ".rayignore", "pyproject.toml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "tune_configs", root / "tune_configs")
    (root / "semckd_ray" / "data").mkdir(parents=True)
    (root / "semckd_ray" / "tune.py").write_text("")
    (root / "semckd_ray" / "data" / "datasets.py").write_text("")
    for path in RUN_TIME_OUTPUT:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"\0" * 1024)
    return root


def test_upload_leaves_out_history_environments_data_and_results(checkout_with_outputs, tmp_path):
    uploaded = ray_package(checkout_with_outputs, tmp_path)
    assert [p for p in uploaded if p in RUN_TIME_OUTPUT] == []
    assert {"semckd_ray/tune.py", "semckd_ray/data/datasets.py", "tune_configs/smoke.yaml",
            "tune_configs/default.yaml", "pyproject.toml"} <= set(uploaded)


def test_upload_of_the_repository_is_small_and_holds_the_entry_point(tmp_path):
    uploaded = ray_package(REPO, tmp_path)
    assert "semckd_ray/tune.py" in uploaded and "tune_configs/smoke.yaml" in uploaded
    assert not [p for p in uploaded if p.split("/")[0] in {".git", ".venv", "data", "mlruns", "ray_results"}]
