"""Every accepted value trains; every other value is refused, naming the key and what is allowed, before Ray starts.

The commands run in-process (``run_cli(main, argv)``, what ``python -m semckd_ray.train`` /
``semckd_ray.tune`` do) on unusual but plausible input: a binary file as the config, booleans or
strings for numbers, seeds no random generator takes, values at and past every field's edges, typos
inside ``search``. A property over the whole schema checks that each numeric field either refuses
a value with a ``UserError`` naming it or takes it, and that every accepted seed works in every
seed consumer.
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from semckd_ray import train, tune
from semckd_ray.cli import run_cli
from semckd_ray.config import MAX_SEED, TrainConfig, load_train_config, parse_train_config, set_dotted
from semckd_ray.errors import UserError
from semckd_ray.train_loop import worker_seed
from semckd_ray.tune import SearchConfig, parse_search

TRAIN = {
    "name": "strict",
    "seed": 0,
    "data": {"dataset": "digits", "root": "data"},
    "student": {"model": "resnet8"},
    "method": {"name": "vanilla"},
    "optim": {"epochs": 3, "batch_size": 32, "lr": 0.05, "lr_decay_epochs": [2]},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1},
    "checkpoint": {"every": 1},
    "tracking": {"experiment": "strict"},
}
SEARCH = {"num_samples": 2, "seed": 0, "space": {"optim.lr": {"type": "loguniform", "low": 0.01, "high": 0.1}},
          "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}}


RAY_CALLS: list[tuple] = []


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Starting or joining Ray is recorded and refused: in the suite this process has joined the
    session's cluster already, so ``ray.is_initialized()`` cannot tell whether a command started it."""
    from semckd_ray import trainer

    def refuse(*args, **kwargs):
        RAY_CALLS.append(args)
        raise AssertionError("the command went on to start Ray")

    RAY_CALLS.clear()
    monkeypatch.setattr(trainer, "ensure_ray", refuse)


