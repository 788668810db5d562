"""The per-worker training loop: plain PyTorch, with Ray and MLflow only at the edges.

``run_worker`` is what every Ray Train worker runs, and it runs the same in-process at world size 1
(tests, profiling): ``ray.train`` is touched only through a ``Reporter``. Every epoch reports each
loss term, train and validation top-1/top-5, the learning rate, epoch seconds and images/s; a
checkpoint every ``checkpoint.every`` epochs and at the end holds everything needed to resume
bit-exactly on CPU (model, method modules, optimizer, epoch, RNG states, best-so-far).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from semckd_ray.attention import attention_loader, attention_metrics, has_attention, mean_attention
from semckd_ray.config import TrainConfig
from semckd_ray.data import eval_loader, load_dataset, log_training_data, train_loader
from semckd_ray.distill import DistillContext, Distiller, create_method, get_method_class
from semckd_ray.errors import UserError
from semckd_ray.models import create_model
from semckd_ray.teacher import FrozenTeacher, load_teacher
from semckd_ray.tracking import SYSTEM_PREFIX

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
BEST_FILE = "best.pt"
CHECKPOINT_FORMAT = "semckd-ray/1"
_MAX_NAMED_FILES = 5  # undecodable images a progress line names


class Reporter(Protocol):
    """The edge between the loop and whoever runs it (Ray Train, or a test)."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> str | None: ...

    def node(self) -> str: ...


class LocalReporter:
    """Keeps reported metrics in memory and checkpoints in a folder: world size 1 without Ray."""

    def __init__(self, checkpoint_root: str | os.PathLike, resume: bool = True):
        self.root = Path(checkpoint_root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.metrics: list[dict[str, float]] = []
        self._resume = resume

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.metrics.append(dict(metrics))
        if checkpoint_dir is not None:
            target = self.root / f"epoch_{int(metrics['epoch']):05d}"
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)

    def latest_checkpoint(self) -> str | None:
        if not self._resume:
            return None
        found = sorted(self.root.glob("epoch_*"))
        return str(found[-1]) if found else None

    def node(self) -> str:
        import socket

        return socket.gethostname()


@dataclass
class WorkerEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_rank: int = 0  # rank among the workers of this node

    @classmethod
    def detect(cls, use_gpu: bool) -> WorkerEnv:
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        local_rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Ray Train's torch backend
        if use_gpu:
            if not torch.cuda.is_available():
                raise UserError("scaling.use_gpu is true but this worker sees no CUDA device")
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        return cls(rank=rank, world_size=world, device=device, local_rank=local_rank)


def worker_seed(seed: int, rank: int, *more: int) -> int:
    """The seed of rank ``rank``'s own random stream (CRD's negatives): unrelated across ranks."""
    import numpy as np

    return int(np.random.SeedSequence((seed, rank, *more)).generate_state(1, dtype=np.uint64)[0] >> 1)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Step schedule of the official code: x rate once per milestone passed (epochs are 1-based).

    With ``optim.warmup_epochs`` W, epochs 1..W ramp linearly from ``base_lr`` to ``peak_lr``.
    """
    warmup = cfg.optim.warmup_epochs
    if epoch <= warmup:
        return cfg.base_lr() + (cfg.peak_lr() - cfg.base_lr()) * epoch / warmup
    passed = sum(epoch > m for m in cfg.optim.lr_decay_epochs)
    return cfg.peak_lr() * cfg.optim.lr_decay_rate**passed


def accuracy_counts(logits: Tensor, target: Tensor, topk=(1, 5)) -> list[int]:
    k_max = min(max(topk), logits.shape[1])
    pred = logits.topk(k_max, dim=1).indices
    hits = pred.eq(target[:, None])
    return [int(hits[:, : min(k, k_max)].any(dim=1).sum()) for k in topk]


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics), as DDP does before a forward."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    buffers = [b for b in module.buffers() if b.numel()]
    for dtype in sorted({b.dtype for b in buffers}, key=str):
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, src=src)
        offset = 0
        for b in group:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def _gather(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _prepare_data(cfg: TrainConfig, env: WorkerEnv) -> None:
    """Download once per node (its local rank 0) while the other ranks wait; one failure stops all."""
    from semckd_ray.data import prepare_dataset

    error = None
    if env.local_rank == 0:
        try:
            prepare_dataset(cfg.data.dataset, cfg.data.root, download=cfg.data.download)
        except UserError as exc:
            error = str(exc)
    errors = [e for e in _gather(error) if e]
    if errors:
        raise UserError(error or f"preparing the dataset failed on another node: {errors[0]}")


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: WorkerEnv, amp: bool) -> dict[str, float]:
    """Top-1/top-5 (%) and CE over the whole split, summed across workers."""
    model.eval()
    correct1 = correct5 = loss_sum = 0.0
    seen = 0
    for x, y, _ in loader:
        with _autocast(env.device, amp):
            logits, _ = model(x)
        logits = logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        c1, c5 = accuracy_counts(logits, y)
        correct1 += c1
        correct5 += c5
        seen += y.numel()
    correct1, correct5, loss_sum, seen = _all_reduce_sum([correct1, correct5, loss_sum, seen], env.device)
    if seen == 0:
        return {}
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "loss": loss_sum / seen}


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def feature_shapes(model: nn.Module, device: torch.device, size: int = 32) -> tuple[tuple[int, ...], ...]:
    """Per-sample shapes of every feature, from a probe batch of ``size`` x ``size`` images in eval mode
    (as the official code): the data's resolution, whatever the model was designed for."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, feats = model(torch.randn(2, 3, size, size, device=device))
    model.train(was_training)
    return tuple(tuple(f.shape[1:]) for f in feats)


