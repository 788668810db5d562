"""What can be checked of the image without a Docker engine: base, install steps, user, entry point, context."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
# Never in the build context: history, local environments, run-time output, datasets.
NEVER_IN_CONTEXT = [".git/config", ".venv/bin/python", "mlflow.db", "mlruns/0/meta.yaml", "mlartifacts/1/a.pt",
                    "ray_results/sweep/epoch_1/checkpoint.pt", "data/cifar-100-python/train",
                    "bench/results/raw.json", "semckd_ray/__pycache__/tune.cpython-311.pyc",
                    "semckd_ray.egg-info/PKG-INFO"]


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in lines if line and not line.startswith("#")]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is left out when it or a parent folder matches; the last match wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = "".join(".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?" else re.escape(tok)
                        for tok in re.split(r"(\*\*|\*|\?)", glob))
        regex = regex.replace(".*/", "(.*/)?")  # `**/x` also matches a top-level x
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_image_builds_on_the_ray_gpu_image_matching_the_pinned_ray_and_python():
    froms = [args for name, args in instructions() if name == "FROM"]
    assert froms == [BASE_IMAGE]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray["))
    ray_version, python_tag, _ = BASE_IMAGE.split(":")[1].split("-")
    assert ray_pin.endswith("==" + ray_version)
    assert f"{python_tag[2]}.{python_tag[3:]}" in SpecifierSet(project["requires-python"])


def test_dependencies_come_from_pyproject_and_the_project_is_installed():
    runs = [args for name, args in instructions() if name == "RUN"]
    assert any("pyproject.toml" in run and "pip install" in run for run in runs)
    installs_project = [run for run in runs if re.search(r"pip install\b.*(\s-e)?\s\.(\s|$)", run)]
    assert installs_project, runs
    copies = [args for name, args in instructions() if name == "COPY"]
    assert any(shlex.split(c)[-2] == "." for c in copies), "the project must be copied in"


def test_image_runs_as_the_non_root_ray_user_in_the_project_folder():
    users = [args for name, args in instructions() if name == "USER"]
    assert users and users[-1] not in ("root", "0")
    workdirs = [args for name, args in instructions() if name == "WORKDIR"]
    assert workdirs and workdirs[-1].startswith("/home/ray/")
    for name, args in instructions():
        if name == "COPY" and "--chown" in args:
            assert "--chown=1000:100" in args or "--chown=ray" in args


def test_default_command_runs_the_tune_module_on_a_config_that_exists():
    (cmd,) = [json.loads(args) for name, args in instructions() if name == "CMD"]
    assert cmd[:3] == ["python", "-m", "semckd_ray.tune"]
    assert (REPO / "semckd_ray" / "tune.py").is_file()
    assert (REPO / cmd[cmd.index("--config") + 1]).is_file()


@pytest.mark.parametrize("path", NEVER_IN_CONTEXT)
def test_dockerignore_keeps_out_history_environments_outputs_and_data(path):
    assert dockerignored(path, dockerignore_patterns())


def test_dockerignore_keeps_what_the_install_needs():
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("readme", "README.md")
    needed = ["pyproject.toml", readme, "semckd_ray/tune.py", "semckd_ray/data/datasets.py",
              "tune_configs/default.yaml", "tune_configs/smoke.yaml"]
    assert [p for p in needed if dockerignored(p, dockerignore_patterns())] == []