def cli_error(main, argv: list[str], capsys) -> str:
    """Run a command as ``python -m`` does; it must exit 2 with one ``error:`` message, Ray never started."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err and err.startswith("error: "), err
    assert RAY_CALLS == []
    return err


def write(folder: Path, raw: dict, name: str = "exp.yaml") -> str:
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


# ------------------------------------------------------------------------------------------
# A config file that is not text

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))


@pytest.mark.parametrize("content, needle", [
    (PNG, "byte 0x89 at offset 0 is not UTF-8"),
    (np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes(), "is not UTF-8"),
    ("name: caf\u00e9\n".encode("latin-1"), "byte 0xe9 at offset 9 is not UTF-8"),
    (b"name: a\x00b\n", "NUL bytes at offset 7"),
], ids=["png", "random-bytes", "latin-1", "nul"])
@pytest.mark.parametrize("main", [train.main, tune.main], ids=["train", "tune"])
def test_a_config_that_is_not_text_is_a_user_error(tmp_path, capsys, main, content, needle):
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    err = cli_error(main, ["--config", str(path)], capsys)
    assert "is not a YAML text file" in err and needle in err and str(path) in err, err


def test_a_config_that_nests_too_deeply_is_a_user_error(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("name: " + "[" * 1000 + "]" * 1000)
    assert "nests too deeply" in cli_error(train.main, ["--config", str(path)], capsys)


# ------------------------------------------------------------------------------------------
# No coercion: a boolean or a string is not a number, a number is not a boolean


@pytest.mark.parametrize("override, needles", [
    ("optim.lr=true", ("optim.lr", "must be a number", "boolean true")),
    ("optim.epochs=true", ("optim.epochs", "must be an integer", "boolean true")),
    ("optim.lr_decay_epochs=[1, false]", ("optim.lr_decay_epochs", "must be an integer", "boolean false")),
    ("seed=false", ("seed", "must be an integer")),
    ("optim.lr='0.1'", ("optim.lr", "must be a number", "string '0.1'", "without quotes")),
    ("optim.epochs='3'", ("optim.epochs", "string '3'")),
    ("scaling.use_gpu=1", ("scaling.use_gpu", "must be true or false", "not 1")),
    ("scaling.use_gpu='yes'", ("scaling.use_gpu", "true or false", "string 'yes'")),
    ("optim.epochs=2.5", ("optim.epochs", "valid integer", "fractional")),
])
def test_no_value_is_coerced_into_another_kind(tmp_path, capsys, override, needles):
    err = cli_error(train.main, ["--config", write(tmp_path, TRAIN), "--set", override], capsys)
    assert all(n in err for n in needles), err


def test_a_boolean_in_the_file_is_refused_too(tmp_path, capsys):
    raw = copy.deepcopy(TRAIN)
    raw["optim"]["lr"] = True
    err = cli_error(train.main, ["--config", write(tmp_path, raw)], capsys)
    assert "optim.lr: must be a number, not the boolean true" in err


def test_numbers_keep_working_as_written(tmp_path):
    config = write(tmp_path, TRAIN)
    cfg = load_train_config(config, ["optim.lr=0.1", "optim.epochs=2.0", "optim.weight_decay=1e-4",
                                     "method.gamma=1", "optim.momentum=5E-1", "data.split_seed=7"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.weight_decay) == (0.1, 2, 1e-4)
    assert (cfg.method.gamma, cfg.optim.momentum, cfg.data.split_seed) == (1.0, 0.5, 7)
    assert type(cfg.optim.epochs) is int and type(cfg.method.gamma) is float
    (tmp_path / "e.yaml").write_text("student: {model: resnet8}\nmethod: {name: vanilla}\n"
                                     "data: {dataset: digits}\noptim: {lr: 1e-3, weight_decay: 5e-4}\n")
    cfg = load_train_config(tmp_path / "e.yaml")  # YAML 1.1 would read 1e-3 as a string
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-3, 5e-4)


# ------------------------------------------------------------------------------------------
# Bounds, field by field


@pytest.mark.parametrize("override, needles", [
    ("seed=4294967296", ("seed", "less than or equal to 4294967295")),
    ("seed=18446744073709551616", ("seed", "less than or equal to 4294967295")),
    ("seed=-1", ("seed", "greater than or equal to 0")),
    ("data.split_seed=1099511627776", ("data.split_seed", "4294967295")),
    ("optim.epochs=0", ("optim.epochs", "greater than or equal to 1")),
    ("optim.epochs=100000", ("optim.epochs", "less than or equal to 99999")),
    ("optim.warmup_epochs=-1", ("optim.warmup_epochs", "greater than or equal to 0")),
    ("optim.lr_decay_epochs=[2, 100000]", ("optim.lr_decay_epochs", "[1, 99999]")),
    ("optim.batch_size=0", ("optim.batch_size", "greater than or equal to 2")),
    ("optim.batch_size=1000000", ("optim.batch_size=1000000", "training split", "1293 images", "allowed 2 to 1293")),
    ("optim.lr=1e308", ("optim.lr", "not a finite number")),  # with linear scaling below
    ("optim.momentum=1", ("optim.momentum", "less than 1")),
    ("optim.lr_decay_rate=0", ("optim.lr_decay_rate", "greater than 0")),
    ("data.val_size=-1", ("data.val_size", "greater than or equal to 0")),
    ("data.val_size=1000000000000", ("data.val_size", "[0, 1437)")),
    ("data.eval_batch_size=0", ("data.eval_batch_size", "greater than or equal to 1")),
    ("scaling.num_workers=0", ("scaling.num_workers", "greater than or equal to 1")),
    ("scaling.num_workers=1000000", ("scaling.num_workers=1000000", "not divisible")),
    ("scaling.cpus_per_worker=0", ("scaling.cpus_per_worker", "greater than or equal to 0.0001")),
    ("scaling.cpus_per_worker=0.00015", ("scaling.cpus_per_worker", "multiple of 0.0001")),
    ("scaling.cpus_per_worker=1e9", ("scaling.cpus_per_worker", "less than or equal to")),
    ("scaling.max_failures=-2", ("scaling.max_failures", "greater than or equal to -1")),
    ("checkpoint.every=0", ("checkpoint.every", "greater than or equal to 1")),
    ("checkpoint.keep=0", ("checkpoint.keep", "greater than or equal to 1")),
    ("checkpoint.keep=1000000", ("checkpoint.keep", "99999")),
    ("name=''", ("name", "non-empty")),
    ("name=a/b", ("name", "without '/'")),
    ("name=" + "x" * 201, ("name", "at most 200 bytes")),
    ("tracking.experiment=''", ("tracking.experiment", "at least 1 character")),
    ("tracking.run_name=''", ("tracking.run_name", "at least 1 character")),
])
def test_each_field_refuses_what_the_code_cannot_honour(tmp_path, capsys, override, needles):
    extra = ["--set", "optim.lr_scaling=linear", "--set", "optim.lr_reference_batch=1"] if "1e308" in override else []
    err = cli_error(train.main, ["--config", write(tmp_path, TRAIN), "--set", override, *extra], capsys)
    assert all(n in err for n in needles), err


def test_the_edges_that_are_allowed_load(tmp_path):
    cfg = load_train_config(write(tmp_path, TRAIN), [
        f"seed={MAX_SEED}", f"data.split_seed={MAX_SEED}", "optim.epochs=99999", "optim.batch_size=1293",
        "scaling.cpus_per_worker=0.0001", "scaling.max_failures=-1", "checkpoint.keep=99999", "data.val_size=0",
        "optim.momentum=0"])
    assert cfg.seed == MAX_SEED and cfg.optim.batch_size == 1293


# ------------------------------------------------------------------------------------------
# The search section


@pytest.mark.parametrize("search, needles, absent", [
    ({"num_sampels": 4}, ("search.num_sampels", "unknown key", "allowed keys: num_samples, sampler, max_concurrent, repeats,"
                                                                " seed, space, scheduler"), ("data", "optim")),
    ({"scheduler": {"grace_perod": 1}}, ("search.scheduler.grace_perod", "allowed keys: type, grace_period, "
                                                                        "reduction_factor"), ()),
    ({"space": {"optim.lr": {"type": "uniform", "lo": 0.1}}},
     ("search.space.optim.lr.lo", "allowed keys: type, low, high, values"), ()),
    ({"num_samples": True}, ("search.num_samples", "must be an integer", "boolean"), ()),
    ({"seed": 2**32}, ("search.seed", "less than or equal to 4294967295"), ()),
    ({"seed": -1}, ("search.seed", "greater than or equal to 0"), ()),
    ({"repeats": 0}, ("search.repeats", "greater than or equal to 1"), ()),
    ({"scheduler": {"reduction_factor": float("inf")}}, ("search.scheduler.reduction_factor", "finite"), ()),
    ({"scheduler": {"grace_period": 4}}, ("search.scheduler.grace_period=4", "optim.epochs=3", "1 to 3"), ()),
    ({"space": {"optim.lr": {"type": "uniform", "low": "0.01", "high": 0.1}}},
     ("search.space.optim.lr.low", "must be a number", "string"), ()),
    ({"space": {"optim.lr": {"type": "uniform", "low": -1e308, "high": 1e308}}},
     ("search.space.optim.lr", "finite width"), ()),
    ({"space": {"optim.epochs": {"type": "randint", "low": 1.5, "high": 3}}},
     ("search.space.optim.epochs", "integer bounds", "low=1.5"), ()),
    ({"space": {"optim.epochs": {"type": "uniform", "low": 1, "high": 3}}},
     ("search.space.optim.epochs", "samples fractions", "use type 'randint'"), ()),
    ({"space": {"seed": {"type": "randint", "low": 0, "high": 2**33}}},
     ("search.space.seed", "4294967295"), ()),
    ({"repeats": 3, "space": {"seed": {"type": "randint", "low": 0, "high": 2**32}}},
     ("search.repeats=3", "4294967297", "largest seed 4294967295"), ()),
])
def test_search_errors_name_the_search_key_and_its_allowed_values(tmp_path, capsys, search, needles, absent):
    raw = {**copy.deepcopy(TRAIN), "search": {**copy.deepcopy(SEARCH), **search}}
    err = cli_error(tune.main, ["--config", write(tmp_path, raw)], capsys)
    assert all(n in err for n in needles), err
    hint = err.split("allowed keys:")[-1]
    assert not any(a in hint for a in absent), err


def test_a_seed_at_the_top_of_the_range_with_repeats_is_refused(tmp_path):
    raw = {**copy.deepcopy(TRAIN), "seed": MAX_SEED, "search": {**SEARCH, "repeats": 2}}
    with pytest.raises(UserError, match="search.repeats=2 trains seeds up to"):
        parse_search(raw, tmp_path)
    raw["seed"] = MAX_SEED - 1
    assert parse_search(raw, tmp_path)[0].repeats == 2


# ------------------------------------------------------------------------------------------
# A property over the schema: every numeric field takes a value or refuses it naming the field


def _numeric_fields(model: type[BaseModel], prefix: str = "") -> dict[str, type]:
    """Dotted key -> int or float, for every numeric field (a list's elements included) of ``model``."""
    found: dict[str, type] = {}
    for name, field in model.model_fields.items():
        stack, kinds = [field.annotation], set()
        while stack:
            ann = stack.pop()
            args = typing.get_args(ann)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                found.update(_numeric_fields(ann, f"{prefix}{name}."))
            elif typing.get_origin(ann) is not dict and args and typing.get_origin(ann) is not typing.Literal:
                stack.extend(args)
            elif ann in (int, float):
                kinds.add(ann)
        if kinds:
            found[prefix + name] = float if float in kinds else int
    return found


TRAIN_FIELDS = _numeric_fields(TrainConfig)
SEARCH_FIELDS = {f"search.{k}": v for k, v in _numeric_fields(SearchConfig).items()}
SEED_FIELDS = {"seed", "data.split_seed", "search.seed"}
EDGES = [0, 1, 2, -1, -2, 2**31 - 1, 2**31, MAX_SEED, MAX_SEED + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
         2**70, -(2**63), 0.0, 1.0, 2.0, 0.5, -0.5, 1e-5, 1e-300, 1e300, 1.7e308, True, False, "1", "0.1", "", None]
values = st.sampled_from(EDGES) | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=True)
BOUNDED = settings(max_examples=250, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _seeds_work(seed: int) -> None:
    """Every consumer of a seed takes it: the data pipeline, the models' init, each rank's stream, Optuna."""
    from optuna.samplers import TPESampler

    np.random.default_rng(seed)
    np.random.RandomState(seed)
    torch.Generator().manual_seed(seed)
    try:
        torch.manual_seed(seed)
        for rank in range(8):
            for more in ((), (0,), (10**5,)):
                derived = worker_seed(seed, rank, *more)
                assert 0 <= derived < 2**63
                torch.manual_seed(derived)
                torch.Generator().manual_seed(derived)
    finally:
        torch.manual_seed(0)  # the global generator as the other tests expect it
    TPESampler(seed=seed)


def _check(key: str, value, load) -> None:
    try:
        loaded = load()
    except UserError as exc:
        assert key in str(exc), (key, value, str(exc))
        return
    if value is None:
        return  # an optional field's default
    assert not isinstance(value, (bool, str)), f"{key} took {value!r}"
    if key in SEED_FIELDS:
        _seeds_work(loaded)
    if TRAIN_FIELDS.get(key) is int or SEARCH_FIELDS.get(key) is int:
        assert loaded == value and float(loaded).is_integer()


@BOUNDED
@given(key=st.sampled_from(sorted(TRAIN_FIELDS)), value=values)
def test_every_numeric_training_field_takes_a_value_or_refuses_it_by_name(key, value):
    raw = copy.deepcopy(TRAIN)
    set_dotted(raw, key, [value] if key == "optim.lr_decay_epochs" else value)

    def load():
        cfg = parse_train_config(raw)
        field = cfg.model_dump()
        for part in key.split("."):
            field = field[part]
        return field[0] if key == "optim.lr_decay_epochs" else field

    _check(key, value, load)


@BOUNDED
@given(key=st.sampled_from(sorted(SEARCH_FIELDS)), value=values)
def test_every_numeric_search_field_takes_a_value_or_refuses_it_by_name(key, value, tmp_path_factory):
    raw = {**copy.deepcopy(TRAIN), "search": copy.deepcopy(SEARCH)}
    set_dotted(raw, key, value)

    def load():
        search, _ = parse_search(raw, tmp_path_factory.getbasetemp())
        field = search.model_dump()
        for part in key.split(".")[1:]:
            field = field[part]
        return field

    _check(key, value, load)


def test_the_schema_walk_sees_every_numeric_field():
    assert {"seed", "data.split_seed", "optim.epochs", "optim.lr", "optim.lr_decay_epochs", "scaling.cpus_per_worker",
            "checkpoint.keep", "data.val_size", "method.beta"} <= set(TRAIN_FIELDS)
    assert {"search.seed", "search.repeats", "search.scheduler.grace_period",
            "search.scheduler.reduction_factor"} <= set(SEARCH_FIELDS)


@settings(BOUNDED, max_examples=15)
@given(seed=st.integers(0, MAX_SEED) | st.sampled_from([0, MAX_SEED]))
def test_every_accepted_seed_works_in_every_seed_consumer(seed):
    cfg = parse_train_config({**TRAIN, "seed": seed, "data": {**TRAIN["data"], "split_seed": seed}})
    _seeds_work(cfg.seed)
    _seeds_work(cfg.data.split_seed)
