"""Where a teacher's weights come from: a local file, a run of this project, or a registered model.

``teacher.checkpoint`` takes
- a path to a checkpoint in the official/RepDistiller format (``{"model": state_dict}``) or ours;
- ``runs:/<run_id>`` (the best checkpoint of a teacher trained here) or ``runs:/<run_id>/<artifact>``;
- ``models:/<registered name>/<version>`` or ``models:/<name>@<alias>``.
Checkpoints logged by this project carry their sha256 as a run tag, checked on download.

A registered version made by ``semckd_ray.trainer.register_model`` is an MLflow model (a
``StudentLogits`` exported with ``torch.export``) whose version tags name the run's checkpoint it
was built from (``checkpoint``, ``checkpoint_sha256``): a teacher loads from that checkpoint. An
older version (source ``runs:/<id>/checkpoints``) loads from its run's best checkpoint, as before;
a version of any other PyTorch MLflow model of the zoo loads the weights of the model itself.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from semckd_ray.config import TeacherConfig, TrainConfig
from semckd_ray.errors import UserError
from semckd_ray.models import create_model, load_checkpoint


# Tags of a model version made by semckd_ray.trainer.register_model: the run's checkpoint it was built from.
VERSION_CHECKPOINT_TAG = "checkpoint"
VERSION_CHECKPOINT_SHA_TAG = "checkpoint_sha256"


class StudentLogits(nn.Module):
    """A zoo model as its registered MLflow model serves it: ``forward(x)`` returns the logits alone.

    The zoo's models return ``(logits, features)``; MLflow's signature, its pyfunc and serving take one
    tensor out. ``model`` keeps the student's own module names (``model.<name>`` in the state dict).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def resolve_teacher_file(checkpoint: str, tracking_uri: str | None) -> str:
    """A local file holding the teacher's weights (downloaded from MLflow when needed)."""
    if checkpoint.startswith("models:/"):
        version = _registered_version(checkpoint, tracking_uri)
        if _is_plain_model(version):
            return _model_weights_file(version, tracking_uri, checkpoint)
        run_id, artifact = _version_checkpoint(version)
    elif checkpoint.startswith("runs:/"):
        run_id, _, artifact = checkpoint[len("runs:/"):].partition("/")
    else:
        return checkpoint
    return _download_run_checkpoint(run_id, artifact or None, tracking_uri, checkpoint)


