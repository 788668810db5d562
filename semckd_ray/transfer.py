"""``python -m semckd_ray.transfer --student STUDENT --dataset DATASET``: how well a student's features transfer.

The SemCKD papers' transfer study (after CRD's): the student trained on CIFAR-100 is frozen and a
new linear classifier on its pooled features (``features[-1]``, what its own classifier reads) is
trained on another dataset resized to 32x32 (STL-10, Tiny ImageNet; any dataset of
``semckd_ray.data.list_datasets()``). Test top-1 of that linear probe measures the features.

``STUDENT`` is ``runs:/<run id>`` (the final checkpoint, ``checkpoints/last.pt``, of a student
trained here, checked against its logged sha256; ``runs:/<run id>/<artifact>`` names another one),
``models:/<name>/<version>`` (``models:/<name>@<alias>``: the registered checkpoint, the best one
for a model this project registered), a checkpoint file or a Ray checkpoint folder. The
architecture comes from the checkpoint's saved config, else from the student run's params, else
from ``--model`` (needed for an official or hand-made checkpoint, which holds no config); the
student's number of classes is read from its classifier's weights.

What is taken from the official ``transfer.py`` (DefangChen/SemCKD):
- the backbone's weights are frozen, the new ``nn.Linear`` (PyTorch's default initialisation)
  is the only thing trained, with cross-entropy;
- SGD, lr 0.05, momentum 0.9, weight decay 5e-4, 240 epochs, lr x0.1 after epochs 150, 180 and 210
  (MultiStepLR stepped once per epoch: epoch 151 is the first at 0.005);
- augmentation: ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` of the 32x32 image, drawn
  afresh every epoch, so the backbone runs forward over the training set every epoch;
- the model evaluated on the test split after every epoch, the test split being STL-10's test
  split and Tiny ImageNet's official val split.

What differs from it, by choice:
- the backbone's BatchNorm stays in eval mode. The official code calls ``model.train()``, so its
  BatchNorm layers normalise with each batch's statistics and overwrite their running statistics
  with the target dataset's: its "frozen" backbone changes. Here the backbone is bit-for-bit the
  student's (``requires_grad_(False)`` and eval mode).
- normalisation uses the target dataset's mean/std (``--normalize target``, the default). The
  official code normalises with CIFAR-100's constants whatever the target; ``--normalize cifar100``
  does that.
- batch 64 (``--batch-size``); the official ``transfer.py`` uses 128, and its ``shuffle=True``
  DataLoader keeps the last partial batch, as here.
- selection: the official script reports the best test accuracy over all epochs (``best_acc``),
  which selects on the test set. Here a val split is held out of the training split as
  ``load_dataset`` does (``--val-size``, default the dataset's: 10% for STL-10 / Tiny ImageNet,
  5000 for CIFAR; ``--split-seed``), and two numbers are reported: the test top-1 at the last
  epoch (``test_top1``) and the test top-1 at the epoch of the best val top-1
  (``test_top1_at_best_val``, the first such epoch), which is the headline. The linear layer thus
  trains on 90% of the official training images; ``--val-size 0`` trains on all of them, and then
  the last epoch is the selected one. The official number can still be read off the per-epoch
  ``test_top1`` history (its maximum), but it is not an unbiased estimate and is not reported.
- ``--no-augment`` is not in the official recipe: the backbone's features of the (unaugmented)
  training images are computed once and the linear layer trains on them, which takes seconds
  instead of one backbone pass per epoch, and gives different (usually lower) accuracies.

Val and test features never depend on the epoch (a frozen backbone in eval mode, no augmentation),
so they are computed once; only the linear layer runs on them each epoch. ``--seed`` seeds the
linear layer's initialisation and the data order and augmentation (the same streams as
``semckd_ray.data.pipeline``), so a run is repeatable on the same machine.

It runs in this process, on the GPU if there is one (``--cpu``: on the CPU), not as a Ray Train
job: the only cost is one frozen forward per training image per epoch, which one GPU does for
STL-10 (4,500 images) in well under a second, and the whole dataset sits in memory; data-parallel
workers would add a process group and sharding and gain nothing. On a cluster, submit the command
with ``ray job submit`` to put it on a GPU node.

Tracking: one MLflow run in the student run's experiment (``--experiment`` names another; a local
checkpoint goes to its config's experiment, else ``transfer``), named ``transfer <dataset>
<student run name>``, tagged ``role=transfer``, ``transfer_dataset``, ``student_run_id`` (when the
student comes from a run), ``student_model``, ``student_method``. Every setting is a param; per
epoch ``train_loss``, ``train_top1``, ``val_top1``, ``test_top1``, ``test_top5``, ``lr``,
``epoch_seconds``; at the end ``test_top1`` / ``test_top5`` (last epoch), ``test_top1_at_best_val``,
``test_top5_at_best_val``, ``best_val_top1``, ``best_epoch``; the linear layer as
``checkpoints/linear.pt`` (``model``: the last epoch's weights, ``model_at_best_val``: the
selected epoch's), with its sha256 as the tag ``checkpoint.linear.sha256``. The tracking store is
``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the one in the checkpoint's config, else
``./mlflow.db``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semckd_ray.cli import run_cli
from semckd_ray.errors import UserError

# The official transfer.py normalises every target dataset with CIFAR-100's statistics.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
NORMALIZATIONS = ("target", "cifar100")
EVAL_BATCH_SIZE = 256
LINEAR_ARTIFACT_DIR = "checkpoints"
LINEAR_FILE = "linear.pt"
LINEAR_FORMAT = "semckd-ray/transfer-1"
DEFAULT_EXPERIMENT = "transfer"
# Where ``train_loop`` records a finished run's final checkpoint.
LAST_CHECKPOINT_TAG = "checkpoint.last.path"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m semckd_ray.transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, metavar="STUDENT",
                        help="runs:/<run id>[/<artifact>], models:/<name>/<version> (or @<alias>), "
                             "a checkpoint file or a Ray checkpoint folder")
    parser.add_argument("--dataset", required=True, help="the target dataset (stl10, tiny_imagenet, cifar10, ...)")
    parser.add_argument("--root", default="data", help="the folder datasets are read from (default: data)")
    parser.add_argument("--download", action="store_true", help="download the dataset into --root if absent")
    parser.add_argument("--model", help="the student's architecture, for a checkpoint without a saved config")
    parser.add_argument("--epochs", type=int, default=240)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--lr-decay-epochs", type=int, nargs="+", default=[150, 180, 210], metavar="EPOCH")
    parser.add_argument("--lr-decay-rate", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="train on features computed once, without crop/flip (fast; not the official recipe)")
    parser.add_argument("--normalize", choices=NORMALIZATIONS, default="target",
                        help="normalise with the target dataset's mean/std (default) or CIFAR-100's (official)")
    parser.add_argument("--val-size", type=int, default=None,
                        help="images held out of the training split to select on (default: the dataset's; 0: none)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the val split (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the linear layer and the data order (default 0)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the "
                                               "checkpoint config's, else sqlite:///./mlflow.db)")
    parser.add_argument("--experiment", help="MLflow experiment (default: the student run's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _check_arguments(args)
    # MLflow draws a progress bar for the student's download, a line of control characters in a log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    result = transfer(args)
    print(f"\ntransfer run {result.run_id}: {result.student.model_name} ({result.student.label}) -> "
          f"{args.dataset}: test top1 at best val {result.final['test_top1_at_best_val']:.2f} "
          f"(epoch {result.final['best_epoch']}), test top1 at the last epoch {result.final['test_top1']:.2f}",
          flush=True)
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad settings before anything is read or loaded."""
    from semckd_ray.data.catalog import check_val_size, dataset_info

    dataset_info(args.dataset)  # an unknown name: the error lists the valid ones
    try:
        check_val_size(args.dataset, args.val_size)
    except UserError as exc:
        raise UserError(_as_flags(str(exc))) from None
    if args.model is not None:
        from semckd_ray.models import list_models

        if args.model not in list_models():
            raise UserError(f"unknown model {args.model!r} (--model); valid models: {', '.join(list_models())}")
    problems = [f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)!r}"
                for name, ok, what in (
                    ("epochs", args.epochs >= 1, "at least 1"),
                    ("batch_size", args.batch_size >= 1, "at least 1"),
                    ("lr", args.lr > 0, "positive"),
                    ("momentum", 0 <= args.momentum < 1, "in [0, 1)"),
                    ("weight_decay", args.weight_decay >= 0, "non-negative"),
                    ("lr_decay_rate", 0 < args.lr_decay_rate <= 1, "in (0, 1]"),
                    ("lr_decay_epochs", all(e >= 1 for e in args.lr_decay_epochs), "positive epochs"),
                    ("seed", args.seed >= 0, "non-negative"),
                    ("split_seed", args.split_seed >= 0, "non-negative"),
                ) if not ok]
    if problems:
        raise UserError("; ".join(problems))


