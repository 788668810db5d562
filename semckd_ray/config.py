"""The experiment configuration: one YAML file, validated at load time.

A file in ``tune_configs/`` holds a training config (the sections below) and, optionally, a
``search`` section that ``semckd_ray.tune`` reads. Every mistake is reported as a ``UserError``
naming the dotted key and what is allowed, before any cluster resource is taken.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from semckd_ray.errors import UserError

# Students the official code trains with lr 0.01 instead of 0.05 (SPEC section 7).
SMALL_LR_MODELS = frozenset({"MobileNetV2", "ShuffleV1", "ShuffleV2"})


class _Section(BaseModel):
    # Non-finite numbers (YAML .inf/.nan) are never a meaningful setting: refused like any bad value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # A NUL byte makes every path operation fail (names and paths alike end up as paths).
        if isinstance(value, str) and "\0" in value:
            raise ValueError("must not contain a NUL character")
        return value


class DataConfig(_Section):
    dataset: Literal["cifar100", "cifar10", "digits"] = "cifar100"
    root: str = "data"  # resolved to an absolute path at load time: workers run elsewhere
    download: bool = False
    val_size: int | None = Field(default=None, ge=0)  # None: the dataset's default (CIFAR 5000)
    # Which images are held out for validation, apart from ``seed``: every seed of a sweep's trial
    # (search.repeats) is scored on the same split.
    split_seed: int = Field(default=0, ge=0)
    eval_batch_size: int = Field(default=256, ge=1)


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
        from semckd_ray.distill import make_options

        make_options(self.name, self.options)  # raises UserError naming the allowed values
        return self


class OptimConfig(_Section):
    epochs: int = Field(default=240, ge=1)
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
    warmup_epochs: int = Field(default=0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    lr_decay_epochs: list[int] = Field(default_factory=lambda: [150, 180, 210])
    lr_decay_rate: float = Field(default=0.1, gt=0, le=1)

    @field_validator("lr_decay_epochs")
    @classmethod
    def _sorted_positive(cls, epochs: list[int]) -> list[int]:
        if any(e < 1 for e in epochs) or epochs != sorted(epochs):
            raise ValueError("must be increasing epoch numbers >= 1")
        return epochs


class ScalingConfig(_Section):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    # A fraction of one GPU per worker packs several trials on a GPU (0.25: four trials), for the
    # small, launch-bound steps of CIFAR models; with one worker per trial only (two NCCL ranks
    # cannot share a GPU).
    gpus_per_worker: float = Field(default=1.0, gt=0, le=1)
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
    max_failures: int = Field(default=3, ge=-1)  # worker failures a run recovers from

    def channels_last_enabled(self) -> bool:
        return self.use_gpu if self.channels_last is None else self.channels_last

    def teacher_channels_last_enabled(self) -> bool:
        return True if self.teacher_channels_last is None else self.teacher_channels_last


class CheckpointConfig(_Section):
    every: int = Field(default=10, ge=1)  # epochs between checkpoints; the last epoch always saves
    keep: int = Field(default=2, ge=1)  # checkpoints Ray keeps on storage


class TrackingConfig(_Section):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "semckd"
    run_name: str | None = None
    register_model: str | None = None  # register the final model under this name
    # Where Ray keeps checkpoints and results. Must be shared storage (NFS path, s3://) on a
    # multi-node cluster; None: <cwd>/ray_results.
    storage_path: str | None = None


class TrainConfig(_Section):
    name: str = "semckd"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig | None = None
    student: StudentConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _teacher_matches_method(self) -> TrainConfig:
        from semckd_ray.distill import get_method_class

        uses_teacher = get_method_class(self.method.name).uses_teacher
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
    def _method_fits_batch(self) -> TrainConfig:
        from semckd_ray.distill import get_method_class, make_options

        cls = get_method_class(self.method.name)
        try:
            cls.check_batch_size(make_options(self.method.name, self.method.options), self.per_worker_batch())
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
        from semckd_ray.distill import get_method_class

        if self.method.beta is not None:
            return self.method.beta
        return get_method_class(self.method.name).default_beta


def _check_model_name(name: str) -> str:
    from semckd_ray.models import list_models

    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return name


# --------------------------------------------------------------------------------------------
# Loading


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
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
            parsed = yaml.safe_load(value)
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


def format_validation_error(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _allowed_keys_hint(err["loc"])
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _allowed_keys_hint(loc: tuple) -> str:
    model: type[BaseModel] = TrainConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return ""
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        nested = [a for a in candidates if issubclass(a, BaseModel)]
        if not nested:
            return ""
        model = nested[0]
    return "; allowed keys: " + ", ".join(model.model_fields)


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
