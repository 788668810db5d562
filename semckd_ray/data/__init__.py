"""Datasets held in memory as uint8 tensors, and the batched, on-device input pipeline that feeds them."""

from semckd_ray.data.datasets import (
    DatasetSplits,
    Split,
    check_dataset,
    check_val_size,
    list_datasets,
    load_dataset,
    needs_files,
    num_classes,
    prepare_dataset,
)
from semckd_ray.data.pipeline import Batch, BatchLoader, eval_loader, random_crop_flip, sample_crop_flip, train_loader

__all__ = [
    "Batch",
    "BatchLoader",
    "DatasetSplits",
    "Split",
    "check_dataset",
    "check_val_size",
    "eval_loader",
    "list_datasets",
    "load_dataset",
    "needs_files",
    "num_classes",
    "prepare_dataset",
    "random_crop_flip",
    "sample_crop_flip",
    "train_loader",
]
