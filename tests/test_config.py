"""The experiment config: every mistake is a UserError naming the key and what is allowed."""

from pathlib import Path

import pytest
import yaml

from semckd_ray.config import apply_overrides, flatten, load_train_config, parse_train_config
from semckd_ray.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def base(**sections):
    raw = {"data": {"dataset": "digits"}, "student": {"model": "resnet8"}, "method": {"name": "vanilla"}}
    raw.update(sections)
    return raw


def error_of(raw) -> str:
    with pytest.raises(UserError) as info:
        parse_train_config(raw)
    return str(info.value)


def test_every_shipped_config_is_valid():
    files = sorted((REPO / "tune_configs").glob("*.yaml"))
    assert files
    for path in files:
        cfg = load_train_config(path)
        assert cfg.student.model


def test_unknown_key_names_the_key_and_the_allowed_keys():
    msg = error_of(base(optim={"epochz": 3}))
    assert "optim.epochz" in msg and "unknown key" in msg and "batch_size" in msg


def test_unknown_top_level_section():
    assert "optimisation" in error_of({**base(), "optimisation": {}})


def test_unknown_model_lists_valid_models():
    msg = error_of(base(student={"model": "resnet9000"}))
    assert "student.model" in msg and "resnet9000" in msg and "resnet8x4" in msg


def test_unknown_method_lists_valid_methods():
    msg = error_of(base(method={"name": "magic"}))
    assert "magic" in msg and "semckd" in msg and "fitnet" in msg


def test_unknown_dataset_lists_valid_datasets():
    msg = error_of(base(data={"dataset": "imagenet"}))
    assert "data.dataset" in msg and "cifar100" in msg and "digits" in msg


def test_negative_beta_is_rejected():
    assert "method.beta" in error_of(base(method={"name": "kd", "beta": -1}, teacher={"model": "resnet8", "checkpoint": "x.pt"}))


def test_batch_below_two_is_rejected():
    assert "optim.batch_size" in error_of(base(optim={"batch_size": 1}))


def test_unknown_method_option_lists_allowed_options():
    msg = error_of(base(method={"name": "semckd", "options": {"factr": 2}}, teacher={"model": "resnet8", "checkpoint": "t.pt"}))
    assert "factr" in msg and "factor" in msg and "soft" in msg


def test_distillation_needs_a_teacher_and_vanilla_refuses_one():
    assert "teacher" in error_of(base(method={"name": "semckd"}))
    assert "remove the 'teacher'" in error_of(base(teacher={"model": "resnet8", "checkpoint": "t.pt"}))


def test_teacher_needs_exactly_one_source():
    msg = error_of(base(method={"name": "kd"}, teacher={"model": "resnet8"}))
    assert "exactly one of 'checkpoint'" in msg


def test_official_learning_rate_defaults():
    assert parse_train_config(base()).base_lr() == 0.05
    assert parse_train_config(base(student={"model": "ShuffleV2"})).base_lr() == 0.01
    assert parse_train_config(base(optim={"lr": 0.2})).base_lr() == 0.2


def test_official_method_weights_by_default():
    teacher = {"model": "resnet8", "checkpoint": "t.pt"}
    expected = {"semckd": 400, "fitnet": 100, "at": 1000, "sp": 3000, "vid": 1, "crd": 0.8, "kd": 0}
    for name, beta in expected.items():
        assert parse_train_config(base(method={"name": name}, teacher=teacher)).beta() == beta


def test_paths_become_absolute(tmp_path):
    cfg = parse_train_config(base(data={"dataset": "digits", "root": "rel/data"}))
    assert Path(cfg.data.root).is_absolute()


def test_overrides_parse_yaml_values_and_create_sections():
    raw = apply_overrides(base(), ["optim.epochs=7", "optim.lr_decay_epochs=[3, 5]", "method.options.soft=0.5"])
    assert raw["optim"] == {"epochs": 7, "lr_decay_epochs": [3, 5]}
    assert raw["method"]["options"] == {"soft": 0.5}
    with pytest.raises(UserError, match="dotted.key=value"):
        apply_overrides(base(), ["optim.epochs"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_train_config(bad)


def test_teacher_train_file_is_relative_to_the_config(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(base(method={"name": "kd"}, teacher={"model": "resnet20", "train": "t.yaml"})))
    assert load_train_config(path).teacher.train == str(tmp_path / "t.yaml")


def test_flatten_gives_dotted_params():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": []}) == {"a.b": 1, "a.c.d": 2, "e": []}