# ------------------------------------------------------------------------------------------
# The student


@dataclass
class Student:
    """The frozen backbone and where it comes from."""

    model: Any  # nn.Module, eval mode, no gradients
    model_name: str
    method: str  # the distillation method it was trained with ("" if unknown)
    trained_on: str  # its training dataset ("" if unknown)
    label: str  # how messages and the run name call it: its run's name, else the checkpoint
    run_id: str | None
    experiment_id: str | None  # its run's experiment
    config_experiment: str | None  # the experiment its saved config names
    tracking_uri: str


def load_student(spec: str, model_name: str | None, tracking_uri: str | None) -> Student:
    """The student of ``--student``, frozen; ``UserError`` for a missing run or file or a foreign checkpoint."""
    from semckd_ray import tracking
    from semckd_ray.models import create_model, load_checkpoint
    from semckd_ray.models.checkpoint import read_checkpoint

    explicit_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    run = None
    if spec.startswith(("runs:/", "models:/")):
        uri = tracking.resolve_tracking_uri(explicit_uri)
        tracking.check_reachable(uri)
        path, run = _download_student(spec, uri)
    else:
        path = Path(spec)
        if path.is_dir() and (path / "state.pt").is_file():
            path = path / "state.pt"  # a Ray checkpoint folder, as the training prints it
        uri = None
    blob = read_checkpoint(Path(path))
    config = blob.get("config") if isinstance(blob, Mapping) and isinstance(blob.get("config"), Mapping) else {}
    params = run.data.params if run is not None else {}
    name = model_name or _dotted(config, "student.model") or params.get("student.model")
    if not name:
        raise UserError(f"--student {spec!r} holds no training config (an official or hand-made checkpoint) "
                        "and comes from no run of this project: name its architecture with --model NAME")
    if uri is None:
        uri = tracking.resolve_tracking_uri(explicit_uri or _dotted(config, "tracking.uri"))
        tracking.check_reachable(uri)
    try:
        model = create_model(name, num_classes=100)
        classes = _classifier_outputs(model, blob)
        if classes not in (None, 100):
            model = create_model(name, num_classes=classes)
        load_checkpoint(model, blob)
    except UserError as exc:
        raise UserError(f"--student {spec!r} (model {name!r}): {exc}") from None
    model.eval().requires_grad_(False)
    if run is not None:
        label = run.info.run_name or run.info.run_id
    elif config:
        label = _dotted(config, "tracking.run_name") or "-".join(
            str(_dotted(config, k)) for k in ("name", "method.name", "student.model"))
    else:
        label = Path(spec).stem
    return Student(
        model=model, model_name=name,
        method=str(_dotted(config, "method.name") or params.get("method.name") or ""),
        trained_on=str(_dotted(config, "data.dataset") or params.get("data.dataset") or ""),
        label=label, run_id=run.info.run_id if run is not None else None,
        experiment_id=run.info.experiment_id if run is not None else None,
        config_experiment=_dotted(config, "tracking.experiment"), tracking_uri=uri,
    )


