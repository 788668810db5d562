"""The experiment configuration: one YAML file, validated at load time.

A file in ``tune_configs/`` holds a training config (the sections below) and, optionally, a
``search`` section that ``semckd_ray.tune`` reads. Every mistake is reported as a ``UserError``
naming the dotted key and what is allowed, before any cluster resource is taken. Validation imports
neither torch, Ray nor MLflow: datasets, models and methods are checked against their torch-free
catalogs (``semckd_ray.data.catalog``, ``semckd_ray.models._registry``, ``semckd_ray.distill.catalog``),
so that a mistake is reported in a fraction of a second.
"""

from __future__ import annotations

import copy
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from semckd_ray.data.catalog import (
    DATASETS,
    IN_MEMORY_IMAGE_SIZE,
    STREAMED_IMAGE_SIZE,
    check_label_noise,
    check_train_fraction,
    check_val_size,
    fewest_train_images,
    is_streamed,
)
from semckd_ray.distill.catalog import make_options, method_spec
from semckd_ray.errors import UserError
from semckd_ray.models._registry import check_model_name

# Students the official code trains with lr 0.01 instead of 0.05 (SPEC section 7).
SMALL_LR_MODELS = frozenset({"MobileNetV2", "ShuffleV1", "ShuffleV2"})

# The largest seed (``seed``, ``data.split_seed``, ``search.seed``) every consumer takes: numpy's
# RandomState, and so Optuna's TPE sampler, takes [0, 2**32); torch.manual_seed and torch.Generator
# take [0, 2**64); numpy's SeedSequence (the data pipeline's streams, ``worker_seed``) takes any
# non-negative integer and gives seeds below 2**63. 2**32 - 1 works for all of them.
MAX_SEED = 2**32 - 1
# Checkpoints are folders ``epoch_%05d`` and the latest is found by sorting their names: an epoch
# number above 99999 would sort before a smaller one.
MAX_EPOCHS = 99_999
# Ray keeps resource quantities in units of 1/10000 (ray._raylet.RESOURCE_UNIT_SCALING): a smaller
# share is 0 to Ray, and one that is no multiple of it is silently rounded down.
RAY_RESOURCE_UNIT = 1e-4
MAX_CPUS_PER_WORKER = 1e6  # far beyond any node, far below Ray's fixed-point limit
MAX_NAME_BYTES = 200  # ``{name}-{run id}`` is a folder name: at most 255 bytes on common filesystems


def _kinds(annotation: Any) -> tuple[set[type], Any]:
    """The scalar types (bool, int, float, str) a field takes, and its list element annotation if any."""
    kinds: set[type] = set()
    element = None
    stack = [annotation]
    while stack:
        ann = stack.pop()
        origin = typing.get_origin(ann)
        if origin in (typing.Union, types.UnionType):
            stack.extend(typing.get_args(ann))
        elif origin is typing.Annotated:
            stack.append(typing.get_args(ann)[0])
        elif origin is Literal:
            kinds.update(type(v) for v in typing.get_args(ann))
        elif origin is list:
            args = typing.get_args(ann)
            element = args[0] if args else Any
        elif ann in (bool, int, float, str):
            kinds.add(ann)
    return kinds, element


_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false"}


def check_no_coercion(value: Any, annotation: Any) -> Any:
    """Refuse what pydantic's lax mode would silently convert into another kind of value.

    A boolean is never a number (``lr: true`` is not 1.0), a string is never a number or a
    boolean (``"0.1"``, ``"yes"``), and a number is never a boolean (``use_gpu: 1``). An integer
    where a float belongs (``lr: 1``) and an integral float where an integer belongs (``2.0``)
    keep their meaning and are accepted.
    """
    kinds, element = _kinds(annotation)
    if isinstance(value, list) and element is not None:
        for item in value:
            check_no_coercion(item, element)
        return value
    if not kinds or value is None:
        return value
    wanted = next((_KIND_WORDS[k] for k in (int, float, bool) if k in kinds), None)
    if wanted is None:
        return value
    if isinstance(value, bool):
        if bool not in kinds:
            raise ValueError(f"must be {wanted}, not the boolean {str(value).lower()}")
    elif isinstance(value, str):
        if str not in kinds:
            hint = " (write the number without quotes)" if wanted != "true or false" else ""
            raise ValueError(f"must be {wanted}, not the string {value!r}{hint}")
    elif isinstance(value, (int, float)) and not kinds & {int, float}:
        raise ValueError(f"must be {wanted}, not {value!r}")
    return value


