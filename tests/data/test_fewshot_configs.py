"""The few-shot and label-noise experiment files parse, and their sweeps train each value exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from semckd_ray.config import read_yaml
from semckd_ray.tune import parse_search

TUNE_CONFIGS = Path(__file__).resolve().parents[2] / "tune_configs"


@pytest.mark.parametrize(("name", "key", "values", "single"), [
    ("fewshot_resnet32x4_resnet8x4.yaml", "data.train_fraction", [0.25, 0.5, 0.75], ("train_fraction", 0.25)),
    ("label_noise_resnet32x4_resnet8x4.yaml", "data.label_noise", [0.1, 0.3, 0.5], ("label_noise", 0.1)),
])
def test_the_study_files_parse_into_a_grid_of_each_value_once(name, key, values, single):
    path = TUNE_CONFIGS / name
    search, base = parse_search(read_yaml(path), path.parent)
    assert search.sampler == "grid" and search.num_samples == len(values) == search.grid_size()
    assert list(search.space) == [key] and search.space[key].values == values
    assert search.scheduler.type == "none" and search.repeats == 3
    assert getattr(base.data, single[0]) == single[1]
    # The paper's recipe, as the pair's own file.
    _, reference = parse_search(read_yaml(TUNE_CONFIGS / "resnet32x4_resnet8x4.yaml"), TUNE_CONFIGS)
    for section in ("student", "method", "optim", "scaling", "teacher"):
        assert getattr(base, section) == getattr(reference, section), section
    assert base.data.dataset == "cifar100" and base.data.split_seed == 0
