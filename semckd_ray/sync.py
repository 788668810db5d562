"""``python -m semckd_ray.sync --storage PATH``: send to MLflow what trainings kept while it was down.

Every run's spool under the storage path (``<storage>/mlflow-spool/<run id>/``, see
``semckd_ray.spool``) is sent in order; a run whose training had ended is closed with the status it
ended in (FINISHED, FAILED, KILLED), and a run whose training has not ended (it may still train, or
wait for ``--resume``) keeps its status. A spool is removed once sent; one that cannot be sent stays
for the next try. Then each model ``tracking.register_model`` could not register while MLflow was down
(``<storage>/mlflow-register/<run id>.json``) is registered. ``--config FILE`` takes the storage path
and tracking URI from an experiment file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from semckd_ray import tracking
from semckd_ray.cli import run_cli
from semckd_ray.errors import UserError


def sync(storage_root: str, tracking_uri: str) -> list[tuple[str, int, str]]:
    """Send every spool under ``storage_root``; returns (run id, calls sent, status it was closed with)."""
    from semckd_ray.spool import send_spool, spools

    mlflow_client = tracking.client(tracking_uri)
    done = []
    for run_id, folder in spools(storage_root).items():
        try:
            mlflow_client.get_run(run_id)
        except Exception as exc:
            raise UserError(f"spool {tracking.redact(folder)} is for run {run_id}, which the tracking store "
                            f"{tracking.redact(tracking_uri)} does not have ({type(exc).__name__}); point "
                            "--tracking-uri at the store the training logged into") from None
        sent, ended = send_spool(mlflow_client, run_id, folder)
        done.append((run_id, sent, ended["status"] if ended else "unchanged (its training has not ended)"))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semckd_ray.sync", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="experiment YAML file: its tracking.storage_path and tracking.uri")
    parser.add_argument("--storage", help="the storage path the trainings wrote to (tracking.storage_path; "
                                          "default: ./ray_results)")
    parser.add_argument("--tracking-uri", help="the MLflow tracking URI (default: the config's, else "
                                               "$MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    args = parser.parse_args(argv)
    storage_root, uri = args.storage, args.tracking_uri
    if args.config:
        from semckd_ray.config import load_train_config

        cfg = load_train_config(args.config)
        storage_root = storage_root or cfg.tracking.storage_path
        uri = uri or cfg.tracking.uri
    from semckd_ray import storage
    from semckd_ray.nodes import RAY_RESULTS_DIR

    storage_root = storage_root or str(Path.cwd() / RAY_RESULTS_DIR)
    uri = tracking.resolve_tracking_uri(uri)
    tracking.check_reachable(uri)
    if not storage.is_uri(storage_root) and not Path(storage_root.removeprefix("file://")).is_dir():
        raise UserError(f"--storage {storage_root}: no such folder; pass the tracking.storage_path the "
                        "trainings wrote to")
    done = sync(storage_root, uri)
    # Then the models that waited for their runs' checkpoints to reach MLflow (tracking.register_model).
    from semckd_ray.trainer import register_pending

    registered = register_pending(storage_root, uri)
    if not done and not registered:
        print(f"nothing to send: no spool under {tracking.redact(storage_root)}")
    for run_id, sent, status in done:
        print(f"run {run_id}: sent {sent} logging calls; status {status}")
    for run_id, name, model in registered:
        print(f"run {run_id}: registered as {model}" if model else
              f"run {run_id}: its model {name!r} is not registered yet; run this again")
    return 0


if __name__ == "__main__":
    run_cli(main)