@dataclass
class WorkerData:
    """A worker's view of the dataset: its loaders and what the methods need to know of the training split.

    ``train`` / ``val`` / ``test`` iterate batches ``(images, labels, index)`` of this rank's shard
    (``semckd_ray.data.BatchLoader`` in memory, ``semckd_ray.data.imagefolder.StreamLoader`` streamed).
    """

    num_classes: int
    num_train: int
    train_labels: Tensor | None  # by dataset index (CRD's negatives)
    train: Any
    val: Any
    test: Any
    attention: Any  # batch size -> the loader SemCKD's attention is measured on: full batches of val
    log: Any  # (tracker, metrics: bool) -> None: what the training split is, into the run


def _in_memory_data(cfg: TrainConfig, env: WorkerEnv, batch: int, fixed_batch: bool, channels_last: bool) -> WorkerData:
    """The dataset loaded into this worker's memory (on a GPU, copied to it), sharded by rank."""
    if cfg.data.download:
        _prepare_data(cfg, env)
    # train_fraction and label_noise change the training split only; both are drawn from split_seed.
    splits = load_dataset(cfg.data.dataset, cfg.data.root, download=False, val_size=cfg.data.val_size,
                          seed=cfg.data.split_seed, train_fraction=cfg.data.train_fraction,
                          label_noise=cfg.data.label_noise)
    placement = dict(device=env.device, channels_last=channels_last,
                     keep_on_device=env.device.type == "cuda", pin_memory=env.device.type == "cuda")
    shard = dict(rank=env.rank, world_size=env.world_size)

    def log(tracker: _Tracker, metrics: bool) -> None:
        # data/*.csv (class counts, the few-shot subset, the noisy labels) and data_* counts at step 0.
        log_training_data(tracker.logger, splits, tracker.folder, metrics=metrics)

    return WorkerData(
        num_classes=splits.num_classes,
        num_train=len(splits.train.labels),
        train_labels=splits.train.labels,
        train=train_loader(splits, batch, seed=cfg.seed, drop_last=fixed_batch, **shard, **placement),
        val=eval_loader(splits, "val", cfg.data.eval_batch_size, **shard, **placement),
        test=eval_loader(splits, "test", cfg.data.eval_batch_size, **shard, **placement),
        attention=lambda size: attention_loader(splits, size, **shard, **placement),
        log=log,
    )