def _download_student(spec: str, uri: str):
    """(local checkpoint file, the MLflow run it belongs to) of a ``runs:/`` or ``models:/`` student."""
    from semckd_ray import tracking
    from semckd_ray.teacher import resolve_teacher_file, teacher_run_id

    mlflow_client = tracking.client(uri)
    try:
        if spec.startswith("runs:/"):
            run_id, _, artifact = spec[len("runs:/"):].partition("/")
            run = _get_run(mlflow_client, run_id, spec, uri)
            if not artifact:
                artifact = run.data.tags.get(LAST_CHECKPOINT_TAG)
                if artifact is None:
                    raise UserError(f"--student {spec!r}: run {run_id} has no final checkpoint (tag "
                                    f"{LAST_CHECKPOINT_TAG!r}); did it finish? Name an artifact: "
                                    "runs:/<run id>/<path>")
            path = resolve_teacher_file(f"runs:/{run_id}/{artifact}", uri)
        else:
            path = resolve_teacher_file(spec, uri)
            run = _get_run(mlflow_client, teacher_run_id(spec, uri), spec, uri)
    except UserError as exc:
        # teacher.resolve_teacher_file words its errors for the teacher.checkpoint key.
        message = str(exc)
        prefix = "teacher.checkpoint "
        raise UserError("--student " + message[len(prefix):] if message.startswith(prefix) else message) from None
    return path, run


def _get_run(mlflow_client, run_id: str, spec: str, uri: str):
    from semckd_ray.tracking import redact

    try:
        return mlflow_client.get_run(run_id)
    except Exception:
        raise UserError(f"--student {spec!r}: no MLflow run {run_id!r} in the tracking store {redact(uri)}; "
                        "check the run id, or --tracking-uri / $MLFLOW_TRACKING_URI") from None


def _classifier_outputs(model, blob: Any) -> int | None:
    """The number of classes of the checkpoint's classifier (the model's last linear layer), if it has one."""
    from torch import Tensor, nn

    state = blob.get("model") if isinstance(blob, Mapping) and isinstance(blob.get("model"), Mapping) else blob
    if not isinstance(state, Mapping):
        return None
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]
    for key in (f"{linear}.bias", f"module.{linear}.bias"):
        if isinstance(state.get(key), Tensor) and state[key].dim() == 1:
            return len(state[key])
    return None


def _dotted(tree: Mapping, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


# ------------------------------------------------------------------------------------------
# The linear probe


@dataclass
class TransferResult:
    run_id: str
    student: Student
    head: Any  # the trained nn.Linear (last epoch)
    history: list[dict[str, float]]
    final: dict[str, float]


def lr_at(args: argparse.Namespace, epoch: int) -> float:
    """The official MultiStepLR, stepped once per epoch (epochs are 1-based)."""
    return args.lr * args.lr_decay_rate ** sum(epoch > m for m in args.lr_decay_epochs)


def transfer(args: argparse.Namespace) -> TransferResult:
    """Check the inputs, then train and log the linear probe; returns what it logged."""
    import torch

    from semckd_ray import tracking
    from semckd_ray.data import check_dataset, load_dataset
    from semckd_ray.trainer import close_run

    # Everything that can be refused is refused here, before a run is created.
    try:
        check_dataset(args.dataset, args.root, args.download)  # missing files: refused before any download
    except UserError as exc:
        raise UserError(_as_flags(str(exc))) from None
    student = load_student(args.student, args.model, args.tracking_uri)
    try:
        splits = load_dataset(args.dataset, args.root, download=args.download, val_size=args.val_size,
                              seed=args.split_seed)
    except UserError as exc:
        raise UserError(_as_flags(str(exc))) from None
    if len(splits.train) == 0 or len(splits.test) == 0:
        raise UserError(f"{args.dataset}: the training or test split is empty "
                        f"({len(splits.train)} / {len(splits.test)} images)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    student.model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)

    mlflow_client = tracking.client(student.tracking_uri)
    run_id = _start_run(mlflow_client, args, student, splits, device)
    try:
        head, history, final, saved = _train(
            args, student.model, splits, device,
            on_epoch=lambda m, epoch: mlflow_client.log_batch(run_id, metrics=_metrics(m, epoch)))
        _log_linear(mlflow_client, run_id, saved)
        # test_top1 / test_top5 of the last epoch are the last values of their per-epoch series already.
        selected = {k: v for k, v in final.items() if k not in history[-1]}
        mlflow_client.log_batch(run_id, metrics=_metrics(selected, args.epochs))
    except KeyboardInterrupt:
        close_run(mlflow_client, run_id, "KILLED")
        raise
    except BaseException as exc:
        close_run(mlflow_client, run_id, "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    close_run(mlflow_client, run_id, "FINISHED")
    return TransferResult(run_id, student, head, history, final)


# The data module words its errors for the training config's keys; this command has flags.
_CONFIG_WORDING = (("set `data.download: true` in the config", "pass --download"),
                   ("data.download: true", "--download"), ("data.val_size", "--val-size"), ("data.root", "--root"))


def _as_flags(message: str) -> str:
    for config_words, flag_words in _CONFIG_WORDING:
        message = message.replace(config_words, flag_words)
    return message


def _normalization(args: argparse.Namespace, splits) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (tuple(splits.mean), tuple(splits.std)) if args.normalize == "target" else (CIFAR100_MEAN, CIFAR100_STD)


def _train(args: argparse.Namespace, backbone, splits, device, on_epoch):
    """Train the linear layer; ``on_epoch(metrics, epoch)`` after every epoch."""
    import dataclasses

    import torch
    from torch import nn

    from semckd_ray.data import BatchLoader, train_loader

    mean, std = _normalization(args, splits)
    placement = dict(device=device, keep_on_device=device.type == "cuda", pin_memory=device.type == "cuda",
                     channels_last=device.type == "cuda")
    # train_loader's order and augmentation streams; with --no-augment, only its order is used.
    train_batches = train_loader(dataclasses.replace(splits, mean=mean, std=std), args.batch_size, seed=args.seed,
                                 **placement)

    def cached(split):
        return _features(backbone, BatchLoader(split, mean, std, EVAL_BATCH_SIZE, **placement))

    val, test = cached(splits.val), cached(splits.test)
    train_cache = None if args.augment else cached(splits.train)

    torch.manual_seed(args.seed)
    head = nn.Linear(backbone.feature_info[-1].channels, splits.num_classes).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr_at(args, 1), momentum=args.momentum,
                                weight_decay=args.weight_decay)
    best = {"val_top1": -math.inf, "epoch": 0, "test_top1": math.nan, "test_top5": math.nan, "state": None}
    history: list[dict[str, float]] = []
    for epoch in range(1, args.epochs + 1):
        lr = lr_at(args, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_batches.set_epoch(epoch)
        started = time.perf_counter()
        loss, top1 = _train_epoch(backbone, head, optimizer, train_batches, train_cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        m = {"train_loss": loss, "train_top1": top1, "lr": lr, "epoch_seconds": seconds}
        test_top1, test_top5 = _accuracy(head, *test)
        if len(val[1]):
            m["val_top1"] = _accuracy(head, *val)[0]
        m["test_top1"], m["test_top5"] = test_top1, test_top5
        # The first epoch of the best val top-1; without a val split, the last epoch.
        if (m["val_top1"] > best["val_top1"]) if "val_top1" in m else epoch == args.epochs:
            best.update(val_top1=m.get("val_top1", math.nan), epoch=epoch, test_top1=test_top1,
                        test_top5=test_top5, state=_cpu_state(head))
        history.append(m)
        on_epoch(m, epoch)
        _print_progress(args, m, epoch, seconds)
    final = {"test_top1": history[-1]["test_top1"], "test_top5": history[-1]["test_top5"],
             "test_top1_at_best_val": best["test_top1"], "test_top5_at_best_val": best["test_top5"],
             "best_epoch": best["epoch"]}
    if math.isfinite(best["val_top1"]):
        final["best_val_top1"] = best["val_top1"]
    saved = {
        "format": LINEAR_FORMAT,
        "model": _cpu_state(head),
        "model_at_best_val": best["state"],
        "epoch": args.epochs,
        "best_epoch": best["epoch"],
        "in_features": head.in_features,
        "num_classes": head.out_features,
        "dataset": args.dataset,
        "mean": list(mean),
        "std": list(std),
        "student": args.student,
    }
    return head, history, final, saved


def _cpu_state(module) -> dict[str, Any]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _features(backbone, loader):
    """The pooled features (float32) and labels of every image of ``loader``, in order."""
    import torch

    feats, labels = [], []
    with torch.no_grad():
        for x, y, _ in loader:
            feats.append(backbone(x)[1][-1].float())
            labels.append(y)
    if not feats:
        dim = backbone.feature_info[-1].channels
        return torch.empty(0, dim, device=loader.device), torch.empty(0, dtype=torch.int64, device=loader.device)
    return torch.cat(feats), torch.cat(labels)


def _train_epoch(backbone, head, optimizer, loader, cache) -> tuple[float, float]:
    """One epoch of the linear layer: on the backbone's features of augmented batches, or on ``cache``."""
    import torch
    import torch.nn.functional as F

    if cache is None:
        def batches():
            for x, y, _ in loader:
                with torch.no_grad():  # not around the yield: the caller's step needs gradients
                    f = backbone(x)[1][-1].float()
                yield f, y
    else:
        feats, labels = cache

        def batches():
            for index in loader.epoch_indices().to(feats.device).split(loader.batch_size):
                yield feats[index], labels[index]

    head.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=head.weight.device)
    correct = torch.zeros((), dtype=torch.int64, device=head.weight.device)
    seen = 0
    for f, y in batches():
        logits = head(f)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            loss_sum += loss.detach().double() * len(y)
            correct += logits.argmax(dim=1).eq(y).sum()
        seen += len(y)
    return float(loss_sum) / seen, 100.0 * int(correct) / seen


def _accuracy(head, feats, labels) -> tuple[float, float]:
    """Top-1 and top-5 (%) of the linear layer on cached features."""
    import torch

    from semckd_ray.train_loop import accuracy_counts

    head.eval()
    with torch.no_grad():
        top1, top5 = accuracy_counts(head(feats), labels)
    return 100.0 * top1 / len(labels), 100.0 * top5 / len(labels)


def _print_progress(args: argparse.Namespace, m: dict[str, float], epoch: int, seconds: float) -> None:
    eta = (args.epochs - epoch) * seconds
    val = f" val top1 {m['val_top1']:.2f}" if "val_top1" in m else ""
    print(f"[transfer {args.dataset}] epoch {epoch}/{args.epochs} loss {m['train_loss']:.4f} "
          f"train top1 {m['train_top1']:.2f}{val} test top1 {m['test_top1']:.2f} lr {m['lr']:.4g} "
          f"{seconds:.1f}s ETA {eta / 60:.1f} min", flush=True)


# ------------------------------------------------------------------------------------------
# MLflow


def _start_run(mlflow_client, args: argparse.Namespace, student: Student, splits, device) -> str:
    from semckd_ray import tracking

    if args.experiment:
        experiment_id = tracking.get_or_create_experiment(mlflow_client, args.experiment)
    elif student.experiment_id is not None:
        experiment_id = student.experiment_id
    else:
        name = student.config_experiment or DEFAULT_EXPERIMENT
        experiment_id = tracking.get_or_create_experiment(mlflow_client, name)
    tags = {
        "role": "transfer",
        "transfer_dataset": args.dataset,
        "student_model": student.model_name,
        "student_method": student.method,
        "git_commit": tracking.git_commit(),
        "device": device.type,
    }
    if student.run_id is not None:
        tags["student_run_id"] = student.run_id
    run = mlflow_client.create_run(experiment_id, run_name=f"transfer {args.dataset} {student.label}",
                                   tags=tracking.redact(tags))
    mean, std = _normalization(args, splits)
    params = {
        **{key: getattr(args, key) for key in (
            "student", "dataset", "root", "download", "model", "epochs", "lr", "momentum", "weight_decay",
            "lr_decay_epochs", "lr_decay_rate", "batch_size", "augment", "normalize", "split_seed", "seed")},
        "val_size": len(splits.val),  # the effective one
        "train_images": len(splits.train),
        "test_images": len(splits.test),
        "num_classes": splits.num_classes,
        "mean": list(mean),
        "std": list(std),
        "student_model": student.model_name,
        "student_method": student.method,
        "student_dataset": student.trained_on,
        "student_run_id": student.run_id or "",
        "feature_dim": student.model.feature_info[-1].channels,
        "selection": "test top-1 at the first epoch of the best val top-1" if len(splits.val)
                     else "test top-1 at the last epoch (no val split)",
    }
    tracking.log_params(mlflow_client, run.info.run_id, params)
    return run.info.run_id


def _metrics(values: dict[str, float], step: int):
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(k, float(v), stamp, step) for k, v in values.items() if math.isfinite(v)]


def _log_linear(mlflow_client, run_id: str, saved: dict[str, Any]) -> None:
    import tempfile

    import torch

    from semckd_ray.tracking import sha256_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / LINEAR_FILE
        torch.save(saved, path)
        mlflow_client.log_artifact(run_id, str(path), LINEAR_ARTIFACT_DIR)
        mlflow_client.set_tag(run_id, "checkpoint.linear.sha256", sha256_file(path))
        mlflow_client.set_tag(run_id, "checkpoint.linear.path", f"{LINEAR_ARTIFACT_DIR}/{LINEAR_FILE}")


if __name__ == "__main__":
    run_cli(main)
