"""A config is validated without torch, torchvision, Ray or MLflow, so a mistake is reported at once.

The checks that need to know the datasets, models and methods read their torch-free catalogs
(``semckd_ray.data.catalog``, ``semckd_ray.models._registry.ZOO``, ``semckd_ray.distill.catalog``);
the second half of this file keeps those catalogs in step with the code that loads, builds and
trains what they list.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import subprocess
import sys

import pytest

from semckd_ray.errors import UserError
from tests.paths import REPO

HEAVY = ("torch", "torchvision", "ray", "mlflow")
SMOKE = "tune_configs/smoke.yaml"

# Runs ``python -m MODULE ARGS...`` in this process (``runpy``, as ``-m`` does), then prints its exit
# status and which of HEAVY it imported.
RUN_MODULE = f"""
import json, runpy, sys
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exc:
    code = exc.code
print("exit", code)
print("imported", json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def run_module(module: str, *args: str) -> tuple[int, str, list[str]]:
    """Exit status, stderr and the heavy modules imported of ``python -m module args``."""
    proc = subprocess.run([sys.executable, "-c", RUN_MODULE, module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) >= 2, proc.stdout + proc.stderr
    code = int(lines[-2].removeprefix("exit "))
    imported = json.loads(lines[-1].removeprefix("imported "))
    return code, proc.stderr, imported


# Every kind of mistake a config file can hold, each in the smoke experiment: the --set, and what
# the error must say.
MISTAKES = {
    "key typo": ("optim.batchsize=64", "optim.batchsize: unknown key; allowed keys: epochs, batch_size"),
    "unknown model": ("student.model=resnet9", "student.model: unknown model 'resnet9'; valid models: MobileNetV2, "),
    "unknown teacher model": ("teacher.model=resnet21", "teacher.model: unknown model 'resnet21'"),
    "unknown method": ("method.name=semckdd",
                       "method: unknown distillation method 'semckdd'; valid methods: at, crd, fitnet, kd, semckd"),
    "unknown dataset": ("data.dataset=mnist", "data.dataset: Input should be 'cifar100', 'cifar10', 'digits', 'stl10', 'tiny_imagenet' or 'imagefolder'"),
    "wrong type": ("optim.lr=fast", "optim.lr: must be a number, not the string 'fast'"),
    "out of range": ("data.val_size=1437", "data.val_size must be an integer in [0, 1437) for digits"),
    "unknown method option": ("method.options.bogus=1",
                              "unknown option(s) bogus for method 'semckd'; allowed options: factor, proj_width, soft"),
    "bad method option": ("method.options.factor=0", "semckd option factor must be an integer >= 1, got 0"),
    "factor too large for the batch": ("method.options.factor=64", "batch size 32 // factor 64 = 0"),
    "batch not divisible": ("scaling.num_workers=3", "optim.batch_size=32 (the global batch) is not divisible"),
    "missing teacher": ("teacher=null", "method 'semckd' distils from a teacher: add a 'teacher' section"),
    "teacher without use": ("method={name: vanilla}", "method 'vanilla' trains without a teacher"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_training_config_mistake_is_reported_without_importing_torch_ray_or_mlflow(case):
    override, needle = MISTAKES[case]
    code, stderr, imported = run_module("semckd_ray.train", "--config", SMOKE, "--set", override)
    assert code == 2, stderr
    assert stderr.startswith("error: invalid configuration:"), stderr
    assert needle in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert imported == [], f"validating the config imported {imported}"


def test_a_valid_config_is_validated_without_importing_torch_ray_or_mlflow():
    """Every experiment file: a training's (and its search), or a reproduction's with every run of its grid."""
    script = ("import sys\nfrom pathlib import Path\nfrom semckd_ray.config import read_yaml\n"
              "from semckd_ray.reproduce import grid_cells, parse_reproduce, sweep_raw\n"
              "from semckd_ray.tune import parse_search\n"
              "for path in map(Path, sys.argv[1:]):\n"
              "    raw = read_yaml(path)\n"
              "    if 'pairs' in raw:\n"
              "        spec = parse_reproduce(raw)\n"
              "        parse_search(sweep_raw(spec), path.parent, grid_cells(spec))\n"
              "    elif 'search' in raw:\n"
              "        parse_search(raw, path.parent)\n"
              "    else:\n"
              "        from semckd_ray.config import parse_train_config\n"
              "        parse_train_config(raw, config_dir=path.parent)\n"
              f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    configs = sorted(str(p) for p in (REPO / "tune_configs").glob("*.yaml"))
    proc = subprocess.run([sys.executable, "-c", script, *configs], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_evaluate_refuses_a_wrong_config_file_before_it_imports_torch(tmp_path):
    # The checkpoint is never read: the config is checked first.
    code, stderr, imported = run_module("semckd_ray.evaluate", "--checkpoint", str(tmp_path / "nope.pt"),
                                        "--config", SMOKE, "--set", "student.model=resnet9")
    assert code == 2, stderr
    assert "student.model: unknown model 'resnet9'" in stderr
    assert imported == []


def test_the_packages_import_their_torch_names_only_when_used():
    script = ("import sys\nimport semckd_ray.data, semckd_ray.models, semckd_ray.distill\n"
              "from semckd_ray.data import list_datasets, num_classes\n"
              "from semckd_ray.models import list_models\n"
              "from semckd_ray.distill import list_methods, make_options\n"
              f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("package", ["semckd_ray.data", "semckd_ray.models", "semckd_ray.distill"])
def test_every_exported_name_of_a_lazy_package_imports(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018


# --------------------------------------------------------------------------------------------
# The catalogs agree with the code


def test_every_dataset_of_the_catalog_has_a_loader_and_every_loader_an_entry():
    from semckd_ray.data import catalog, datasets

    for name, info in catalog.DATASETS.items():
        if info.cifar_files:
            assert name in datasets._CIFAR, (f"dataset {name!r} is read from CIFAR files (catalog): add its "
                                             "_CifarFormat to _CIFAR in semckd_ray/data/datasets.py")
            assert datasets._CIFAR[name].info is info
        elif info.streamed:  # not loaded: listed and streamed by semckd_ray.data.imagefolder
            assert name not in datasets._BUNDLED and name not in datasets._CIFAR
        else:
            assert name in datasets._BUNDLED, (f"dataset {name!r} of the catalog has no loader: add it to _BUNDLED "
                                               "in semckd_ray/data/datasets.py")
    for name in {*datasets._CIFAR, *datasets._BUNDLED} - set(catalog.DATASETS):
        pytest.fail(f"semckd_ray/data/datasets.py loads {name!r}, which the catalog does not list: "
                    "add its DatasetInfo to DATASETS in semckd_ray/data/catalog.py")
    assert set(datasets._CIFAR).isdisjoint(datasets._BUNDLED)


def test_the_config_takes_exactly_the_catalogs_datasets():
    import typing

    from semckd_ray.config import DataConfig
    from semckd_ray.data.catalog import DATASETS

    assert typing.get_args(DataConfig.model_fields["dataset"].annotation) == tuple(DATASETS)


def _import_package_modules(package: str, skip: frozenset[str] = frozenset()) -> None:
    path = importlib.import_module(package).__path__
    for info in pkgutil.iter_modules(path):
        if info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")


def test_every_model_of_the_zoo_list_is_registered_by_its_module_and_no_other():
    from semckd_ray.models import _registry

    _import_package_modules("semckd_ray.models")  # a model ZOO does not list fails here, at registration
    for name in _registry.list_models():
        assert name in _registry._MODELS, (
            f"model {name!r} is listed in ZOO (semckd_ray/models/_registry.py) but {_registry._MODULE_OF[name]} "
            "registers no such function: register it there (@register_model), or remove it from ZOO")
        assert _registry._MODELS[name].__module__ == _registry._MODULE_OF[name]
    assert sorted(_registry._MODELS, key=str.lower) == _registry.list_models()


def test_a_model_not_in_the_zoo_list_is_refused_at_registration_saying_where_to_add_it():
    from semckd_ray.models import register_model

    def resnet7(num_classes=100):
        raise AssertionError("never built")

    resnet7.__module__ = "semckd_ray.models.resnet"
    with pytest.raises(RuntimeError, match=r"not listed in ZOO: add it to ZOO\['resnet'\] in semckd_ray.models._registry"):
        register_model(resnet7)


def test_every_method_of_the_catalog_has_its_class_derived_from_its_spec():
    from semckd_ray.distill import catalog
    from semckd_ray.distill.base import _METHODS, DistillMethod, NOT_METHOD_MODULES, get_method_class

    _import_package_modules("semckd_ray.distill", NOT_METHOD_MODULES)  # a method without a spec fails here
    for name, spec in catalog.METHODS.items():
        assert name in _METHODS, (f"method {name!r} has a spec in semckd_ray/distill/catalog.py but no module of "
                                  "semckd_ray/distill registers its class: add one (@register_method)")
        cls = get_method_class(name)
        assert issubclass(cls, spec) and issubclass(cls, DistillMethod)
        assert cls.name == name and cls.Options is spec.Options
    assert sorted(_METHODS) == catalog.list_methods()


def test_a_method_without_a_spec_is_refused_at_registration_saying_where_to_declare_it():
    from semckd_ray.distill import DistillMethod, register_method

    class Unlisted(DistillMethod):
        name = "unlisted"

    with pytest.raises(RuntimeError, match="has no spec in semckd_ray.distill.catalog"):
        register_method(Unlisted)

    class NotDerived(DistillMethod):
        name = "kd"

    with pytest.raises(RuntimeError, match=r"does not derive from its spec: class NotDerived\(KDSpec, DistillMethod\)"):
        register_method(NotDerived)


def test_method_options_are_checked_by_the_spec_alone():
    from semckd_ray.distill.catalog import make_options, method_spec

    spec = method_spec("semckd")
    options = make_options("semckd", {"factor": 8})
    assert dataclasses.asdict(options) == {"factor": 8, "soft": 1.0, "proj_width": 2}
    spec.check_batch_size(options, 8)
    with pytest.raises(UserError, match=r"batch size 7 // factor 8 = 0"):
        spec.check_batch_size(options, 7)
    with pytest.raises(UserError, match="unknown distillation method 'nope'; valid methods: at, crd"):
        method_spec("nope")