def _streamed_data(cfg: TrainConfig, env: WorkerEnv, batch: int, stream: dict[str, Any],
                   channels_last: bool) -> WorkerData:
    """Ray Train's shards of the datasets the driver built (``semckd_ray.trainer.stream_datasets``).

    Training drops each rank's last partial batch: every rank gets the same number of images from
    Ray Data's equal split, hence takes the same number of steps, and SemCKD needs full batches.
    Evaluation shards are unequal and together hold every image once.
    """
    import ray
    import ray.train

    from semckd_ray.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, StreamLoader, shard_samples

    sizes = stream["sizes"]
    rank, world = env.rank, env.world_size
    options = dict(device=env.device, channels_last=channels_last, prefetch_batches=cfg.data.prefetch_batches)

    def loader(split: str, batch_size: int, drop_last: bool = False):
        if not sizes.get(split):
            return ()  # no such split (val_size 0): nothing to iterate
        samples = shard_samples(sizes[split], world, rank, equal=split == "train")
        return StreamLoader(ray.train.get_dataset_shard(split), IMAGENET_MEAN, IMAGENET_STD, batch_size,
                            num_samples=samples, drop_last=drop_last, **options)

    def log(tracker: _Tracker, metrics: bool) -> None:
        if metrics:
            tracker.logger.log_metrics({f"data_{split}_images": float(n) for split, n in sizes.items()}
                                       | {"data_classes": float(stream["num_classes"])}, step=0)

    labels = stream["train_labels"]
    labels = ray.get(labels) if isinstance(labels, ray.ObjectRef) else labels
    return WorkerData(
        num_classes=stream["num_classes"],
        num_train=sizes["train"],
        train_labels=torch.as_tensor(labels, dtype=torch.int64),
        train=loader("train", batch, drop_last=True),
        val=loader("val", cfg.data.eval_batch_size),
        test=loader("test", cfg.data.eval_batch_size),
        attention=lambda size: loader("val", size, drop_last=True),
        log=log,
    )


@dataclass
class TrainingState:
    """What a checkpoint restores besides the weights."""

    epoch: int = 0  # last finished epoch
    best_val_top1: float = -math.inf
    best_epoch: int = 0
    test_top1_at_best: float = math.nan
    test_top5_at_best: float = math.nan


