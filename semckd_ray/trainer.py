"""One training on Ray Train: checks first, then a ``TorchTrainer`` whose workers run ``run_worker``.

Everything that can be wrong with the input (config, dataset, teacher checkpoint, tracking store,
cluster size) is checked here, in the driver, before a single worker is started.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semckd_ray import tracking
from semckd_ray.config import DataConfig, TrainConfig, flatten
from semckd_ray.errors import UserError
from semckd_ray.spool import spool_dir

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 600


@dataclass
class TrainResult:
    run_id: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    tracking_uri: str
    registered_model: str | None = None
    spool: str | None = None  # where what MLflow did not get waits for `python -m semckd_ray.sync`
    storage_root: str | None = None  # the storage path: checkpoints and spools


# ------------------------------------------------------------------------------------------
# Ray session


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it), else start one here.

    A cluster started here is Ray's single-machine mode: every Ray server listens on 127.0.0.1
    only, so nothing is exposed beyond this machine.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Read by Ray when it is imported and by the servers it starts: set it first.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Ray's own processes inherit this environment. With RAY_ADDRESS naming this cluster, Ray
    # Train's placement-group cleaner finds it even when other Ray instances run on the machine;
    # without it, a stopped trial's CPUs stay reserved and a sweep stalls.
    port = _free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    from ray._private import ray_constants

    # Ray read the variable when it was first imported, which may have been before it was set
    # here (semckd_ray.tune imports Ray first): read it again.
    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, True)
    # "local": a new instance, never one that `ray start` left running here, which ray.init would
    # join. The dashboard serves the State API that Ray Train's controller polls (and users watch).
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_capacity() -> dict[str, float]:
    import ray

    return {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


def check_resources(cfg: TrainConfig, capacity: dict[str, float], trials_at_once: int = 1,
                    *, nodes: list[dict[str, Any]] | None = None, growth=None) -> None:
    """Workers the cluster can never hold would wait forever: say so instead.

    ``nodes`` (the alive ones of ``ray.nodes()``): besides the totals, one worker must fit on one node.
    ``growth`` (``semckd_ray.capacity.cluster_growth()``): on a cluster that autoscales, a training
    that fits on the nodes the autoscaler may add waits for them; where the autoscaler did not tell
    Ray what it may add, a training that fits nowhere now is warned about, not refused.
    """
    from semckd_ray.capacity import SLACK, ClusterGrowth, node_totals, worker_resources
    from semckd_ray.nodes import can_host_worker

    growth = growth or ClusterGrowth("fixed")
    scaling = cfg.scaling
    workers = scaling.num_workers * trials_at_once
    need_cpu = workers * scaling.cpus_per_worker
    need_gpu = workers * scaling.gpus_per_worker if scaling.use_gpu else 0
    grown = growth.added_nodes()
    have_cpu = capacity.get("CPU", 0.0) + sum(r.get("CPU", 0.0) for r in grown)
    have_gpu = capacity.get("GPU", 0.0) + sum(r.get("GPU", 0.0) for r in grown)
    where = "the cluster has" if growth.kind == "fixed" else "the cluster can grow to"
    problems = []
    gpu_share = f" x scaling.gpus_per_worker={scaling.gpus_per_worker:g}" if scaling.gpus_per_worker != 1 else ""
    if need_cpu > have_cpu + SLACK:
        problems.append(f"{need_cpu:g} CPUs (scaling.num_workers={scaling.num_workers} x "
                        f"scaling.cpus_per_worker={scaling.cpus_per_worker:g}) but {where} {have_cpu:g}")
    if need_gpu > have_gpu + SLACK:
        problems.append(f"{need_gpu:g} GPUs (scaling.num_workers={scaling.num_workers}{gpu_share}) "
                        f"but {where} {have_gpu:g}")
    fits_nowhere = nodes and not any(can_host_worker(n, scaling) for n in nodes)
    if fits_nowhere and not growth.could_host(worker_resources(scaling)):
        first = ("GPU", "CPU") if scaling.use_gpu else ("CPU", "GPU")
        largest = max(node_totals(nodes) + grown, key=lambda r: [r.get(k, 0.0) for k in first])
        gpu = f" and {scaling.gpus_per_worker:g} GPU" if scaling.use_gpu else ""
        problems.append(f"{scaling.cpus_per_worker:g} CPUs{gpu} on one node for each worker "
                        f"(scaling.cpus_per_worker={scaling.cpus_per_worker:g}"
                        f"{', scaling.use_gpu=true' if gpu else ''}) but the largest node "
                        f"{'has' if growth.kind == 'fixed' else 'running or that the autoscaler can add has'} "
                        f"{largest.get('CPU', 0.0):g} CPUs and {largest.get('GPU', 0.0):g} GPUs")
    if problems and growth.kind == "unknown":
        # The autoscaler may add nodes Ray was not told about: the training waits for them.
        print(f"[semckd-ray] warning: the cluster holds no worker of this run now ({'; '.join(problems)}); "
              "it autoscales without telling Ray its node types, so the run waits for nodes it adds. "
              "If none come, stop it and lower scaling.num_workers or scaling.cpus_per_worker.", flush=True)
        return
    if problems:
        raise UserError(
            "the run needs " + "; and ".join(problems) + ". Lower scaling.num_workers or "
            "scaling.cpus_per_worker, set scaling.use_gpu=false, or add nodes to the cluster "
            "(large enough for one worker each)."
        )


def storage_path(cfg: TrainConfig) -> str:
    """Where Ray keeps checkpoints: on a multi-node cluster, object storage or a folder shared by every
    node, which ``semckd_ray.nodes.check_cluster`` checked before the run (or sweep) started."""
    import ray

    from semckd_ray.nodes import alive_nodes
    from semckd_ray.nodes import storage_path as resolve

    return resolve(cfg, alive_nodes() if ray.is_initialized() else [], check=False)


# ------------------------------------------------------------------------------------------
# Checks before any resource is taken


def preflight(cfg: TrainConfig) -> TrainConfig:
    """Resolve the tracking URI and check dataset, teacher and tracking store; return the config to run.

    The dataset is checked here only when this machine will be the cluster (no ``RAY_ADDRESS``:
    Ray starts here), downloading it if allowed; on an existing cluster the nodes that host
    workers check it themselves (``semckd_ray.nodes.check_cluster``), and this one may hold none.
    """
    import sys

    from semckd_ray.data import check_dataset, check_val_size, is_streamed, num_classes, prepare_dataset
    from semckd_ray.teacher import load_teacher

    cfg = cfg.model_copy(deep=True)
    cfg.tracking.uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_reachable(cfg.tracking.uri)
    check_val_size(cfg.data.dataset, cfg.data.val_size)
    ray_started = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    files_here = not os.environ.get("RAY_ADDRESS") and not ray_started
    if files_here:
        check = prepare_dataset if cfg.data.download else check_dataset
        check(cfg.data.dataset, cfg.data.root, cfg.data.download)
    # A folder tree's class count (the teacher's head) is known where its files are; elsewhere the
    # workers' load of the teacher is its check.
    if cfg.teacher is not None and (files_here or not is_streamed(cfg.data.dataset)):
        import torch

        classes = num_classes(cfg.data.dataset, cfg.data.root)
        load_teacher(cfg.teacher, classes, torch.device("cpu"), cfg.tracking.uri)
    return cfg


def start_run(cfg: TrainConfig, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Create the MLflow run a training logs into; the whole resolved config becomes its params."""
    mlflow_client = tracking.client(cfg.tracking.uri)
    experiment_id = tracking.get_or_create_experiment(mlflow_client, cfg.tracking.experiment)
    run_tags = {
        "git_commit": tracking.git_commit(),
        "dataset": cfg.data.dataset,
        "world_size": str(cfg.scaling.num_workers),
        "device": "gpu" if cfg.scaling.use_gpu else "cpu",
        "method": cfg.method.name,
        "student": cfg.student.model,
        "teacher": cfg.teacher.model if cfg.teacher else "",
        "teacher_checkpoint": cfg.teacher.checkpoint if cfg.teacher else "",
        "role": "teacher" if cfg.teacher is None else "student",
        "config_sha256": config_digest(cfg),
        **(tags or {}),
    }
    if cfg.teacher is not None:
        from semckd_ray.teacher import teacher_run_id

        run_tags["teacher_run_id"] = teacher_run_id(cfg.teacher.checkpoint, cfg.tracking.uri) or ""
    if parent_run_id:
        run_tags[tracking.PARENT_RUN_TAG] = parent_run_id
    run_name = cfg.tracking.run_name or f"{cfg.name}-{cfg.method.name}-{cfg.student.model}"
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=tracking.redact(run_tags))
    params = flatten(cfg.model_dump(mode="json"))
    params["method.beta_effective"] = cfg.beta()
    params["optim.lr_effective"] = cfg.peak_lr()
    params["optim.batch_size_per_worker"] = cfg.per_worker_batch()  # optim.batch_size is the global batch
    params["scaling.world_size"] = cfg.scaling.num_workers
    tracking.log_params(mlflow_client, run.info.run_id, params)
    _log_config_file(mlflow_client, run.info.run_id, cfg)
    return run.info.run_id


def student_head_size(checkpoint: dict[str, Any]) -> int:
    """The number of classes a checkpoint's model was trained for: the rows of its last matrix (the zoo's
    classifiers come last in their state dicts)."""
    matrices = [v for v in checkpoint["model"].values() if getattr(v, "ndim", 0) == 2]
    if not matrices:
        raise UserError("the checkpoint's model has no classifier matrix to count its classes from")
    return int(matrices[-1].shape[0])


def _log_config_file(mlflow_client, run_id: str, cfg: TrainConfig) -> None:
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(tracking.redact(cfg.model_dump(mode="json")), sort_keys=False))
        mlflow_client.log_artifact(run_id, str(path))


# ------------------------------------------------------------------------------------------
# The TorchTrainer


def _ray_worker_entry(config: dict[str, Any]) -> dict[str, float]:
    import logging

    from semckd_ray.train_loop import run_worker

    # Ray Train 2.60 logs every report at INFO ("Reporting training result N: TrainingReport(...)"),
    # a dump per epoch that our progress line says better. Its logger is named after its file, not
    # under "ray.train", so LoggingConfig's level misses it; its warnings stay.
    try:
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # another Ray: its own logging, as it is
        pass
    # MLflow draws a progress bar for every artifact it downloads (the teacher's checkpoint), which a
    # worker's captured stdout shows as a line of control characters; a user's choice stays.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Rank 0's final metrics come back as the Result's return_value.
    return run_worker(config["train"], RayReporter(), run_id=config["run_id"], tracking_uri=config["tracking_uri"],
                      spool=config["spool"], stream=config.get("stream"))