class _Section(BaseModel):
    # Non-finite numbers (YAML .inf/.nan) are never a meaningful setting: refused like any bad value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_coercion(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        return value if field is None else check_no_coercion(value, field.annotation)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # A NUL byte makes every path operation fail (names and paths alike end up as paths).
        if isinstance(value, str) and "\0" in value:
            raise ValueError("must not contain a NUL character")
        return value


class DataConfig(_Section):
    dataset: Literal[tuple(DATASETS)] = "cifar100"  # the names of the dataset catalog
    root: str = "data"  # resolved to an absolute path at load time: workers run elsewhere
    download: bool = False
    val_size: int | None = Field(default=None, ge=0)  # None: the dataset's default (CIFAR 5000)
    # Which images are held out for validation, apart from ``seed``: every seed of a sweep's trial
    # (search.repeats) is scored on the same split.
    split_seed: int = Field(default=0, ge=0, le=MAX_SEED)
    eval_batch_size: int = Field(default=256, ge=1)  # larger than a split: the whole split at once
    # Few-shot distillation: the share of each class's training images trained on (stratified),
    # drawn with split_seed once the val split is held out: val and test stay the same at any fraction.
    train_fraction: float = 1.0
    # The share of the training labels (after train_fraction; never val or test) redrawn uniformly
    # among all classes (symmetric noise, as the official dataset/label_noise.py), drawn with split_seed.
    label_noise: float = 0.0
    # Streamed datasets only (imagefolder, decoded by Ray Data tasks on any node's CPUs): the side of
    # the square crops the models see (None: 224), RandomResizedCrop's area range for training, and
    # the side evaluation images are resized to before their centre crop (None: image_size / 0.875,
    # 256 for 224). Datasets held in memory are 32x32 and take none of them.
    image_size: int | None = Field(default=None, ge=8, le=1024)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    eval_resize: int | None = Field(default=None, ge=8, le=2048)
    # CPUs of the cluster Ray Data may use for decoding at once (None: what the workers leave free),
    # and the batches each worker keeps decoded ahead of its training step.
    decode_cpus: float | None = Field(default=None, gt=0)
    prefetch_batches: int = Field(default=2, ge=0, le=64)

    @field_validator("train_fraction", "label_noise")
    @classmethod
    def _share_in_range(cls, value: float, info: ValidationInfo) -> float:
        check = {"train_fraction": check_train_fraction, "label_noise": check_label_noise}[info.field_name]
        try:
            check(value)
        except UserError as exc:
            raise ValueError(str(exc).removeprefix(f"data.{info.field_name} ")) from None
        return value

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError(f"must be [low, high] with 0 < low <= high <= 1 (the share of an image's area a "
                             f"training crop covers; ImageNet's: [0.08, 1.0]), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _streaming_keys_for_streamed_data(self) -> DataConfig:
        if is_streamed(self.dataset):
            if self.download:
                raise ValueError(f"data.download: {self.dataset} is a folder tree of your own (ImageNet cannot be "
                                 "downloaded without an account): lay it out under data.root and set download: false")
            resize = self.eval_resize if self.eval_resize is not None else self.eval_size()
            if resize < self.input_size():
                raise ValueError(f"data.eval_resize={resize} is smaller than the crop data.image_size="
                                 f"{self.input_size()}: allowed {self.input_size()} or more")
            return self
        streaming = {"image_size": None, "crop_scale": (0.08, 1.0), "eval_resize": None, "decode_cpus": None,
                     "prefetch_batches": 2}
        set_here = [f"data.{key}" for key, default in streaming.items() if getattr(self, key) != default]
        if set_here:
            streamed = ", ".join(name for name, info in DATASETS.items() if info.streamed)
            verb = "applies" if len(set_here) == 1 else "apply"
            raise ValueError(f"{', '.join(set_here)} {verb} to streamed datasets only ({streamed}); "
                             f"{self.dataset} is held in memory at {IN_MEMORY_IMAGE_SIZE}x{IN_MEMORY_IMAGE_SIZE}: "
                             "remove them")
        return self

    def input_size(self) -> int:
        """The side of the square images the models see."""
        if not is_streamed(self.dataset):
            return IN_MEMORY_IMAGE_SIZE
        return self.image_size if self.image_size is not None else STREAMED_IMAGE_SIZE

    def eval_size(self) -> int:
        """The side evaluation images are resized to before their centre crop of ``input_size()``."""
        if self.eval_resize is not None:
            return self.eval_resize
        return round(self.input_size() / 0.875)

    @model_validator(mode="after")
    def _val_size_fits(self) -> DataConfig:
        try:
            check_val_size(self.dataset, self.val_size)  # the official split's size: no file is read
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return self

    def train_images(self) -> int | None:
        """Images left for training once the val split is held out and ``train_fraction`` is kept:
        exact at fraction 1, else the fewest the per-class rounding can leave (no file is read;
        ``semckd_ray.data.catalog.fewest_train_images``); None for a folder tree, known once listed."""
        return fewest_train_images(self.dataset, self.val_size, self.train_fraction)


class TeacherConfig(_Section):
    model: str
    # A local checkpoint path (official, RepDistiller or ours), ``runs:/<run_id>`` of a teacher
    # trained by this project, or ``models:/<registered name>/<version or alias>``.
    checkpoint: str | None = None
    # Or: the experiment file that trains this teacher (path relative to this file). Its finished
    # MLflow run is reused when one exists for the same config; otherwise it is trained first.
    train: str | None = None

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return _check_model_name(name)

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.checkpoint is None) == (self.train is None):
            raise ValueError("give exactly one of 'checkpoint' (a file, runs:/..., models:/...) "
                             "and 'train' (the teacher's experiment file)")
        return self


