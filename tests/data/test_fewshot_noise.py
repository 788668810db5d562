"""data.train_fraction (few-shot, stratified) and data.label_noise (symmetric), on digits, without Ray:
counts per class, val and test untouched, seeding, and the files a run logs to be audited."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from semckd_ray.config import parse_train_config
from semckd_ray.data import (
    fewest_train_images,
    load_dataset,
    log_training_data,
    stratified_fraction,
    symmetric_label_noise,
    training_data_metrics,
)
from semckd_ray.errors import UserError

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def digits():
    """load_dataset("digits") at each fraction, and at 0.5 with 30% noise (split_seed 0)."""
    runs = {f: load_dataset("digits", "unused", train_fraction=f) for f in FRACTIONS}
    runs["noisy"] = load_dataset("digits", "unused", train_fraction=0.5, label_noise=0.3)
    return runs


def test_each_class_keeps_round_f_n_of_its_training_images(digits):
    full = digits[1.0]
    available = torch.bincount(full.train.labels, minlength=10)
    for f in FRACTIONS:
        data = digits[f]
        assert data.record.available.tolist() == available.tolist()
        kept = torch.bincount(data.train.labels, minlength=10)
        assert kept.tolist() == [max(1, round(f * n)) for n in available.tolist()]
        # Every kept image is one of the full training split's, with its label.
        assert set(data.record.index.tolist()) <= set(full.record.index.tolist())
        label_of = dict(zip(full.record.index.tolist(), full.train.labels.tolist()))
        assert data.train.labels.tolist() == [label_of[i] for i in data.record.index.tolist()]


def test_val_and_test_are_the_same_whatever_the_fraction_and_the_noise(digits):
    full = digits[1.0]
    for data in digits.values():
        for split in ("val", "test"):
            assert torch.equal(getattr(data, split).images, getattr(full, split).images)
            assert torch.equal(getattr(data, split).labels, getattr(full, split).labels)
        assert (data.mean, data.std) == (full.mean, full.std)


def test_fraction_one_and_no_noise_is_the_training_split_as_before(digits):
    full = digits[1.0]
    again = load_dataset("digits", "unused")
    assert torch.equal(full.train.images, again.train.images) and torch.equal(full.train.labels, again.train.labels)
    assert full.record.index.tolist() == sorted(full.record.index.tolist()) and len(full.train) == 1293


def test_fractions_are_nested_and_drawn_by_the_split_seed(digits):
    quarter, half, three = (set(digits[f].record.index.tolist()) for f in (0.25, 0.5, 0.75))
    assert quarter < half < three  # one permutation per split seed, whatever the fraction
    again = load_dataset("digits", "unused", train_fraction=0.25)
    assert torch.equal(again.train.images, digits[0.25].train.images)
    other = load_dataset("digits", "unused", train_fraction=0.25, seed=1)
    assert set(other.record.index.tolist()) != quarter


def test_stratified_fraction_keeps_at_least_one_image_of_every_class():
    labels = torch.tensor([0] * 3 + [1] * 40 + [2] * 1)
    kept = stratified_fraction(labels, 0.01, 3, seed=0)
    assert torch.bincount(labels[kept], minlength=3).tolist() == [1, 1, 1]
    assert torch.equal(stratified_fraction(labels, 0.5, 3, seed=7), stratified_fraction(labels, 0.5, 3, seed=7))
    assert torch.bincount(labels[stratified_fraction(labels, 0.5, 3, seed=0)], minlength=3).tolist() == [2, 20, 1]
    assert stratified_fraction(labels, 1.0, 3, seed=0).tolist() == list(range(44))


def test_label_noise_redraws_its_rate_of_each_class_uniformly_and_only_in_train(digits):
    data, clean_run = digits["noisy"], digits[0.5]
    record = data.record
    # Noise comes after the fraction: the same images as the noise-free run at 0.5, with their clean labels.
    assert torch.equal(record.index, clean_run.record.index)
    assert torch.equal(record.clean_labels, clean_run.train.labels)
    assert torch.equal(data.train.images, clean_run.train.images)
    per_class = torch.bincount(record.clean_labels, minlength=10)
    redrawn = torch.bincount(record.clean_labels[record.redrawn], minlength=10)
    assert redrawn.tolist() == [round(0.3 * n) for n in per_class.tolist()]  # the rate, within rounding
    changed = record.clean_labels != data.train.labels
    assert not (changed & ~record.redrawn).any()  # only redrawn labels change
    assert 0 < int(changed.sum()) < int(record.redrawn.sum())  # a redrawn label may draw its own class
    assert set(data.train.labels[record.redrawn].tolist()) == set(range(10))
    again = load_dataset("digits", "unused", train_fraction=0.5, label_noise=0.3)
    assert torch.equal(again.train.labels, data.train.labels)
    other = load_dataset("digits", "unused", train_fraction=0.5, label_noise=0.3, seed=1)
    assert not torch.equal(other.record.redrawn, record.redrawn) or not torch.equal(other.record.index, record.index)


def test_symmetric_label_noise_matches_the_official_definition():
    labels = torch.arange(100).repeat_interleave(50)  # CIFAR-100-like: 50 per class
    noisy, redrawn = symmetric_label_noise(labels, 0.3, 100, seed=0)
    assert torch.bincount(labels[redrawn], minlength=100).tolist() == [15] * 100
    changed = float((noisy != labels).float().mean())
    assert changed == pytest.approx(0.3 * (1 - 1 / 100), abs=0.02)
    same, none = symmetric_label_noise(labels, 0.0, 100, seed=0)
    assert torch.equal(same, labels) and not none.any()
    with pytest.raises(UserError, match=r"data.label_noise must be a number in \[0, 1\)"):
        symmetric_label_noise(labels, 1.0, 100, seed=0)


class RecordingLogger:
    def __init__(self):
        self.artifacts: list[tuple[Path, str]] = []
        self.metrics: list[tuple[dict, int]] = []

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((Path(path), artifact_path))

    def log_metrics(self, metrics, step):
        self.metrics.append((metrics, step))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_run_logs_the_noisy_labels_and_the_realised_counts(digits, tmp_path):
    data = digits["noisy"]
    logger = RecordingLogger()
    log_training_data(logger, data, tmp_path)
    files = {path.name: path for path, where in logger.artifacts}
    assert {where for _, where in logger.artifacts} == {"data"}
    assert set(files) == {"train_class_counts.csv", "train_subset.csv", "label_noise.csv"}
    assert all(path.parent == tmp_path / "data" for path in files.values())

    noise = _rows(files["label_noise.csv"])
    assert list(noise[0]) == ["index", "original_label", "noisy_label"]
    assert len(noise) == int(data.record.redrawn.sum())  # every redrawn label, changed or not
    position = {i: k for k, i in enumerate(data.record.index.tolist())}
    for row in noise:
        k = position[int(row["index"])]
        assert int(row["original_label"]) == int(data.record.clean_labels[k])
        assert int(row["noisy_label"]) == int(data.train.labels[k])

    counts = _rows(files["train_class_counts.csv"])
    assert [int(r["kept"]) for r in counts] == torch.bincount(data.record.clean_labels, minlength=10).tolist()
    assert [r["name"] for r in counts] == list(data.class_names)
    assert sum(int(r["changed"]) for r in counts) == int((data.train.labels != data.record.clean_labels).sum())
    subset = _rows(files["train_subset.csv"])
    assert [int(r["index"]) for r in subset] == data.record.index.tolist()

    (metrics, step), = logger.metrics
    assert step == 0 and metrics == training_data_metrics(data)
    assert metrics["data_train_images"] == len(data.train) == len(subset)
    assert metrics["data_noisy_labels"] == len(noise)
    assert metrics["data_changed_labels"] == sum(r["original_label"] != r["noisy_label"] for r in noise)
    assert metrics["data_val_images"] == 144 and metrics["data_test_images"] == 360


def test_a_clean_full_run_logs_only_the_class_counts_and_a_resumed_one_no_metrics(digits, tmp_path):
    logger = RecordingLogger()
    log_training_data(logger, digits[1.0], tmp_path, metrics=False)
    assert [path.name for path, _ in logger.artifacts] == ["train_class_counts.csv"] and logger.metrics == []


# ------------------------------------------------------------------------------------------
# The config: ranges named, and a fraction that leaves fewer images than a batch refused


def config(**data):
    return {"data": {"dataset": "digits", **data}, "student": {"model": "resnet8"}, "method": {"name": "vanilla"},
            "optim": {"batch_size": 32}}


def error_of(raw) -> str:
    with pytest.raises(UserError) as info:
        parse_train_config(raw)
    return str(info.value)


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("train_fraction", 0, r"(0, 1]"), ("train_fraction", 1.5, r"(0, 1]"), ("train_fraction", -0.1, r"(0, 1]"),
    ("label_noise", 1, r"[0, 1)"), ("label_noise", -0.5, r"[0, 1)"),
])
def test_fraction_and_noise_outside_their_range_are_refused_by_name(key, value, allowed):
    msg = error_of(config(**{key: value}))
    assert f"data.{key}: must be a number in {allowed}" in msg and f"got {value!r}" in msg


def test_fraction_and_noise_defaults_and_types():
    cfg = parse_train_config(config())
    assert (cfg.data.train_fraction, cfg.data.label_noise) == (1.0, 0.0)
    assert "data.train_fraction" in error_of(config(train_fraction=True))
    assert "data.label_noise" in error_of(config(label_noise="0.1"))
    assert parse_train_config(config(train_fraction=1, label_noise=0)).data.train_fraction == 1.0


def test_a_fraction_that_leaves_fewer_images_than_the_batch_is_refused():
    assert parse_train_config(config(train_fraction=0.03)).data.train_images() == 34  # 1293 * 0.03 - 5
    msg = error_of(config(train_fraction=0.02))
    assert "optim.batch_size=32 (the global batch) is larger than the training split of digits" in msg
    assert "at least 21 images once data.val_size are held out and data.train_fraction=0.02" in msg
    assert "raise data.train_fraction" in msg
    # The tiniest fraction keeps one image of each class: fine for a batch that fits.
    assert parse_train_config({**config(train_fraction=1e-9), "optim": {"batch_size": 8}}).data.train_images() == 10


def test_the_lower_bound_holds_for_the_drawn_split(digits):
    for f in (0.02, 0.03, 0.25, 0.5, 0.75, 1.0):
        drawn = len(digits[f].train) if f in digits else len(load_dataset("digits", "unused", train_fraction=f).train)
        assert fewest_train_images("digits", None, f) <= drawn
    assert fewest_train_images("cifar100", None, 0.001) == 100 and fewest_train_images("cifar100", None) == 45000


def test_the_new_data_keys_at_their_defaults_leave_a_configs_digest_as_it_was():
    """Finished runs logged before train_fraction, label_noise and the streaming keys existed are still found
    for reuse: the digest is the one of the config without them."""
    import hashlib
    import json

    from semckd_ray.config import parse_train_config
    from semckd_ray.trainer import config_digest

    raw = {"data": {"dataset": "digits"}, "student": {"model": "resnet8"}, "method": {"name": "vanilla"},
           "optim": {"epochs": 1, "batch_size": 32}}
    cfg = parse_train_config(raw, config_dir=".")
    added = {"train_fraction", "label_noise", "image_size", "crop_scale", "eval_resize", "decode_cpus",
             "prefetch_batches"}
    before = cfg.model_dump(mode="json", exclude={"tracking": True, "data": {"root", "download", *added}})
    assert config_digest(cfg) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    fewer = parse_train_config({**raw, "data": {"dataset": "digits", "train_fraction": 0.5}}, config_dir=".")
    noisy = parse_train_config({**raw, "data": {"dataset": "digits", "label_noise": 0.3}}, config_dir=".")
    assert len({config_digest(cfg), config_digest(fewer), config_digest(noisy)}) == 3
