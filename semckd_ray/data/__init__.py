"""Datasets held in memory as uint8 tensors, and the batched, on-device input pipeline that feeds them.

The names below are imported from their modules when first used: importing this package, or its
torch-free ``catalog`` (what the config is validated against), does not import torch.
"""

from semckd_ray._lazy import lazy_exports

# Each exported name and the module that defines it.
_EXPORTS = {
    **dict.fromkeys(["DatasetInfo", "IN_MEMORY_IMAGE_SIZE", "STREAMED_IMAGE_SIZE", "check_label_noise", "check_train_fraction", "check_val_size", "dataset_info",
                     "fewest_train_images", "is_streamed", "kept_per_class", "list_datasets", "needs_files",
                     "num_classes", "train_images"], "catalog"),
    **dict.fromkeys(["DatasetSplits", "Split", "TrainRecord", "check_dataset", "load_dataset", "log_training_data",
                     "prepare_dataset", "stratified_fraction", "symmetric_label_noise", "training_data_metrics",
                     "write_training_data"], "datasets"),
    **dict.fromkeys(["Batch", "BatchLoader", "eval_loader", "random_crop_flip", "sample_crop_flip", "train_loader"],
                    "pipeline"),
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