class RayReporter:
    """The loop's reporter inside a Ray Train worker."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = f"epoch_{int(metrics['epoch']):05d}" if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def latest_checkpoint(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return checkpoint.to_directory() if checkpoint is not None else None

    def node(self) -> str:
        """This worker's machine and Ray node: ``hostname/node id`` (its first 12 hex digits)."""
        import socket

        import ray

        return f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"


def scaling_config(cfg: TrainConfig):
    """The workers Ray Train asks for: ``num_workers`` of ``cpus_per_worker`` CPUs and, on GPU,
    ``gpus_per_worker`` of a GPU each (a share below 1 packs several one-worker trials on a GPU)."""
    import ray.train

    from semckd_ray.capacity import worker_resources

    return ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                   resources_per_worker=worker_resources(cfg.scaling))


def stream_datasets(cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """For a streamed dataset: its Ray Datasets, what the workers must know of them, and the DataConfig.

    The folder tree is listed here, once per training (no image is read); the workers get the
    split sizes, the class count and the training labels (by object reference: 10 MB for ImageNet),
    and their images from Ray Data's shards of ``datasets``.
    """
    import ray

    from semckd_ray.data.imagefolder import build_datasets, data_config, list_image_folder

    data = cfg.data
    splits = list_image_folder(data.root, val_size=data.val_size, split_seed=data.split_seed,
                               train_fraction=data.train_fraction, label_noise=data.label_noise)
    workers = cfg.scaling.num_workers
    if cfg.optim.batch_size > len(splits.train) // workers * workers:
        raise UserError(f"optim.batch_size={cfg.optim.batch_size} (the global batch) is larger than the training "
                        f"split of {data.root} ({len(splits.train)} images once data.val_size are held out): "
                        f"allowed up to {len(splits.train) // workers * workers}")
    datasets = build_datasets(splits, image_size=data.input_size(), crop_scale=tuple(data.crop_scale),
                              eval_resize=data.eval_size(), seed=cfg.seed)
    info = {"num_classes": splits.num_classes,
            "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
            "train_labels": ray.put(splits.train.labels)}
    return datasets, info, data_config(data.decode_cpus)


def build_trainer(cfg: TrainConfig, run_id: str, *, train_run_name: str, callbacks: list | None = None,
                  root: str | None = None):
    """The run's TorchTrainer; ``root``: the storage path, as ``storage_path(cfg)`` resolves it."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from semckd_ray.data import is_streamed

    root = root or storage_path(cfg)
    loop_config = {"train": cfg.model_dump(mode="json"), "run_id": run_id,
                   "tracking_uri": cfg.tracking.uri, "spool": spool_dir(root, run_id)}
    streamed = {}
    if is_streamed(cfg.data.dataset):
        datasets, loop_config["stream"], dataset_config = stream_datasets(cfg)
        streamed = {"datasets": datasets, "dataset_config": dataset_config}
    return TorchTrainer(
        _ray_worker_entry,
        train_loop_config=loop_config,
        **streamed,
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=train_run_name,
            storage_path=root,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            callbacks=callbacks,
            # Our own per-epoch progress lines say what matters; Ray's per-report lines repeat them.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def fit(cfg: TrainConfig, *, run_id: str, train_run_name: str | None = None, callbacks: list | None = None) -> TrainResult:
    """Run one training that logs into the MLflow run ``run_id`` and close that run."""
    # Ray's default of 60 s for a worker group to start is too short on a small, busy machine,
    # where importing torch in a fresh worker alone can take that long. Ray Train forwards this
    # variable from here to its controller.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(WORKER_START_TIMEOUT_S))
    # Train's print patch hands a worker's print to its logger and, since a Ray worker's stdout is
    # wrapped, to stdout as well: every progress line reached the terminal twice. Forwarded too.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    root = storage_path(cfg)
    trainer = build_trainer(cfg, run_id, train_run_name=train_run_name or f"{cfg.name}-{run_id}", callbacks=callbacks,
                            root=root)
    try:
        result = trainer.fit()
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        finish_run(cfg, run_id, status, reason=f"{type(exc).__name__}: {exc}", root=root)
        raise
    # The last epoch's metrics: Result.metrics are those of the latest checkpoint, and the epoch
    # a diverged run stops in has none.
    metrics = dict(result.return_value or result.metrics or {})
    if metrics.get("diverged"):
        spooled = finish_run(cfg, run_id, "FAILED", reason=f"training loss diverged in epoch {metrics.get('epoch')}",
                             root=root)
    else:
        spooled = finish_run(cfg, run_id, "FINISHED", root=root)
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return TrainResult(run_id=run_id, metrics=metrics, checkpoint_path=checkpoint,
                       tracking_uri=cfg.tracking.uri, spool=spooled, storage_root=root)


def finish_run(cfg: TrainConfig, run_id: str, status: str, reason: str | None = None, *,
               root: str | None = None) -> str | None:
    """Close the run ``status``, after sending what its workers spooled; returns the spool folder when
    MLflow cannot be reached even with its own retries, and that folder then holds the close too.

    ``root``: the storage path, as ``storage_path(cfg)`` resolves it."""
    from semckd_ray import storage
    from semckd_ray.spool import send_spool, spool_close

    mlflow_client = tracking.client(cfg.tracking.uri)
    root = root or storage_path(cfg)
    folder = spool_dir(root, run_id)
    try:
        if storage.exists(folder):
            send_spool(mlflow_client, run_id, folder)
        close_run(mlflow_client, run_id, status, reason)
        return None
    except Exception as exc:  # the server is down at the very end: the training's result still stands
        spool_close(folder, status, reason)
        log.warning("MLflow is unreachable (%s): run %s is kept in %s, to be sent and closed as %s by "
                    "'python -m semckd_ray.sync --storage %s'", tracking.redact(str(exc))[:300], run_id,
                    tracking.redact(folder), status, tracking.redact(root))
        return folder


REGISTER_DIR = "mlflow-register"  # <storage path>/mlflow-register/<run id>.json: registrations MLflow missed
EXAMPLE_BATCH = 2  # images in a registered model's input example (above 1: torch.export keeps the batch dynamic)


def register_model(cfg: TrainConfig, run_id: str, *, root: str | None = None) -> str | None:
    """Log the run's student as an MLflow model and register it as a version of ``tracking.register_model``.

    Returns ``models:/NAME/VERSION``, or None when nothing is registered now (no name configured,
    the run failed, or MLflow cannot take it: then it is deferred, see below). The model is built
    by ``log_student_model``: ``mlflow.pytorch.load_model("models:/NAME/VERSION")`` gives the student
    of the run's best checkpoint, its logits only, in eval mode.

    It is logged from the driver, after ``fit``, not from rank 0 of the workers: the model is built
    from the checkpoint file the run holds (``checkpoints/best_model.pt``, downloaded and checked
    against its sha256 tag), so it exists only once that file reached MLflow, which the driver knows
    (it sent the spool, then closed the run); ``mlflow.pytorch.log_model`` writes a model entity and
    its files synchronously, which the workers' spool (metrics, params, tags and run artifacts, sent
    in the background) cannot queue; and a worker's last act must stay quick, since Tune may end its
    process right after the last report. The cost is one download of the best checkpoint (the
    student and the method's modules) on the driver.

    MLflow unreachable at the end (the run's spool still waits on the storage path ``root``, or the
    server fails now): the registration is recorded in ``<root>/mlflow-register/<run id>.json`` and a
    warning says so; ``register_pending`` (which ``python -m semckd_ray.sync`` runs after sending
    the spools) registers it once the server answers. Any other failure (the server answers, but the
    model could not be made or taken) is a warning: the training's result stands.
    """
    name = cfg.tracking.register_model
    if not name:
        return None
    from semckd_ray import storage
    from semckd_ray.nodes import storage_path as resolve

    root = root or resolve(cfg, [], check=False)
    if storage.exists(spool_dir(root, run_id)):  # its checkpoints are not on the server yet
        _defer_registration(root, run_id, name, cfg.tracking.uri, "the run's last logging calls wait in its spool")
        return None
    try:
        return log_student_model(cfg.tracking.uri, run_id, name)
    except UserError as exc:
        log.warning("the model of run %s is not registered as %r: %s", run_id, name, exc)
        return None
    except Exception as exc:
        why = f"{type(exc).__name__}: {tracking.redact(str(exc))[:300]}"
        try:
            tracking.check_reachable(cfg.tracking.uri)
        except Exception:  # the server is down: sync registers it later
            _defer_registration(root, run_id, name, cfg.tracking.uri, why)
            return None
        log.warning("the model of run %s is not registered as %r (%s); its checkpoints are in the run", run_id,
                    name, why)
        return None


def log_student_model(tracking_uri: str, run_id: str, name: str) -> str:
    """Log the student of run ``run_id``'s best checkpoint as an MLflow model, register it under ``name``,
    and return ``models:/NAME/VERSION`` (the version this run has already, if it has one).

    The model (``mlflow.pytorch.log_model``, a LoggedModel of the run's experiment, linked to the run
    at the checkpoint's epoch) is a ``teacher.StudentLogits`` around the student with the weights as
    trained (BatchNorm not folded), exported in eval mode with ``torch.export`` (MLflow's ``pt2``
    format): loading it needs torch and MLflow only, neither this package nor pickle, and its
    logits equal the student's. Its signature is a float32 tensor ``[-1, 3, S, S]`` of normalised
    images in (S the data's image side: 32 in memory, ``data.image_size`` streamed), ``[-1, classes]``
    logits out; its input example is a seeded batch of
    ``EXAMPLE_BATCH`` standard-normal images of that shape (the driver may not hold the dataset).
    The loaded module is the exported eval-mode graph (BatchNorm on running statistics): torch 2.14
    refuses ``.eval()``/``.train()`` on it, and it needs neither. SemCKD's modules and the training
    state stay in the run's ``checkpoints`` artifacts; the version's tags ``checkpoint`` and
    ``checkpoint_sha256`` name the file it was built from, which a teacher given as this version loads.
    Raises ``UserError`` for a run without a best checkpoint, MLflow's errors as they come.
    """
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from semckd_ray.data import IN_MEMORY_IMAGE_SIZE, is_streamed, num_classes
    from semckd_ray.models import create_model, load_checkpoint
    from semckd_ray.models.checkpoint import read_checkpoint
    from semckd_ray.teacher import (VERSION_CHECKPOINT_SHA_TAG, VERSION_CHECKPOINT_TAG, StudentLogits,
                                    _download_run_checkpoint)

    mlflow_client = tracking.client(tracking_uri)
    done = mlflow_client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if done:  # registered already (a retry after the version was made): once per run
        return f"models:/{name}/{max(int(v.version) for v in done)}"
    run = mlflow_client.get_run(run_id)
    if run.info.status == "FAILED":
        raise UserError(f"run {run_id} failed ({run.data.tags.get('failure_reason', 'no reason logged')})")
    local = _download_run_checkpoint(run_id, None, tracking_uri, f"runs:/{run_id}")  # the best, sha-checked
    artifact = run.data.tags["checkpoint.best.path"]
    blob = read_checkpoint(Path(local))
    config = blob.get("config") or {}
    params = run.data.params
    student_name = (config.get("student") or {}).get("model") or params["student.model"]
    data = config.get("data") or {}
    dataset = data.get("dataset") or params["data.dataset"]
    # A streamed dataset's classes are its folders': the student's head has as many outputs.
    classes = student_head_size(blob) if is_streamed(dataset) else num_classes(dataset)
    student = create_model(student_name, num_classes=classes)
    load_checkpoint(student, blob)
    model = StudentLogits(student).eval()
    size = DataConfig.model_validate(data).input_size() if data else IN_MEMORY_IMAGE_SIZE
    example = np.random.default_rng(0).standard_normal((EXAMPLE_BATCH, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    epoch = int(blob.get("epoch") or 0)
    source = {VERSION_CHECKPOINT_TAG: artifact, VERSION_CHECKPOINT_SHA_TAG: run.data.tags.get("checkpoint.best.sha256", "")}
    logged = mlflow_client.create_logged_model(
        run.info.experiment_id, name="model", source_run_id=run_id, model_type="image-classifier",
        params={"student.model": student_name, "data.dataset": dataset, "num_classes": str(classes),
                "checkpoint.epoch": str(epoch)},
        tags=source,
    )
    # log_model, and the registry when it reads the model a version is made of, resolve the store from
    # MLflow's global tracking URI: this run's, meanwhile.
    with _use_tracking_uri(tracking_uri):
        info = mlflow.pytorch.log_model(
            model, name="model", model_id=logged.model_id, run_id=run_id, step=epoch, signature=signature,
            input_example=example, serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],  # no local tag (+cu130)
        )
        try:
            mlflow_client.create_registered_model(name)
        except Exception:
            pass  # it exists already: add a version
        version = mlflow_client.create_model_version(
            name, source=info.model_uri, run_id=run_id, model_id=info.model_id, tags=source,
            description=f"{student_name} on {dataset}, the best checkpoint of run {run_id} (epoch {epoch})",
        )
    uri = f"models:/{name}/{version.version}"
    mlflow_client.set_tag(run_id, "registered_model", uri)
    return uri


def _defer_registration(root: str, run_id: str, name: str, tracking_uri: str, why: str) -> None:
    import json

    from semckd_ray import storage

    storage.write_text(storage.join(root, REGISTER_DIR, f"{run_id}.json"),
                       json.dumps({"run_id": run_id, "name": name, "tracking_uri": tracking.redact(tracking_uri)}))
    log.warning("MLflow cannot take the model of run %s now (%s): it is registered as %r by "
                "'python -m semckd_ray.sync --storage %s' once the server answers", run_id, why, name,
                tracking.redact(root))


def register_pending(storage_root: str, tracking_uri: str) -> list[tuple[str, str, str | None]]:
    """Register the models ``register_model`` deferred under ``storage_root``; returns (run id, name,
    ``models:/NAME/VERSION`` or None where it must wait). Run after the spools are sent: a run whose
    spool is still there keeps waiting. A registration that can never succeed (the run failed, has no
    best checkpoint) is dropped with a warning; one that fails otherwise waits for the next try."""
    import json

    from semckd_ray import storage

    folder = storage.join(storage_root, REGISTER_DIR)
    done = []
    for entry in sorted(storage.list_dir(folder)):
        if not entry.endswith(".json"):
            continue
        path = storage.join(folder, entry)
        info = json.loads(storage.read_text(path))
        run_id, name = info["run_id"], info["name"]
        uri = None
        if not storage.exists(spool_dir(storage_root, run_id)):
            try:
                uri = log_student_model(tracking_uri, run_id, name)
            except UserError as exc:
                log.warning("the model of run %s is not registered as %r: %s", run_id, name, exc)
                storage.delete(path)
            except Exception as exc:
                log.warning("the model of run %s is still not registered as %r (%s: %s); run this again",
                            run_id, name, type(exc).__name__, tracking.redact(str(exc))[:300])
            else:
                storage.delete(path)
        done.append((run_id, name, uri))
    return done


def close_run(mlflow_client, run_id: str, status: str, reason: str | None = None) -> None:
    """End the run with ``status``; its ``failure_reason`` tag says why it failed, and only if it did.

    A run that did not fail (a retry or resume that ended well, a trial Tune tore down after its
    last epoch) loses a reason an earlier attempt wrote.
    """
    if reason:
        mlflow_client.set_tag(run_id, "failure_reason", tracking.redact(reason)[:5000])
    elif status != "FAILED" and "failure_reason" in mlflow_client.get_run(run_id).data.tags:
        mlflow_client.delete_tag(run_id, "failure_reason")
    mlflow_client.set_terminated(run_id, status=status)


def _terminate(mlflow_client, run_id: str, status: str, reason: str | None = None) -> None:
    try:
        close_run(mlflow_client, run_id, status, reason)
    except Exception as exc:  # tracking down at the very end: the training result still stands
        log.warning("could not mark MLflow run %s as %s: %s", run_id, status, exc)


def config_digest(cfg: TrainConfig) -> str:
    """Identifies what a training computes (tracking settings aside): equal digests, same training."""
    import hashlib
    import json

    # Where things are stored (tracking, the dataset's folder) and how fast the data is decoded do not
    # change what is computed.
    content = cfg.model_dump(mode="json", exclude={"tracking": True, "data": {"root", "download", "decode_cpus",
                                                                             "prefetch_batches"}})
    # Keys added since runs were first logged count only when set: at their defaults (the whole
    # training split, clean labels, no streaming) a config's digest is the one its earlier finished runs carry.
    for key, default in (("train_fraction", 1.0), ("label_noise", 0.0), ("image_size", None),
                         ("crop_scale", [0.08, 1.0]), ("eval_resize", None)):
        if content["data"].get(key) == default:
            del content["data"][key]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def find_finished_run(cfg: TrainConfig, digest: str) -> str | None:
    """The newest finished run of the same config in the experiment, if any."""
    mlflow_client = tracking.client(tracking.resolve_tracking_uri(cfg.tracking.uri))
    experiment = mlflow_client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return None
    runs = mlflow_client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.config_sha256 = '{digest}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


TRAIN_FILE = "semckd_train.json"  # in a training's folder on the storage path: what --resume needs


def train(cfg: TrainConfig, resume: str | None = None) -> TrainResult:
    """Everything ``python -m semckd_ray.train`` does: check, start Ray, run, close the run.

    ``resume``: ``"latest"`` or a training's folder on the storage path: continue that interrupted
    training in its own MLflow run from its latest checkpoint, instead of starting a new one.
    """
    from semckd_ray.nodes import alive_nodes, check_cluster
    from semckd_ray.teacher import ensure_teacher

    cfg = cfg.model_copy(deep=True)
    cfg.tracking.uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_reachable(cfg.tracking.uri)
    cfg = preflight(ensure_teacher(cfg))
    resumed = find_training(cfg, resume) if resume else None  # before Ray starts: a wrong path is refused
    ensure_ray()
    from semckd_ray.capacity import cluster_growth

    check_resources(cfg, cluster_capacity(), nodes=alive_nodes(), growth=cluster_growth())
    root = check_cluster(cfg)  # tracking, storage and data as every node sees them, before the run exists
    if resumed is not None:
        run_id, name = resumed
        tracking.client(cfg.tracking.uri).update_run(run_id, status="RUNNING")
        print(f"[semckd-ray] resuming run {run_id} ({name})", flush=True)
    else:
        import json
        import time

        from semckd_ray import storage

        run_id = start_run(cfg)
        name = f"{cfg.name}-{run_id}"
        storage.write_text(storage.join(root, name, TRAIN_FILE), json.dumps(
            {"run_id": run_id, "name": name, "config_sha256": config_digest(cfg), "started": time.time()}))
    result = fit(cfg, run_id=run_id, train_run_name=name)
    # MLflow down at the end (the run's spool waits): deferred until `sync`, which says so.
    result.registered_model = register_model(cfg, run_id, root=result.storage_root)
    return result


def find_training(cfg: TrainConfig, resume: str) -> tuple[str, str]:
    """``(run id, Ray Train run name)`` of the training ``--resume`` continues; a clear error otherwise.

    ``resume`` is ``"latest"`` (the newest unfinished training of this config under the storage path)
    or the training's folder. Its config must be this one: a resumed run computes what it started.
    """
    import json

    from semckd_ray import storage
    from semckd_ray.nodes import storage_path as resolve

    root = resolve(cfg, [], check=False)
    if resume != "latest":
        folders = [resume]
    else:
        folders = [storage.join(root, name) for name in storage.list_dir(root) if name.startswith(f"{cfg.name}-")]
    found = []
    for folder in folders:
        text = storage.read_text(storage.join(folder, TRAIN_FILE))
        if text:
            found.append(json.loads(text))
    if resume != "latest" and not found:
        raise UserError(f"--resume {tracking.redact(resume)}: no training there (missing {TRAIN_FILE}); pass the "
                        f"folder of a training under the storage path, e.g. {tracking.redact(root)}/{cfg.name}-RUNID")
    mlflow_client = tracking.client(cfg.tracking.uri)
    digest = config_digest(cfg)
    for info in sorted(found, key=lambda i: i["started"], reverse=True):
        try:
            status = mlflow_client.get_run(info["run_id"]).info.status
        except Exception:
            continue  # its run is in another tracking store
        if status == "FINISHED":
            if resume != "latest":
                raise UserError(f"--resume {tracking.redact(resume)}: run {info['run_id']} has finished already")
            continue
        if info["config_sha256"] != digest:
            raise UserError(f"--resume: run {info['run_id']} ({info['name']}) trained another config; resume it with "
                            "the config file and --set values it started with, or start a new training")
        return info["run_id"], info["name"]
    raise UserError(f"--resume: no unfinished training of {cfg.name!r} under {tracking.redact(root)} in the tracking "
                    f"store {tracking.redact(cfg.tracking.uri)}; pass its folder: --resume PATH")
