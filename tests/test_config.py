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
    """A training's experiment file, or a reproduction's (``pairs``: every run of its grid is a valid config)."""
    from semckd_ray.reproduce import grid_cells, parse_reproduce, sweep_raw
    from semckd_ray.tune import cell_config

    files = sorted((REPO / "tune_configs").glob("*.yaml"))
    assert files
    grids = 0
    for path in files:
        raw = yaml.safe_load(path.read_text())
        if "pairs" in raw:
            spec = parse_reproduce(raw)
            configs = [cell_config(sweep_raw(spec), cell, path.parent) for cell in grid_cells(spec)]
            assert {c.tracking.experiment for c in configs} == {spec.recipe["tracking"]["experiment"]}
            grids += 1
            continue
        cfg = load_train_config(path)
        assert cfg.student.model
    assert grids == 5


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


# --- the global batch over N workers ----------------------------------------------------------


def test_the_global_batch_must_split_evenly_over_the_workers():
    msg = error_of(base(optim={"batch_size": 63}, scaling={"num_workers": 2}))
    assert "optim.batch_size=63" in msg and "scaling.num_workers=2" in msg and "62 or 64" in msg
    cfg = parse_train_config(base(optim={"batch_size": 64}, scaling={"num_workers": 4}))
    assert (cfg.optim.batch_size, cfg.per_worker_batch()) == (64, 16)
    assert parse_train_config(base(optim={"batch_size": 64})).per_worker_batch() == 64  # N=1: unchanged


def test_semckd_is_checked_at_the_per_worker_batch_and_the_error_names_both():
    teacher = {"model": "resnet8", "checkpoint": "t.pt"}
    semckd = {"name": "semckd", "options": {"factor": 32}}
    assert parse_train_config(base(method=semckd, teacher=teacher, optim={"batch_size": 64}))
    msg = error_of(base(method=semckd, teacher=teacher, optim={"batch_size": 64}, scaling={"num_workers": 4}))
    assert "batch size 16" in msg and "optim.batch_size=64" in msg and "scaling.num_workers=4" in msg


def test_sync_bn_is_a_gpu_setting_and_warmup_needs_lr_scaling():
    assert "scaling.use_gpu" in error_of(base(scaling={"sync_bn": True}))
    assert parse_train_config(base(scaling={"sync_bn": True, "use_gpu": True})).scaling.sync_bn
    assert "optim.lr_scaling" in error_of(base(optim={"warmup_epochs": 5}))
    assert "lr_scaling" in error_of(base(optim={"lr_scaling": "sqrt"}))


def test_lr_is_the_official_schedule_unless_linear_scaling_is_asked_for():
    from semckd_ray.train_loop import lr_at

    official = parse_train_config(base(optim={"batch_size": 256, "lr": 0.05, "lr_decay_epochs": [3]}),)
    assert [lr_at(official, e) for e in (1, 3, 4)] == pytest.approx([0.05, 0.05, 0.005])  # whatever the batch
    scaled = parse_train_config(base(optim={"batch_size": 256, "lr": 0.05, "lr_decay_epochs": [3],
                                            "lr_scaling": "linear", "warmup_epochs": 2}))
    assert scaled.peak_lr() == pytest.approx(0.2)  # 0.05 x 256 / 64
    assert [lr_at(scaled, e) for e in (1, 2, 3, 4)] == pytest.approx([0.125, 0.2, 0.2, 0.02])


def test_a_share_of_a_gpu_needs_a_gpu_and_one_worker():
    ok = parse_train_config(base(scaling={"use_gpu": True, "gpus_per_worker": 0.25}))
    assert ok.scaling.gpus_per_worker == 0.25
    assert "needs scaling.use_gpu: true" in error_of(base(scaling={"gpus_per_worker": 0.5}))
    message = error_of(base(scaling={"use_gpu": True, "gpus_per_worker": 0.5, "num_workers": 2},
                            optim={"batch_size": 64}))
    assert "one worker per trial only" in message and "ray-project/ray#48012" in message
    for bad in (0, -0.5, 1.5):
        assert "scaling.gpus_per_worker" in error_of(base(scaling={"use_gpu": True, "gpus_per_worker": bad}))


def test_cuda_graphs_need_a_gpu_one_worker_and_no_compile():
    assert parse_train_config(base(scaling={"use_gpu": True, "cuda_graphs": True})).scaling.cuda_graphs
    assert "needs scaling.use_gpu: true" in error_of(base(scaling={"cuda_graphs": True}))
    assert "num_workers: 1" in error_of(base(scaling={"use_gpu": True, "cuda_graphs": True, "num_workers": 2},
                                             optim={"batch_size": 64}))
    assert "choose one" in error_of(base(scaling={"use_gpu": True, "cuda_graphs": True, "compile": True}))


def test_the_validation_split_is_chosen_by_split_seed_not_by_seed():
    from semckd_ray.data import load_dataset

    assert parse_train_config(base()).data.split_seed == 0
    assert "split_seed" in error_of(base(data={"dataset": "digits", "split_seed": -1}))
    seeds = [parse_train_config(base(seed=s)) for s in (0, 1)]
    assert {c.data.split_seed for c in seeds} == {0}  # every seed of a trial: one validation split
    a, b = (load_dataset("digits", "unused", seed=0).val.labels for _ in range(2))
    assert a.tolist() == b.tolist()
    assert load_dataset("digits", "unused", seed=1).val.labels.tolist() != a.tolist()


def test_asha_judges_the_cifar_sweeps_after_the_first_lr_decay():
    """Rungs before the decay at 150 would rank trials by their noisy constant-lr phase."""
    checked = 0
    for path in sorted((REPO / "tune_configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        scheduler = (raw.get("search") or {}).get("scheduler") or {}
        if scheduler.get("type", "asha") != "asha" or not raw.get("search") or raw["optim"]["epochs"] < 200:
            continue
        grace, factor = scheduler.get("grace_period", 1), scheduler.get("reduction_factor", 2)
        rungs, rung = [], grace
        while rung < raw["optim"]["epochs"]:  # Ray's ASHA: grace x factor^k below max_t
            rungs.append(rung)
            rung *= factor
        first_decay = min(raw["optim"].get("lr_decay_epochs", [150, 180, 210]))
        assert rungs and min(rungs) > first_decay, (path.name, rungs, first_decay)
        checked += 1
    assert checked >= 7