class StudentConfig(_Section):
    model: str

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return _check_model_name(name)


class MethodConfig(_Section):
    name: str = "semckd"
    beta: float | None = Field(default=None, ge=0)  # None: the method's official weight
    gamma: float = Field(default=1.0, ge=0)  # cross-entropy weight
    alpha: float = Field(default=1.0, ge=0)  # KD weight (CE and KD are 1 for every method)
    kd_temperature: float = Field(default=4.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_method(self) -> MethodConfig:
        make_options(self.name, self.options)  # raises UserError naming the allowed values
        return self


class OptimConfig(_Section):
    epochs: int = Field(default=240, ge=1, le=MAX_EPOCHS)
    # The global batch, as in the official code: each of N workers trains on batch_size / N, and
    # SemCKD's query/key MLPs are built for that per-worker batch (train_student.py divides
    # --batch_size by the number of GPUs before it builds them).
    batch_size: int = Field(default=64, ge=2)
    lr: float | None = Field(default=None, gt=0)  # None: 0.05, or 0.01 for MobileNetV2/ShuffleNets
    # For a global batch other than the recipe's: "linear" scales the lr by batch_size /
    # lr_reference_batch (Goyal et al. 2017), reached by a linear ramp over warmup_epochs. The
    # official recipe is "none": its lr does not depend on the number of GPUs.
    lr_scaling: Literal["none", "linear"] = "none"
    lr_reference_batch: int = Field(default=64, ge=1)  # the global batch the lr is given for
    warmup_epochs: int = Field(default=0, ge=0, le=MAX_EPOCHS)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    lr_decay_epochs: list[int] = Field(default_factory=lambda: [150, 180, 210])
    lr_decay_rate: float = Field(default=0.1, gt=0, le=1)

    @field_validator("lr_decay_epochs")
    @classmethod
    def _sorted_positive(cls, epochs: list[int]) -> list[int]:
        if any(not 1 <= e <= MAX_EPOCHS for e in epochs) or epochs != sorted(epochs):
            raise ValueError(f"must be increasing epoch numbers in [1, {MAX_EPOCHS}], got {epochs}")
        return epochs


class ScalingConfig(_Section):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, ge=RAY_RESOURCE_UNIT, le=MAX_CPUS_PER_WORKER)
    # A fraction of one GPU per worker packs several trials on a GPU (0.25: four trials), for the
    # small, launch-bound steps of CIFAR models; with one worker per trial only (two NCCL ranks
    # cannot share a GPU).
    gpus_per_worker: float = Field(default=1.0, ge=RAY_RESOURCE_UNIT, le=1)
    # bfloat16 autocast: off by default; on an H200 it is slower than float32 at the paper's
    # batch of 64 and pays off from a per-worker batch of 256 up (bench/README.md).
    bf16: bool = False
    # channels_last: None means on for GPU (faster at every batch size measured), off for CPU.
    channels_last: bool | None = None
    # The frozen teacher's layout, apart from the student's: None means channels_last on every
    # device (its forward is exact in either layout and faster in channels_last: bench/README.md).
    teacher_channels_last: bool | None = None
    compile: bool = False
    # Capture the whole training step (teacher, student, method, optimizer) in a CUDA graph and replay
    # it: one launch instead of hundreds per step. GPU and one worker only; off until measured faster.
    cuda_graphs: bool = False
    # SyncBatchNorm: batch statistics over the global batch (GPU only, as in PyTorch). Off, as in
    # the official code, where each GPU normalises its own share of the batch.
    sync_bn: bool = False
    max_failures: int = Field(default=3, ge=-1)  # worker failures a run recovers from; -1: any number

    @field_validator("cpus_per_worker", "gpus_per_worker")
    @classmethod
    def _ray_precision(cls, quantity: float) -> float:
        units = quantity / RAY_RESOURCE_UNIT
        if abs(units - round(units)) > 1e-6 * max(1.0, units):
            raise ValueError(f"must be a multiple of {RAY_RESOURCE_UNIT:g} (Ray's resource precision), "
                             f"got {quantity!r}")
        return quantity

    def channels_last_enabled(self) -> bool:
        return self.use_gpu if self.channels_last is None else self.channels_last

    def teacher_channels_last_enabled(self) -> bool:
        return True if self.teacher_channels_last is None else self.teacher_channels_last