def teacher_run_id(checkpoint: str, tracking_uri: str | None) -> str | None:
    """The MLflow run a ``runs:/`` or ``models:/`` teacher comes from (None for a local file)."""
    if checkpoint.startswith("runs:/"):
        return checkpoint[len("runs:/"):].partition("/")[0]
    if checkpoint.startswith("models:/"):
        return _registered_model_source(checkpoint, tracking_uri)[0]
    return None


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm that directly follows a convolution folded into it.

    On running statistics, ``bn(conv(x))`` is one convolution with weights scaled per output channel
    and a bias: the same function, up to float rounding. Pairs inside an ``nn.Sequential`` are folded
    first; the rest (``conv1`` / ``bn1`` attributes of a block) through ``torch.fx``, which folds a
    pair only when the convolution's output goes nowhere but its BatchNorm (so no feature map taken
    between the two changes). A model ``torch.fx`` cannot trace (shape-dependent control flow, as
    VGG's) keeps the pairs of its Sequentials folded and the others as they are.
    """
    from torch.fx.experimental.optimization import fuse
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for k in range(len(seq) - 1):
            conv, bn = seq[k], seq[k + 1]
            if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                seq[k], seq[k + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    try:
        return fuse(model, inplace=True)  # on our copy
    except torch.fx.proxy.TraceError:
        return model


class FrozenTeacher(nn.Module):
    """The teacher as distillation reads it: eval mode, no gradients, BatchNorm folded, its own memory layout.

    The teacher only ever runs forward with its BatchNorm on running statistics (no reductions), so
    neither folding the BatchNorm into the convolutions (``fold_batchnorm``) nor the layout changes
    more than float32 rounding: resnet32x4's features in channels_last, folded or not, are as close
    to float64 as the plain contiguous forward (1.5e-6). Both make it faster: on a Zen 3, 0.93x the
    plain forward's time in channels_last, 0.83x folded in channels_last (bench/teacher_forward.py).
    Feature maps are handed on in ``feature_format``, the layout the student and the method work in.
    """

    def __init__(self, model: nn.Module, memory_format: torch.memory_format = torch.channels_last,
                 feature_format: torch.memory_format = torch.contiguous_format, fold: bool = True):
        super().__init__()
        if fold:
            model = fold_batchnorm(model)
        self.model = model.to(memory_format=memory_format).eval().requires_grad_(False)
        self.memory_format = memory_format
        self.feature_format = feature_format

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # frozen: always in eval mode

    def forward(self, x: torch.Tensor):
        logits, feats = self.model(x.contiguous(memory_format=self.memory_format))
        if self.memory_format != self.feature_format:
            feats = [f.contiguous(memory_format=self.feature_format) if f.dim() == 4 else f for f in feats]
        return logits, feats


def load_teacher(cfg: TeacherConfig, num_classes: int, device: torch.device,
                 tracking_uri: str | None = None) -> nn.Module:
    model = create_model(cfg.model, num_classes=num_classes)
    path = resolve_teacher_file(cfg.checkpoint, tracking_uri)
    try:
        load_checkpoint(model, path)
    except UserError as exc:
        raise UserError(f"teacher.checkpoint (for teacher.model={cfg.model!r}): {exc}") from None
    return model.to(device)


def _registered_model_source(uri: str, tracking_uri: str | None) -> tuple[str | None, str | None]:
    """``(run id, artifact)`` of the registered version ``uri`` (artifact None: the run's best checkpoint)."""
    return _version_checkpoint(_registered_version(uri, tracking_uri))


def _version_checkpoint(version) -> tuple[str | None, str | None]:
    source = version.source or ""
    artifact = None
    if source.startswith("runs:/"):
        artifact = source[len("runs:/"):].partition("/")[2] or None
        if artifact == "checkpoints":
            artifact = None  # the folder this project registered before its MLflow models: its best checkpoint
    elif (version.tags or {}).get(VERSION_CHECKPOINT_TAG):
        artifact = version.tags[VERSION_CHECKPOINT_TAG]  # the checkpoint register_model built the model from
    return version.run_id, artifact


def _is_plain_model(version) -> bool:
    """A version of an MLflow model that names no checkpoint of a run: its own weights are the teacher's."""
    source = version.source or ""
    return not source.startswith("runs:/") and not ((version.tags or {}).get(VERSION_CHECKPOINT_TAG) and version.run_id)


def _model_weights_file(version, tracking_uri: str | None, uri: str) -> str:
    """The weights of the PyTorch MLflow model behind ``version``, saved as a checkpoint in the official format.

    Loaded by ``mlflow.pytorch.load_model``, which refuses a pickled model unless
    ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true`` (the ``pt2`` format needs no pickle); a ``StudentLogits``'
    ``model.`` prefix is dropped, so that the zoo model's own names remain.
    """
    import tempfile
    from pathlib import Path

    import mlflow.pytorch

    try:
        model = mlflow.pytorch.load_model(download_model(version.source, tracking_uri))
    except Exception as exc:
        from semckd_ray.tracking import redact

        raise UserError(f"teacher.checkpoint {uri!r}: cannot load the PyTorch model of version {version.version} "
                        f"of {version.name!r} ({type(exc).__name__}: {redact(str(exc))[:400]})") from None
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    path = Path(tempfile.mkdtemp(prefix="semckd-teacher-")) / "model_weights.pt"
    torch.save({"model": state}, path)
    return str(path)


def download_model(source: str, tracking_uri: str | None) -> str:
    """The local folder of the MLflow model at ``source`` (``models:/<model id>``, as a version's source,
    or any artifact URI) in the store ``tracking_uri``.

    MLflow resolves a ``models:/`` URI in the store of its global tracking URI, whatever
    ``download_artifacts`` is told: a logged model's files are found here by its artifact location.
    """
    import mlflow.artifacts

    from semckd_ray.tracking import client

    spec = source[len("models:/"):] if source.startswith("models:/") else ""
    if spec and "/" not in spec and "@" not in spec:  # a logged model's id
        source = client(tracking_uri).get_logged_model(spec).artifact_location
    return mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri)


def _registered_version(uri: str, tracking_uri: str | None):
    from semckd_ray.tracking import client

    spec = uri[len("models:/"):]
    mlflow_client = client(tracking_uri)
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            version = mlflow_client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = spec.partition("/")
            if not number:
                versions = mlflow_client.search_model_versions(f"name='{name}'")
                if not versions:
                    raise UserError(f"registered model {name!r} has no versions")
                version = max(versions, key=lambda v: int(v.version))
            else:
                version = mlflow_client.get_model_version(name, number)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"teacher.checkpoint {uri!r}: cannot read the registered model ({exc})") from None
    return version


def _download_run_checkpoint(run_id: str, artifact: str | None, tracking_uri: str | None, uri: str) -> str:
    import mlflow.artifacts

    from semckd_ray.tracking import client, sha256_file

    mlflow_client = client(tracking_uri)
    try:
        run = mlflow_client.get_run(run_id)
    except Exception as exc:
        raise UserError(f"teacher.checkpoint {uri!r}: no such MLflow run ({exc})") from None
    tags = run.data.tags
    expected_sha = None
    if artifact is None:
        artifact = tags.get("checkpoint.best.path")
        expected_sha = tags.get("checkpoint.best.sha256")
        if artifact is None:
            raise UserError(
                f"teacher.checkpoint {uri!r}: run {run_id} has no best checkpoint (tag "
                "'checkpoint.best.path'); did it finish? Name an artifact: runs:/<run_id>/<path>"
            )
    else:
        for kind in ("best", "last"):
            if tags.get(f"checkpoint.{kind}.path") == artifact:
                expected_sha = tags.get(f"checkpoint.{kind}.sha256")
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, tracking_uri=tracking_uri
        )
    except Exception as exc:
        raise UserError(f"teacher.checkpoint {uri!r}: cannot download {artifact!r} ({exc})") from None
    if expected_sha is not None and sha256_file(local) != expected_sha:
        raise UserError(
            f"teacher.checkpoint {uri!r}: the downloaded {artifact!r} does not match the sha256 "
            f"logged with it ({expected_sha}); the artifact store holds a different file"
        )
    return local


def ensure_teacher(cfg: TrainConfig, *, resume: bool = False) -> TrainConfig:
    """Fill ``teacher.checkpoint`` from ``teacher.train``: reuse a finished run of that config, or train it.

    The teacher's run is found by the digest of its resolved config, so a changed teacher file
    trains a new teacher and an unchanged one is trained once per tracking store. ``resume``: an
    unfinished training of the teacher (its driver was killed) continues from its last checkpoint
    instead of starting again.
    """
    if cfg.teacher is None or cfg.teacher.checkpoint:
        return cfg
    from semckd_ray.config import load_train_config
    from semckd_ray.trainer import config_digest, find_finished_run, find_training, train

    teacher_cfg = load_train_config(cfg.teacher.train)
    if teacher_cfg.student.model != cfg.teacher.model:
        raise UserError(
            f"teacher.train {cfg.teacher.train!r} trains {teacher_cfg.student.model!r}, "
            f"but teacher.model is {cfg.teacher.model!r}"
        )
    if teacher_cfg.data.dataset != cfg.data.dataset:
        raise UserError(
            f"teacher.train {cfg.teacher.train!r} trains on {teacher_cfg.data.dataset!r}, "
            f"but this experiment uses data.dataset={cfg.data.dataset!r}"
        )
    # The teacher trains where the student does: same tracking store, the same (shared) checkpoint
    # storage, which a multi-node cluster requires, and the same copy of the dataset.
    teacher_cfg.tracking.uri = cfg.tracking.uri
    teacher_cfg.tracking.storage_path = cfg.tracking.storage_path
    teacher_cfg.data.root = cfg.data.root
    run_id = find_finished_run(teacher_cfg, config_digest(teacher_cfg))
    if run_id is None:
        unfinished = None
        if resume:
            try:
                unfinished = find_training(teacher_cfg, "latest")[0]
            except UserError:
                pass  # none of this config: trained from the start
        if unfinished is None:
            print(f"[semckd-ray] training the teacher {cfg.teacher.model} first ({cfg.teacher.train})", flush=True)
        run_id = train(teacher_cfg, resume="latest" if unfinished else None).run_id
    else:
        print(f"[semckd-ray] reusing teacher run {run_id} ({cfg.teacher.train})", flush=True)
    teacher = TeacherConfig(model=cfg.teacher.model, checkpoint=f"runs:/{run_id}")
    return cfg.model_copy(update={"teacher": teacher}, deep=True)
