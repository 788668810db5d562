"""``python -m semckd_ray.evaluate --checkpoint CHECKPOINT [--split test|val]``: one checkpoint's accuracy.

``CHECKPOINT`` is a file (or a Ray checkpoint folder), ``runs:/RUN_ID[/ARTIFACT]`` or
``models:/NAME/VERSION`` (``models:/NAME@ALIAS``); ``--config FILE`` and ``--set key=value`` as in training.

Prints top-1 / top-5 (%) and the mean cross-entropy of a student or teacher checkpoint on the test
(default) or validation split of its run's dataset, computed in this process exactly as during
training (``semckd_ray.train_loop.evaluate``, same batches, device, layout, precision and threads).
The last line of the output is the same as JSON. The training config comes from ``--config FILE``,
else from the checkpoint file (``state.pt``, or a checkpoint written by a recent training), else
from the run's ``config.yaml`` artifact; ``--set key=value`` applies on top. The validation split
is the run's own one: held out of the training split with the config's ``data.split_seed`` (a
config saved before that key existed held it out with its ``seed``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from semckd_ray.cli import config_arguments, run_cli
from semckd_ray.config import TrainConfig, apply_overrides, get_dotted, load_train_config, parse_train_config, read_yaml
from semckd_ray.errors import UserError

CONFIG_ARTIFACT = "config.yaml"  # every run logs its resolved config there (trainer._log_config_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semckd_ray.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, metavar="CHECKPOINT",
                        help="a checkpoint file (or a Ray checkpoint folder holding state.pt), "
                             "runs:/<run_id>[/<artifact>], or models:/<name>/<version> (or @<alias>)")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="the split to evaluate (default: test)")
    config_arguments(parser, config_required=False)
    args = parser.parse_args(argv)

    result = evaluate_checkpoint(args.checkpoint, args.split, args.config, args.overrides)
    print(f"\n{result['checkpoint']}: {result['model']} on the {result['dataset']} {result['split']} split "
          f"({result['images']} images, {result['device']})")
    print(f"  top1  {result['top1']:.2f}\n  top5  {result['top5']:.2f}\n  loss  {result['loss']:.4f}")
    print(json.dumps(result))
    return 0


def evaluate_checkpoint(checkpoint: str, split: str, config_file: str | None = None,
                        overrides: list[str] = ()) -> dict[str, Any]:
    """The metrics of ``checkpoint`` on ``split``, with what they were computed on."""
    # A wrong --config / --set is refused first, in a fraction of a second: before torch is imported.
    cfg = load_train_config(config_file, overrides) if config_file else None

    import torch

    from semckd_ray.data import eval_loader, load_dataset
    from semckd_ray.train_loop import WorkerEnv, evaluate

    configured_uri = cfg.tracking.uri if cfg is not None else _configured_tracking_uri(overrides)
    blob, run_id, tracking_uri = _read_checkpoint(checkpoint, configured_uri)
    if cfg is None:
        cfg = _checkpoint_config(blob, run_id, tracking_uri, overrides, checkpoint)
    splits = load_dataset(cfg.data.dataset, cfg.data.root, download=cfg.data.download,
                          val_size=cfg.data.val_size, seed=cfg.data.split_seed)
    images = len(getattr(splits, split).labels)
    if images == 0:
        raise UserError(f"the {split} split of {cfg.data.dataset} is empty (data.val_size={cfg.data.val_size}); "
                        "evaluate --split test, or give the val split images with --set data.val_size=N "
                        "(only the run's own val_size and split_seed give the run's own val split)")
    # As run_worker evaluates: same device, layout, thread count, batches and precision.
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    channels_last = cfg.scaling.channels_last_enabled()
    model = _load_model(cfg, blob, splits.num_classes, checkpoint).to(
        device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    loader = eval_loader(splits, split, cfg.data.eval_batch_size, device=device, channels_last=channels_last,
                         keep_on_device=device.type == "cuda", pin_memory=device.type == "cuda")
    metrics = evaluate(model, loader, WorkerEnv(device=device), amp=cfg.scaling.bf16)
    return {**metrics, "split": split, "images": images, "checkpoint": checkpoint,
            "model": cfg.student.model, "dataset": cfg.data.dataset, "device": str(device)}


def _load_model(cfg, blob: Any, num_classes: int, checkpoint: str):
    from semckd_ray.models import create_model, load_checkpoint

    model = create_model(cfg.student.model, num_classes=num_classes)
    try:
        load_checkpoint(model, blob)
    except UserError as exc:
        raise UserError(f"--checkpoint {checkpoint!r} (for student.model={cfg.student.model!r}): {exc}") from None
    return model


def _read_checkpoint(checkpoint: str, configured_uri: str | None) -> tuple[Any, str | None, str | None]:
    """The checkpoint's contents, and the MLflow run and store it comes from (None for a local file).

    ``configured_uri``: the config's ``tracking.uri`` (None: the environment's or the default).
    """
    from semckd_ray.models.checkpoint import read_checkpoint
    from semckd_ray.teacher import resolve_teacher_file, teacher_run_id

    run_id = tracking_uri = None
    path = checkpoint
    if checkpoint.startswith(("runs:/", "models:/")):
        from semckd_ray import tracking

        tracking_uri = tracking.resolve_tracking_uri(configured_uri)
        tracking.check_reachable(tracking_uri)
        try:
            path = resolve_teacher_file(checkpoint, tracking_uri)
            run_id = teacher_run_id(checkpoint, tracking_uri)
        except UserError as exc:
            raise UserError(_as_checkpoint_error(str(exc))) from None
    elif Path(checkpoint).is_dir() and (Path(checkpoint) / "state.pt").is_file():
        path = str(Path(checkpoint) / "state.pt")  # a Ray checkpoint folder, as the training prints it
    return read_checkpoint(Path(path)), run_id, tracking_uri


def _configured_tracking_uri(overrides: list[str]) -> str | None:
    """``tracking.uri`` of ``--set``, if set there (else the environment's or the default)."""
    raw = apply_overrides({}, list(overrides))
    try:
        return get_dotted(raw, "tracking.uri")
    except KeyError:
        return None


def _as_checkpoint_error(message: str) -> str:
    # teacher.resolve_teacher_file words its errors for the teacher.checkpoint key.
    prefix = "teacher.checkpoint "
    return "--checkpoint " + message[len(prefix):] if message.startswith(prefix) else message


def _checkpoint_config(blob: Any, run_id: str | None, tracking_uri: str | None, overrides: list[str],
                       checkpoint: str) -> TrainConfig:
    """Without ``--config``: the checkpoint's own config, else its run's ``config.yaml``; ``--set`` on top."""
    if isinstance(blob, dict) and isinstance(blob.get("config"), dict):
        raw = blob["config"]
    elif run_id is not None:
        raw = _run_config(run_id, tracking_uri, checkpoint)
    else:
        raise UserError(f"--checkpoint {checkpoint!r} holds no training config (an official or hand-made "
                        "checkpoint): pass the config it was trained with, --config FILE")
    if isinstance(raw.get("data"), dict) and "split_seed" not in raw["data"]:
        # Saved before data.split_seed existed, when the run's seed chose its val split.
        raw = {**raw, "data": {**raw["data"], "split_seed": raw.get("seed", 0)}}
    return parse_train_config(apply_overrides(raw, list(overrides)))


def _run_config(run_id: str, tracking_uri: str, checkpoint: str) -> dict[str, Any]:
    import mlflow.artifacts

    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CONFIG_ARTIFACT,
                                                    tracking_uri=tracking_uri)
    except Exception:
        raise UserError(f"--checkpoint {checkpoint!r}: neither the checkpoint nor its run {run_id} holds the "
                        f"training config (no {CONFIG_ARTIFACT!r} artifact); pass it with --config FILE") from None
    return read_yaml(local)


if __name__ == "__main__":
    run_cli(main)