def run_worker(train_config: dict[str, Any], reporter: Reporter, run_id: str | None = None,
               tracking_uri: str | None = None, spool: str | None = None,
               stream: dict[str, Any] | None = None) -> dict[str, float]:
    """Train one student (or a teacher, with method ``vanilla``) and return the final metrics.

    With ``run_id``, rank 0 logs into that MLflow run; ``spool`` is the folder on the storage path
    where what the server did not get yet waits (see ``semckd_ray.spool``). ``stream``: for a
    streamed dataset, what the driver listed (``semckd_ray.trainer.stream_info``); the images come
    from Ray Train's dataset shards.
    """
    cfg = TrainConfig.model_validate(train_config)
    env = WorkerEnv.detect(cfg.scaling.use_gpu)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    if env.device.type == "cuda":
        # Every training batch has one shape (evaluation a few), so cuDNN's autotuner is paid once per
        # shape; the official code sets it too (train_student.py), and so does bench/gpu.py.
        torch.backends.cudnn.benchmark = True
    amp = cfg.scaling.bf16
    channels_last = cfg.scaling.channels_last_enabled()
    method_cls = get_method_class(cfg.method.name)

    # ---- data: each worker reads its own shard of the global batch
    batch = cfg.per_worker_batch()
    if stream is not None:
        data = _streamed_data(cfg, env, batch, stream, channels_last)
    else:
        data = _in_memory_data(cfg, env, batch, method_cls.requires_fixed_batch, channels_last)
    if len(data.train) == 0:
        raise UserError(
            f"the training split ({data.num_train} images) is smaller than one global batch "
            f"of optim.batch_size={cfg.optim.batch_size}"
            + (f" (data.train_fraction={cfg.data.train_fraction:g}): raise data.train_fraction or lower "
               "optim.batch_size" if cfg.data.train_fraction < 1 else "")
        )
    train_batches, val_batches, test_batches = data.train, data.val, data.test

    # ---- models: same seed on every rank, so every rank starts from the same weights
    torch.manual_seed(cfg.seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    student = create_model(cfg.student.model, num_classes=data.num_classes).to(env.device, memory_format=memory_format)
    teacher = None
    if cfg.teacher is not None:
        teacher = FrozenTeacher(
            load_teacher(cfg.teacher, data.num_classes, env.device, cfg.tracking.uri),
            torch.channels_last if cfg.scaling.teacher_channels_last_enabled() else torch.contiguous_format,
            feature_format=memory_format,
        )
    size = cfg.data.input_size()
    ctx = DistillContext(
        student_shapes=feature_shapes(student, env.device, size),
        teacher_shapes=feature_shapes(teacher, env.device, size) if teacher is not None else (),
        batch_size=batch,
        num_classes=data.num_classes,
        num_train=data.num_train,
        train_labels=data.train_labels,
        device=env.device,
    )
    method = create_method(cfg.method.name, ctx, cfg.method.options).to(env.device, memory_format=memory_format)
    # From here on each rank draws its own random numbers (CRD's negatives); the data pipeline
    # has generators of its own, keyed by rank.
    torch.manual_seed(worker_seed(cfg.seed, env.rank))
    # Methods with a layer attention (SemCKD) get it measured on the validation split every epoch.
    attention_batches = data.attention(batch) if has_attention(method) else None
    distiller = Distiller(student, method, gamma=cfg.method.gamma, alpha=cfg.method.alpha,
                          beta=cfg.beta(), kd_temperature=cfg.method.kd_temperature)
    if cfg.scaling.sync_bn and env.world_size > 1:
        # In place below the top: student and method keep their identity, with SyncBatchNorm layers.
        nn.SyncBatchNorm.convert_sync_batchnorm(distiller)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=lr_at(cfg, 1), momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)

    state = TrainingState()
    best_weights: dict[str, Any] | None = None
    resume_dir = reporter.latest_checkpoint()
    if resume_dir is not None:
        state, best_weights = _restore(Path(resume_dir), distiller, optimizer, env)
        if env.rank == 0:
            into = f" (MLflow run {run_id})" if run_id else ""
            print(f"[semckd-ray] resuming after epoch {state.epoch} from {resume_dir}{into}", flush=True)

    model = distiller
    sync_student = None
    if env.world_size > 1:
        # CRD keeps its memory bank consistent itself; broadcasting it every step would cost ~50 MB.
        # The student's BatchNorm statistics get what DDP would give them: rank 0's, before each step.
        ddp_options = {"forward_sync_buffers": False} if method_cls.syncs_own_buffers else {}
        if method_cls.syncs_own_buffers:
            sync_student = functools.partial(broadcast_buffers, distiller.student)
        model = nn.parallel.DistributedDataParallel(
            distiller, device_ids=[env.device.index] if env.device.type == "cuda" else None, **ddp_options
        )
    if cfg.scaling.compile:
        model = torch.compile(model)
    graphed = None
    if cfg.scaling.cuda_graphs and env.device.type == "cuda":
        from semckd_ray.cuda_graphs import GraphedStep

        # Built after the restore above, and it captures lazily on its first steps: the graph holds the
        # restored weights' and optimizer state's tensors.
        graphed = GraphedStep(model, teacher, optimizer, env.device, amp, method=method, batch_size=batch)

    nodes = _gather(reporter.node())
    tracker = _Tracker(tracking_uri, run_id, spool) if env.rank == 0 and run_id else None
    if tracker is not None:
        tracker.logger.set_tag("worker_nodes", ",".join(nodes))
        data.log(tracker, metrics=resume_dir is None)
    # MLflow's system metrics (CPU, memory, GPUs) of each machine, from its first rank: see _SystemMetrics.
    system = _SystemMetrics.start(tracking_uri, run_id, nodes, env.rank, gpu=env.device.type == "cuda") if run_id else None
    final: dict[str, float] = {}
    for epoch in range(state.epoch + 1, cfg.optim.epochs + 1):
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_batches.set_epoch(epoch)
        started = time.perf_counter()
        train_metrics = _train_epoch(model, teacher, train_batches, optimizer, env, amp, method_cls.needs_index,
                                     before_step=sync_student, graphed=graphed)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        seconds = time.perf_counter() - started
        skipped = _skipped_images(train_batches, env, cfg.name, epoch)
        # One model, one number: every rank evaluates, and rank 0 saves, rank 0's BatchNorm statistics.
        broadcast_buffers(distiller.student if method_cls.syncs_own_buffers else distiller)

        val = evaluate(student, val_batches, env, amp)
        attention = None
        if attention_batches is not None:
            with _autocast(env.device, amp):
                attention = mean_attention(student, method, teacher, attention_batches)
        improved = bool(val) and val["top1"] > state.best_val_top1
        last = epoch == cfg.optim.epochs
        if improved:
            state.best_val_top1, state.best_epoch = val["top1"], epoch
            test = evaluate(student, test_batches, env, amp)
            state.test_top1_at_best, state.test_top5_at_best = test["top1"], test["top5"]
            best_weights = _weights(distiller, epoch, cfg)
        # The score first: Tune's progress table shows a trial's first four metrics.
        metrics = {
            "best_val_top1": state.best_val_top1 if val else math.nan,
            **({"val_top1": val["top1"]} if val else {}),
            "epoch": epoch,
            "lr": lr,
            "train_steps": train_metrics.pop("steps"),
            "epoch_seconds": seconds,
            "images_per_s": train_metrics.pop("images") / seconds,
            **{f"train_{k}": v for k, v in train_metrics.items()},
            **({"train_skipped_images": float(skipped)} if skipped is not None else {}),
            **{f"val_{k}": v for k, v in val.items()},
            **attention_metrics(attention),
        }
        if last:
            test_last = evaluate(student, test_batches, env, amp)
            if not val:  # no validation split: the last epoch is the selected one
                state.best_epoch = epoch
                state.test_top1_at_best, state.test_top5_at_best = test_last["top1"], test_last["top5"]
                best_weights = _weights(distiller, epoch, cfg)
            metrics.update(
                test_top1_last=test_last["top1"], test_top5_last=test_last["top5"],
                test_top1_at_best_val=state.test_top1_at_best, test_top5_at_best_val=state.test_top5_at_best,
                best_epoch=state.best_epoch,
            )
        if not math.isfinite(metrics["train_total"]):
            # A diverged run stops here, cleanly: retrying would diverge again.
            metrics["diverged"] = 1.0
            reason = (f"non-finite training loss ({metrics['train_total']}) in epoch {epoch}; "
                      "lower optim.lr or method.beta")
            if tracker is not None:
                tracker.epoch(metrics, epoch)
                tracker.logger.set_tag("stopped_reason", reason)
                tracker.close("FAILED", f"training loss diverged in epoch {epoch}")
            reporter.report(metrics, None)
            if env.rank == 0:
                print(f"[{cfg.name}] stopped: {reason}", flush=True)
            if system is not None:
                system.stop()
            return metrics
        state.epoch = epoch
        save = last or epoch % cfg.checkpoint.every == 0
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint_dir = None
            rng = _gather(_rng_state(env)) if save else None  # every rank's own stream
            if save and env.rank == 0:
                _save(Path(tmp), cfg, distiller, optimizer, state, best_weights, rng)
                checkpoint_dir = tmp
            if tracker is not None:
                tracker.epoch(metrics, epoch)
                if save and attention is not None:
                    tracker.attention(attention, epoch, title=f"{cfg.teacher.model} -> {cfg.student.model}")
                if last:
                    tracker.final(cfg, distiller, best_weights)
                # Sent or spooled before the report, which may be this worker's last act: ASHA ends
                # a trial right after the report it stops it on, and a checkpoint's epochs must
                # outlive the worker that logged them.
                tracker.logger.checkpoint()
            if last and system is not None:  # its last sample sent before that report too
                system.stop()
            if env.rank == 0:  # before the report too: a trial's last line is printed
                _print_progress(cfg, metrics, epoch, seconds)
            reporter.report(metrics, checkpoint_dir)
        final = metrics
    if system is not None:
        system.stop()
    if tracker is not None:
        tracker.close("FINISHED")
    return final


def _skipped_images(loader, env: WorkerEnv, name: str, epoch: int) -> int | None:
    """How many images of the epoch could not be decoded, across ranks (each stood in for by another of
    its batch: ``semckd_ray.data.imagefolder``); rank 0 names them. None for data held in memory."""
    if not hasattr(loader, "skipped_last_epoch"):
        return None
    files = [path for rank_files in _gather(list(loader.skipped_last_epoch)) for path in rank_files]
    if files and env.rank == 0:
        shown = ", ".join(files[:_MAX_NAMED_FILES]) + (f" and {len(files) - _MAX_NAMED_FILES} more"
                                                       if len(files) > _MAX_NAMED_FILES else "")
        print(f"[{name}] epoch {epoch}: {len(files)} image(s) could not be decoded and were replaced by others "
              f"of their batch: {shown}; remove or re-extract them", flush=True)
    return len(files)


def train_step(model, teacher, optimizer, x: Tensor, y: Tensor, index: Tensor | None, device: torch.device,
               amp: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """One SGD step on one batch: teacher forward without gradients, distiller forward and backward, update.

    The whole of an iteration's math, shared by ``_train_epoch`` and ``bench/step.py``.
    """
    teacher_out = None
    if teacher is not None:
        with torch.no_grad(), _autocast(device, amp):
            teacher_out = teacher(x)
    with _autocast(device, amp):
        logits, losses = model(x, y, teacher_out, index)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    optimizer.step()
    return logits, losses


def _train_epoch(model, teacher, loader, optimizer, env: WorkerEnv, amp: bool, needs_index: bool,
                 before_step=None, graphed=None) -> dict[str, float]:
    """One pass over this worker's shard; loss sums stay on the device until the epoch ends.

    ``graphed`` (a ``semckd_ray.cuda_graphs.GraphedStep``) takes the steps instead of ``train_step``; the
    static tensors it returns are read below before its next replay overwrites them.
    """
    model.train()
    sums: dict[str, Tensor] = {}
    correct = torch.zeros(2, dtype=torch.float64, device=env.device)
    seen = steps = 0
    for x, y, index in loader:
        if before_step is not None:
            before_step()
        if graphed is not None:
            logits, losses = graphed(x, y, index if needs_index else None)
        else:
            logits, losses = train_step(model, teacher, optimizer, x, y, index if needs_index else None, env.device, amp)
        steps += 1
        n = y.numel()
        with torch.no_grad():
            for name, value in losses.items():
                term = value.detach().double() * n
                sums[name] = sums[name] + term if name in sums else term
            top5 = logits.detach().topk(min(5, logits.shape[1]), dim=1).indices.eq(y[:, None])
            correct += torch.stack([top5[:, 0].sum(), top5.any(dim=1).sum()]).double()
        seen += n
    names = sorted(sums)
    local = [float(sums[k]) for k in names] + correct.tolist() + [seen]
    totals = _all_reduce_sum(local, env.device)
    seen_all = totals[-1]
    out = {name: totals[i] / seen_all for i, name in enumerate(names)}
    out["top1"] = 100.0 * totals[-3] / seen_all
    out["top5"] = 100.0 * totals[-2] / seen_all
    out["images"] = seen_all
    out["steps"] = steps  # optimizer steps: every rank takes the same number
    return out


def _weights(distiller: Distiller, epoch: int, cfg: TrainConfig) -> dict[str, Any]:
    """The student in the official checkpoint format, with the method's modules and the config beside it."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": _saved_config(cfg),
        "epoch": epoch,
        "model": {k: v.detach().cpu().clone() for k, v in distiller.student.state_dict().items()},
        "method": {k: v.detach().cpu().clone() for k, v in distiller.method.state_dict().items()},
    }


def _saved_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config a checkpoint keeps, without credentials: the tracking URI's ``user:password@`` is
    dropped (whoever reads the checkpoint again brings their own, from their URI or MLflow's
    ``MLFLOW_TRACKING_*`` variables), and any secret of the environment becomes ``<redacted>``."""
    from semckd_ray.tracking import redact

    return redact(cfg.model_dump(mode="json"))


def _rng_state(env: WorkerEnv) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def _save(folder: Path, cfg: TrainConfig, distiller, optimizer, state: TrainingState,
          best_weights, rng: list[dict[str, Tensor]]) -> None:
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": _saved_config(cfg),
            "model": distiller.student.state_dict(),
            "method": distiller.method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "state": vars(state).copy(),
            "rng_ranks": rng,  # every rank's own stream
        },
        folder / STATE_FILE,
    )
    if best_weights is not None:
        torch.save(best_weights, folder / BEST_FILE)


def _restore(folder: Path, distiller, optimizer, env: WorkerEnv):
    blob = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    distiller.student.load_state_dict(blob["model"])
    distiller.method.load_state_dict(blob["method"])
    optimizer.load_state_dict(blob["optimizer"])
    ranks = blob.get("rng_ranks") or [blob["rng"]]  # "rng": rank 0's alone, in older checkpoints
    if len(ranks) == env.world_size:
        rng = ranks[env.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and env.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], env.device)
    else:  # resumed at another world size: a fresh stream per rank and epoch
        torch.manual_seed(worker_seed(blob["config"]["seed"], env.rank, blob["state"]["epoch"]))
    best = None
    if (folder / BEST_FILE).exists():
        best = torch.load(folder / BEST_FILE, map_location="cpu", weights_only=True)
    return TrainingState(**blob["state"]), best


def _print_progress(cfg: TrainConfig, m: dict[str, float], epoch: int, seconds: float) -> None:
    eta = (cfg.optim.epochs - epoch) * seconds
    val = f" val top1 {m['val_top1']:.2f}" if "val_top1" in m else ""
    print(
        f"[{cfg.name}] epoch {epoch}/{cfg.optim.epochs} loss {m['train_total']:.4f} "
        f"train top1 {m['train_top1']:.2f}{val} lr {m['lr']:.4g} "
        f"{m['images_per_s']:.0f} img/s {seconds:.1f}s ETA {eta / 60:.1f} min",
        flush=True,
    )


class _Tracker:
    """Rank 0's MLflow logging: per-epoch metrics and, at the end, the best and last checkpoints.

    A restarted worker logs into the same run; an epoch the run has already is not logged again.
    """

    def __init__(self, tracking_uri: str, run_id: str, spool: str | None):
        from semckd_ray.spool import SpooledLogger

        self.logger = SpooledLogger(tracking_uri, run_id, spool)
        # Artifacts wait here until MLflow (or the spool) has them.
        self.folder = Path(tempfile.mkdtemp(prefix="semckd-artifacts-"))

    def epoch(self, metrics: dict[str, float], epoch: int) -> None:
        self.logger.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=epoch)

    def attention(self, attention: Tensor, epoch: int, title: str) -> None:
        from semckd_ray.attention import plot_attention

        path = plot_attention(attention, self.folder / "attention" / f"epoch_{epoch:03d}.png",
                              epoch=epoch, title=title)
        self.logger.log_artifact(path, "attention")

    def final(self, cfg: TrainConfig, distiller, best_weights) -> None:
        from semckd_ray.tracking import sha256_file

        folder = self.folder
        last_path = folder / "last.pt"
        torch.save(_weights(distiller, cfg.optim.epochs, cfg), last_path)
        paths = {"last": last_path}
        if best_weights is not None:
            best_path = folder / "best_model.pt"
            torch.save(best_weights, best_path)
            paths["best"] = best_path
        for kind, path in paths.items():
            self.logger.log_artifact(path, "checkpoints")
            self.logger.set_tag(f"checkpoint.{kind}.sha256", sha256_file(path))
            self.logger.set_tag(f"checkpoint.{kind}.path", f"checkpoints/{path.name}")

    def close(self, status: str, reason: str | None = None) -> None:
        self.logger.end(status, reason)
        left = self.logger.close()
        shutil.rmtree(self.folder, ignore_errors=True)  # sent, or copied into the spool
        if left:
            log.warning("MLflow is still unreachable; %d logging calls wait in the spool, to be sent by the "
                        "driver, a resumed training or `python -m semckd_ray.sync`", left)


SYSTEM_METRICS_INTERVAL_S = 10.0  # seconds between samples; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
SYSTEM_METRICS_KEPT = 8640  # samples kept while MLflow is unreachable: a day's at 10 s, the oldest dropped first
SYSTEM_METRICS_STOP_WAIT_S = 5.0  # how long the end of a training waits for the last sample to be sent


