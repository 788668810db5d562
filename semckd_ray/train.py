"""``python -m semckd_ray.train --config FILE [--set key=value ...]``: one training on Ray Train.

An experiment file's ``search`` section, if any, is ignored: the training runs once at its base values.
"""

from __future__ import annotations

import argparse

from semckd_ray.cli import config_arguments, run_cli
from semckd_ray.config import load_train_config
from semckd_ray.tracking import browse_hint, redact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semckd_ray.train", description=__doc__.splitlines()[0])
    config_arguments(parser, config_required=True)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue an interrupted training in its MLflow run from its latest checkpoint: the "
                             "latest of this config, or the training's folder PATH on the storage path")
    args = parser.parse_args(argv)
    cfg = load_train_config(args.config, args.overrides)

    from semckd_ray.trainer import train

    result = train(cfg, resume=args.resume)
    m = result.metrics
    print(f"\nrun {result.run_id} finished after epoch {m.get('epoch')}:")
    for key in ("best_val_top1", "best_epoch", "test_top1_at_best_val", "test_top1_last"):
        if key in m:
            print(f"  {key:24s} {m[key]:.2f}")
    print(f"  checkpoint               {result.checkpoint_path}")
    print(f"  use as a teacher         teacher.checkpoint=runs:/{result.run_id}")
    if result.registered_model:
        print(f"  registered               {result.registered_model}")
    if result.spool:
        print(f"\nMLflow could not be reached at the end: what it is missing, and the run's close, wait in\n"
              f"  {redact(result.spool)}\nsend them once the server is back with\n"
              f"  python -m semckd_ray.sync --storage {redact(result.storage_root)}")
    print(f"\nbrowse it: {browse_hint(result.tracking_uri)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