class CheckpointConfig(_Section):
    every: int = Field(default=10, ge=1, le=MAX_EPOCHS)  # epochs between checkpoints; the last epoch always saves
    keep: int = Field(default=2, ge=1, le=MAX_EPOCHS)  # checkpoints Ray keeps on storage


class TrackingConfig(_Section):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = Field(default="semckd", min_length=1)
    run_name: str | None = Field(default=None, min_length=1)
    register_model: str | None = Field(default=None, min_length=1)  # register the final model under this name
    # Where Ray keeps checkpoints and results. Must be shared storage (NFS path, s3://) on a
    # multi-node cluster; None: <cwd>/ray_results.
    storage_path: str | None = None


class TrainConfig(_Section):
    name: str = "semckd"  # names the run's folders: {name}-{run id}, {name}-{time} for a sweep
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig | None = None
    student: StudentConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"must be a non-empty name without '/' or '\\' (it names folders), got {name!r}")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"must be at most {MAX_NAME_BYTES} bytes long (it names folders), "
                             f"got {len(name.encode())}")
        return name

    @model_validator(mode="after")
    def _teacher_matches_method(self) -> TrainConfig:
        uses_teacher = method_spec(self.method.name).uses_teacher
        if uses_teacher and self.teacher is None:
            raise ValueError(
                f"method {self.method.name!r} distils from a teacher: add a 'teacher' section "
                "with 'model' and 'checkpoint'"
            )
        if not uses_teacher and self.teacher is not None:
            raise ValueError(
                f"method {self.method.name!r} trains without a teacher: remove the 'teacher' section"
            )
        return self

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> TrainConfig:
        batch, workers = self.optim.batch_size, self.scaling.num_workers
        if batch % workers:
            lower, upper = batch // workers * workers, (batch // workers + 1) * workers
            nearest = f"{lower} or {upper}" if lower else f"{upper}"
            raise ValueError(
                f"optim.batch_size={batch} (the global batch) is not divisible by "
                f"scaling.num_workers={workers}: each worker trains on batch_size / num_workers "
                f"images; use a multiple of {workers}, e.g. {nearest}"
            )
        return self

    @model_validator(mode="after")
    def _batch_fits_training_split(self) -> TrainConfig:
        images = self.data.train_images()
        if images is not None and self.optim.batch_size > images:
            workers = self.scaling.num_workers
            largest = images // workers * workers
            fraction = self.data.train_fraction
            kept = (f"at least {images} images once data.val_size are held out and data.train_fraction={fraction:g} "
                    "of each class is kept" if fraction < 1 else f"{images} images once data.val_size are held out")
            raise ValueError(
                f"optim.batch_size={self.optim.batch_size} (the global batch) is larger than the training split "
                f"of {self.data.dataset} ({kept}): allowed 2 to {largest}"
                + (f", a multiple of scaling.num_workers={workers}" if workers > 1 else "")
                + (", or raise data.train_fraction" if fraction < 1 else ""))
        return self

    @model_validator(mode="after")
    def _finite_lr(self) -> TrainConfig:
        if not math.isfinite(self.peak_lr()):
            raise ValueError(f"optim.lr={self.base_lr()!r} scaled by optim.batch_size / optim.lr_reference_batch "
                             "is not a finite number: lower optim.lr")
        return self

    @model_validator(mode="after")
    def _method_fits_batch(self) -> TrainConfig:
        spec = method_spec(self.method.name)
        try:
            spec.check_batch_size(make_options(self.method.name, self.method.options), self.per_worker_batch())
        except UserError as exc:
            raise ValueError(
                f"method.options / optim.batch_size: {exc} (the per-worker batch: optim.batch_size="
                f"{self.optim.batch_size} over scaling.num_workers={self.scaling.num_workers})"
            ) from None
        return self

    @model_validator(mode="after")
    def _sync_bn_on_gpu(self) -> TrainConfig:
        if self.scaling.sync_bn and not self.scaling.use_gpu:
            raise ValueError("scaling.sync_bn needs scaling.use_gpu: true (PyTorch's SyncBatchNorm runs on "
                             "GPUs only); on CPU every rank's BatchNorm statistics are rank 0's at each evaluation")
        return self

    @model_validator(mode="after")
    def _gpu_share(self) -> TrainConfig:
        share, workers = self.scaling.gpus_per_worker, self.scaling.num_workers
        if share != 1.0 and not self.scaling.use_gpu:
            raise ValueError(f"scaling.gpus_per_worker={share:g} needs scaling.use_gpu: true")
        if share < 1.0 and workers > 1:
            raise ValueError(
                f"scaling.gpus_per_worker={share:g} with scaling.num_workers={workers}: a fraction of a GPU "
                "works with one worker per trial only, since two NCCL ranks of one training cannot share a "
                "GPU (ray-project/ray#48012); use num_workers: 1 to pack trials, or gpus_per_worker: 1")
        return self

    @model_validator(mode="after")
    def _cuda_graphs_scope(self) -> TrainConfig:
        if not self.scaling.cuda_graphs:
            return self
        if not self.scaling.use_gpu:
            raise ValueError("scaling.cuda_graphs needs scaling.use_gpu: true (CUDA graphs replay GPU work)")
        if self.scaling.num_workers > 1:
            raise ValueError(
                f"scaling.cuda_graphs captures one worker's step; with scaling.num_workers="
                f"{self.scaling.num_workers} DDP's gradient all-reduce would have to be captured too, which "
                "this trainer does not do: use num_workers: 1 (packed trials), or cuda_graphs: false")
        if self.scaling.compile:
            raise ValueError("scaling.cuda_graphs and scaling.compile both rewrite the step: choose one")
        return self

    @model_validator(mode="after")
    def _warmup_needs_scaling(self) -> TrainConfig:
        if self.optim.warmup_epochs and self.optim.lr_scaling == "none":
            raise ValueError("optim.warmup_epochs ramps the lr up to its linearly scaled value: "
                             "set optim.lr_scaling: linear, or optim.warmup_epochs: 0")
        return self

    def per_worker_batch(self) -> int:
        """What each worker trains on per step: the global batch over the workers."""
        return self.optim.batch_size // self.scaling.num_workers

    def base_lr(self) -> float:
        """The recipe's lr, for ``optim.lr_reference_batch`` (the official recipe: for any batch)."""
        if self.optim.lr is not None:
            return self.optim.lr
        return 0.01 if self.student.model in SMALL_LR_MODELS else 0.05

    def peak_lr(self) -> float:
        """The lr after warm-up and before the first decay: ``base_lr``, linearly scaled if asked."""
        if self.optim.lr_scaling == "linear":
            return self.base_lr() * self.optim.batch_size / self.optim.lr_reference_batch
        return self.base_lr()

    def beta(self) -> float:
        if self.method.beta is not None:
            return self.method.beta
        return method_spec(self.method.name).default_beta