class _SystemMetrics:
    """MLflow's system metrics of this worker's machine, logged into the training's run every 10 s.

    MLflow's ``SystemMetricsMonitor`` (``mlflow.system_metrics``) samples and names them, as
    ``mlflow.start_run(log_system_metrics=True)`` would: ``system/cpu_utilization_percentage``,
    ``system/system_memory_usage_megabytes``, ``system/system_memory_usage_percentage``, disk and
    network, and per GPU ``system/gpu_<i>_utilization_percentage``, ``..._memory_usage_megabytes``,
    ``..._memory_usage_percentage`` and power where NVML finds one (``pynvml``: the package
    nvidia-ml-py). Its variables apply: ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` (seconds, default
    ``SYSTEM_METRICS_INTERVAL_S``), ``MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING`` (samples averaged
    into one logged point, default 1). Steps count the run's points: a restarted or resumed worker goes
    on after the run's last one. On several nodes each node's first rank logs its own machine's, named
    ``system/<host>_<node id>/...``; on one node rank 0 logs them without the node part.

    MLflow's own loop is replaced (its sampling and naming are kept): MLflow's ends for good at the
    first request that fails, and its ``finish()`` waits for MLflow's retries. Here a training never
    waits and never fails for it: an outage costs one warning, the samples wait in memory (the last
    ``SYSTEM_METRICS_KEPT``) and are sent when the server answers again; ``stop`` waits at most
    ``SYSTEM_METRICS_STOP_WAIT_S``. They are best effort, not spooled: the samples a worker holds when
    it ends during an outage are lost. The monitor also stops when the run is no longer RUNNING (a
    training that ended without ``stop``: it failed).
    """

    _warned_missing = False  # psutil or pynvml missing: said once per process

    def __init__(self, tracking_uri: str, run_id: str, node_id: str | None = None, gpu: bool = False):
        import collections
        import threading

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        from semckd_ray.tracking import client

        # Without a GPU monitor MLflow says so at INFO, in every training: a GPU training is told below.
        quiet = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                                samples_before_logging=1, node_id=node_id, tracking_uri=tracking_uri)
        finally:
            quiet.setLevel(level)
        if gpu and not any(type(m).__name__ in ("GPUMonitor", "ROCMMonitor") for m in self.monitor.monitors):
            _SystemMetrics._note_missing("GPU metrics need NVML's Python bindings: pip install nvidia-ml-py")
        self.run_id = run_id
        self.prefix = SYSTEM_PREFIX + (f"{self.monitor.node_id}/" if self.monitor.node_id else "")
        self.interval = float(self.monitor.sampling_interval)
        self.samples = max(1, int(self.monitor.samples_before_logging))
        self._client = client(tracking_uri)
        self._pending = collections.deque(maxlen=SYSTEM_METRICS_KEPT)  # (step from 0, time ms, metrics)
        self._first_step: int | None = None  # the run's next step, asked once the server answers
        self._count = 0
        self._outage = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"system-metrics-{run_id[:8]}", daemon=True)

    @classmethod
    def start(cls, tracking_uri: str, run_id: str, nodes: list[str], rank: int, gpu: bool = False) -> _SystemMetrics | None:
        """Start sampling on the first rank of this machine (``nodes``: each rank's node); never raises."""
        import re

        if nodes[rank] in nodes[:rank]:
            return None  # another rank samples this machine
        node_id = re.sub(r"[^0-9A-Za-z_.-]", "_", nodes[rank]) if len(set(nodes)) > 1 else None
        try:
            monitor = cls(tracking_uri, run_id, node_id=node_id, gpu=gpu)
        except Exception as exc:  # psutil missing (an install without it), or a monitor that cannot start
            cls._note_missing(f"no system metrics for this training ({type(exc).__name__}: {exc})")
            return None
        monitor._thread.start()
        return monitor

    @classmethod
    def _note_missing(cls, message: str) -> None:
        if not cls._warned_missing:
            cls._warned_missing = True
            log.warning(message)

    def stop(self, timeout_s: float = SYSTEM_METRICS_STOP_WAIT_S) -> None:
        """Take the last sample, send what is kept (waiting at most ``timeout_s``) and stop."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        import psutil

        psutil.cpu_percent()  # CPU use is measured between two calls: each sample covers the interval before it
        while True:
            for _ in range(self.samples):
                stopping = self._stop.wait(self.interval)
                try:
                    self.monitor.collect_metrics()
                except Exception as exc:  # a sensor that fails once (NVML, a disk gone): the others go on
                    log.debug("system metrics: a sample failed: %s", exc)
                if stopping:
                    break
            try:
                metrics = self.monitor.aggregate_metrics()
            except Exception as exc:
                log.debug("system metrics: no point this time: %s", exc)
                metrics = {}
            for monitor in self.monitor.monitors:
                monitor.clear_metrics()
            if metrics:
                self._pending.append((self._count, int(time.time() * 1000), metrics))
                self._count += 1
            if not self._send() or stopping:
                return

    def _send(self) -> bool:
        """Send the kept points; False once the run has ended."""
        from mlflow.entities import Metric

        from semckd_ray.tracking import redact

        try:
            run = self._client.get_run(self.run_id)
            if self._first_step is None:
                steps = [m.step for m in getattr(run.data, "_metric_objs", []) if m.key.startswith(self.prefix)]
                self._first_step = max(steps) + 1 if steps else 0
            points = list(self._pending)
            batch = [Metric(self.prefix + key, float(value), ms, self._first_step + step)
                     for step, ms, metrics in points for key, value in metrics.items()]
            for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
                self._client.log_batch(self.run_id, metrics=batch[start:start + 1000])
            for _ in points:
                self._pending.popleft()
        except Exception as exc:  # any store or network error, after MLflow's own retries
            if not self._outage:
                self._outage = True
                log.warning("system metrics of run %s: MLflow is unreachable (%s: %s); sampling goes on, and the "
                            "samples are sent when it answers", self.run_id, type(exc).__name__, redact(str(exc))[:200])
            return True
        if self._outage:
            self._outage = False
            log.warning("system metrics of run %s: MLflow is reachable again", self.run_id)
        return run.info.status == "RUNNING"