def _check_model_name(name: str) -> str:
    try:
        return check_model_name(name)
    except UserError as exc:
        raise ValueError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# Loading


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-3`` and ``5E4`` are numbers, as in YAML 1.2 and JSON.

    YAML 1.1 wants a dot in a float (``1.0e-3``), so PyYAML reads ``lr: 1e-3`` as the string
    "1e-3"; strings are not numbers to the config (``check_no_coercion``), so it would be refused.
    """


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    not_text = f"config file {str(path)!r} is not a YAML text file"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{not_text}: byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8 "
                        "(give the experiment's .yaml file, e.g. tune_configs/smoke.yaml)") from None
    if "\0" in text:
        raise UserError(f"{not_text}: it holds NUL bytes at offset {text.index(chr(0))} "
                        "(give the experiment's .yaml file, e.g. tune_configs/smoke.yaml)")
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise UserError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    except RecursionError:
        raise UserError(f"config file {str(path)!r} nests too deeply to be an experiment config") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML (``1e-3``, ``[1, 2]``, ``null``)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set takes dotted.key=value, got {item!r}")
        try:
            parsed = _load_yaml(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or exc
            raise UserError(f"--set {item!r}: the value is not valid YAML ({problem}); "
                            "quote a string value, e.g. --set 'name=\"a: b\"'") from None
        set_dotted(raw, key.strip(), parsed)
    return raw


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"cannot set {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def get_dotted(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def parse_train_config(raw: dict[str, Any], *, config_dir: str | os.PathLike | None = None) -> TrainConfig:
    """Validate a training config dict (the ``search`` section, if any, is ignored here)."""
    raw = {k: v for k, v in raw.items() if k != "search"}
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc)) from None
    return resolve_paths(cfg, Path(config_dir) if config_dir else Path.cwd())


def load_train_config(path: str | os.PathLike, overrides: list[str] = ()) -> TrainConfig:
    raw = apply_overrides(read_yaml(path), list(overrides))
    return parse_train_config(raw, config_dir=Path(path).resolve().parent)


def resolve_paths(cfg: TrainConfig, config_dir: Path) -> TrainConfig:
    """Make every local path absolute: Ray workers run in another working directory.

    Data and checkpoint paths are relative to the working directory (where the user runs the
    command); a teacher's experiment file is relative to the file that names it.
    """
    cfg = cfg.model_copy(deep=True)
    cfg.data.root = str(Path(cfg.data.root).resolve())
    if cfg.teacher is not None and cfg.teacher.checkpoint and not _is_uri(cfg.teacher.checkpoint):
        cfg.teacher.checkpoint = str(Path(cfg.teacher.checkpoint).resolve())
    if cfg.teacher is not None and cfg.teacher.train:
        cfg.teacher.train = str((config_dir / cfg.teacher.train).resolve())
    # tracking.storage_path stays as written: whether it is relative matters on a multi-node
    # cluster (semckd_ray.trainer.storage_path).
    return cfg


def _is_uri(value: str) -> bool:
    return "://" in value or value.startswith(("runs:/", "models:/"))


def format_validation_error(exc: ValidationError, *, model: type[BaseModel] | None = None,
                            prefix: str = "") -> str:
    """One line per error: the dotted key (under ``prefix``), the problem, what is allowed.

    ``model`` is the schema validated (default ``TrainConfig``): an unknown key lists the keys
    allowed where it is.
    """
    model = model or TrainConfig
    lines = ["invalid configuration:"]
    for err in exc.errors():
        key = ".".join([*([prefix] if prefix else []), *(str(p) for p in err["loc"])]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _allowed_keys_hint(err["loc"], model)
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _allowed_keys_hint(loc: tuple, model: type[BaseModel] | None = None) -> str:
    """The keys allowed beside the unknown key at ``loc`` (its last part) in ``model``'s schema."""
    node: Any = model or TrainConfig
    for part in loc[:-1]:
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            if field is None:
                return ""
            node = field.annotation
        else:  # a dict's key or a list's index: the part names an entry, not a field
            args = typing.get_args(node)
            if typing.get_origin(node) not in (dict, list) or not args:
                return ""
            node = args[-1]
        node = _nested_model(node)
        if node is None:
            return ""
    if not (isinstance(node, type) and issubclass(node, BaseModel)):
        return ""
    return "; allowed keys: " + ", ".join(node.model_fields)


def _nested_model(annotation: Any) -> Any:
    """``annotation`` without ``None`` of an optional; None where it holds nothing with keys."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        annotation = nested[0] if nested else (args[0] if len(args) == 1 else None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (dict, list):
        return annotation
    return None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: how configs are logged as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat
