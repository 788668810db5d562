"""``python -m semckd_ray.reproduce --config FILE [--set key=value ...] [--resume [PATH]] [--out DIR]``:
a paper's table in one command.

The file names the teacher->student pairs, the methods with their settings (the official loss
weights unless given), the seeds, the training recipe every run shares and, optionally, values of
further keys to cross with them (``vary``: the few-shot fractions, the noise rates). The command

1. trains each distinct teacher once, from its experiment file, or reuses its finished run
   (``teacher.ensure_teacher``: found by the digest of its config); with ``--resume`` a teacher
   whose training was interrupted continues from its last checkpoint;
2. runs every (pair, method, seed[, vary value]) as one Ray Tune grid (``tune.sweep`` with
   ``cells``): as many runs at once as the cluster holds (fractional GPUs where
   ``scaling.gpus_per_worker`` asks for them), the rest queued (on an autoscaling cluster, the
   demand that makes it add nodes), resumable with ``--resume`` like any sweep (a finished run is
   never trained again). A method without a teacher (``vanilla``, the student row) is one run per
   student and seed, shared by every pair with that student. A grid's progress is printed as runs
   start and end (``grid_progress``);
3. ends with the report of the experiment (``report.make_report``): the table with ours beside the
   paper's, mean +- std over the seeds, ARI, printed and logged to MLflow under ``report/`` of the
   grid's parent run.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from semckd_ray import tracking
from semckd_ray.cli import config_arguments, run_cli
from semckd_ray.config import MAX_SEED, _Section, apply_overrides, format_validation_error, read_yaml
from semckd_ray.errors import UserError

# Keys every run of the grid shares sit under ``recipe``; these are the grid's, set per run.
GRID_KEYS = ("name", "seed", "teacher", "student", "method", "search")
PAIR_ARROW = "->"


class TeacherSource(_Section):
    """Where a pair's teacher comes from: an experiment file to train it (once), or a checkpoint."""

    train: str | None = None  # a teacher experiment file, relative to this file
    checkpoint: str | None = None  # a file, runs:/ID or models:/NAME/VERSION

    @model_validator(mode="after")
    def _one(self) -> TeacherSource:
        if (self.train is None) == (self.checkpoint is None):
            raise ValueError("give the teacher's 'train' (an experiment file) or its 'checkpoint', one of the two")
        return self


class ReproduceConfig(_Section):
    name: str = Field(min_length=1)  # the grid's name: its sweep folder and MLflow parent run
    recipe: dict[str, Any] = Field(default_factory=dict)  # the training config every run shares
    teachers: dict[str, TeacherSource] = Field(default_factory=dict)  # teacher model -> its source
    pairs: list[str] = Field(min_length=1)  # "teacher->student", model names
    methods: dict[str, dict[str, Any]] = Field(min_length=1)  # method name -> its method.* settings
    seeds: list[int] = Field(min_length=1)
    vary: dict[str, list[Any]] = Field(default_factory=dict)  # more dotted keys, each value crossed with the grid
    max_concurrent: int | None = Field(default=None, ge=1)  # a cap; default: as many as the cluster holds

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, pairs: list[str]) -> list[str]:
        out = []
        for pair in pairs:
            teacher, arrow, student = (part.strip() for part in str(pair).partition(PAIR_ARROW))
            if not arrow or not teacher or not student:
                raise ValueError(f"a pair is 'teacher{PAIR_ARROW}student' (e.g. resnet32x4{PAIR_ARROW}resnet8x4), "
                                 f"got {pair!r}")
            out.append(f"{teacher}{PAIR_ARROW}{student}")
        if len(set(out)) != len(out):
            raise ValueError(f"a pair is listed twice: {sorted(p for p in out if out.count(p) > 1)[0]}")
        return out

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        for seed in seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                raise ValueError(f"a seed is an integer from 0 to {MAX_SEED}, got {seed!r}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"a seed is listed twice: {seeds}")
        return seeds

    @field_validator("vary")
    @classmethod
    def _vary(cls, vary: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in vary.items():
            if key.split(".")[0] in GRID_KEYS:
                raise ValueError(f"{key!r} is set by the grid itself (pairs, methods, seeds), not by 'vary'")
            if not values:
                raise ValueError(f"{key!r} needs at least one value")
        return vary

    @model_validator(mode="after")
    def _grid(self) -> ReproduceConfig:
        from semckd_ray.distill.catalog import list_methods

        misplaced = [key for key in self.recipe if key in GRID_KEYS]
        if misplaced:
            raise ValueError(f"recipe.{misplaced[0]} is set per run by the grid: name the runs with 'name', the "
                             "models with 'pairs', the methods with 'methods', the seeds with 'seeds'")
        for method, settings in self.methods.items():
            if method not in list_methods():
                raise ValueError(f"unknown method {method!r} in 'methods'; valid methods: {', '.join(list_methods())}")
            if "name" in (settings or {}):
                raise ValueError(f"methods.{method}: the key is the method's name; give only its settings "
                                 "(beta, options, ...)")
        for pair in self.pairs:
            teacher = pair.split(PAIR_ARROW)[0]
            if teacher not in self.teachers:
                known = ", ".join(sorted(self.teachers)) or "none"
                raise ValueError(f"pair {pair}: no entry for its teacher under 'teachers' (teachers given: {known}); "
                                 f"add  {teacher}: {{train: <its experiment file>}}  or  {{checkpoint: <file or runs:/ID>}}")
        return self


def parse_reproduce(raw: dict[str, Any]) -> ReproduceConfig:
    try:
        return ReproduceConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, model=ReproduceConfig)) from None


def grid_cells(spec: ReproduceConfig, checkpoints: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every run of the grid, as ``{"set": {dotted key: value}, "label": {dotted key: value}}``.

    ``set`` makes the run's config from the recipe; ``label`` names it (its ``searched.*`` tags).
    ``checkpoints``: each teacher's resolved ``teacher.checkpoint`` (``runs:/ID``), once trained;
    before, the teacher's own source stands in (to check every config before anything runs).
    A method without a teacher trains once per student, seed and ``vary`` value, not per pair.
    """
    from semckd_ray.distill.catalog import method_spec

    cells, seen = [], set()
    for values in itertools.product(*spec.vary.values()):
        extra = dict(zip(spec.vary, values))
        for pair in spec.pairs:
            teacher, student = pair.split(PAIR_ARROW)
            for method, settings in spec.methods.items():
                uses_teacher = method_spec(method).uses_teacher
                for seed in spec.seeds:
                    key = json.dumps([method, pair if uses_teacher else student, seed, values])
                    if key in seen:
                        continue
                    seen.add(key)
                    source = spec.teachers[teacher].model_dump(exclude_none=True)
                    if checkpoints is not None:
                        source = {"checkpoint": checkpoints[teacher]}
                    label = {"teacher.model": teacher} if uses_teacher else {}
                    label.update({"student.model": student, "method.name": method, "seed": seed, **extra})
                    cells.append({"set": {
                        "teacher": {"model": teacher, **source} if uses_teacher else None,
                        "student.model": student, "method": {"name": method, **(settings or {})}, "seed": seed,
                        **extra}, "label": label})
    return cells


def sweep_raw(spec: ReproduceConfig) -> dict[str, Any]:
    """The grid as a sweep: the recipe, the first run's settings (every run sets its own), and a
    search section that runs each cell once, none stopped early."""
    from semckd_ray.tune import CELL, with_values

    cells = grid_cells(spec)
    raw = with_values({"name": spec.name, **spec.recipe}, cells[0]["set"])
    raw["tracking"] = {"experiment": spec.name, **(raw.get("tracking") or {})}
    raw["search"] = {"sampler": "grid", "space": {CELL: {"type": "choice", "values": list(range(len(cells)))}},
                     "scheduler": {"type": "none"}, "max_concurrent": spec.max_concurrent}
    return raw


def resolve_teachers(spec: ReproduceConfig, raw: dict[str, Any], config_dir: Path,
                     resume: bool) -> dict[str, str]:
    """``{teacher model: teacher.checkpoint}``: each distinct teacher trained once, or its finished run."""
    from semckd_ray.teacher import ensure_teacher
    from semckd_ray.tune import cell_config

    checkpoints = {}
    for cell in grid_cells(spec):
        teacher = cell["set"]["teacher"]
        if teacher is None or teacher["model"] in checkpoints:
            continue
        cfg = ensure_teacher(cell_config(raw, cell, config_dir), resume=resume)
        checkpoints[teacher["model"]] = cfg.teacher.checkpoint
    return checkpoints


def reproduce(raw_file: dict[str, Any], config_dir: Path, resume: str | None = None,
              out: Path | None = None) -> dict[str, Any]:
    """Everything ``python -m semckd_ray.reproduce`` does; returns the grid's summary and report."""
    from semckd_ray import tune
    from semckd_ray.nodes import storage_path

    spec = parse_reproduce(raw_file)
    raw, unresolved = sweep_raw(spec), grid_cells(spec)
    # Every run's config and a wrong --resume are refused before a teacher trains or Ray starts.
    _, base = tune.parse_search(raw, config_dir, unresolved)
    base.tracking.uri = raw["tracking"]["uri"] = tracking.resolve_tracking_uri(base.tracking.uri)
    # The grid as the file gives it (teachers by their source): a changed file is not resumed.
    digest = tune.grid_digest(unresolved, {k: v for k, v in raw.items() if k not in ("teacher", "tracking")})
    if resume:
        tune.check_same_grid(tune._find_sweep(storage_path(base, [], check=False), base.name, resume)[1], digest)
    tracking.check_reachable(base.tracking.uri)
    total = len(unresolved)
    print(f"[semckd-ray] {spec.name}: {total} runs ({len(spec.pairs)} pairs, {len(spec.methods)} methods, "
          f"{len(spec.seeds)} seeds{_vary_text(spec)})", flush=True)
    cells = grid_cells(spec, resolve_teachers(spec, raw, config_dir, resume is not None))
    raw = tune.with_values(raw, cells[0]["set"])  # the sweep's base: its first run, teacher resolved

    def progress(parent_run_id: str) -> list:
        from semckd_ray.grid_progress import GridProgress

        return [GridProgress(spec.name, total, base.tracking.uri, parent_run_id)]

    summary = tune.sweep(raw, config_dir, resume=resume, cells=cells, grid_sha256=digest, callbacks=progress)
    return {"summary": summary, "report": _report(base, out)}


def _vary_text(spec: ReproduceConfig) -> str:
    return "".join(f", {len(values)} values of {key}" for key, values in spec.vary.items())


def _report(base, out: Path | None):
    from semckd_ray.report import _slug, log_report, make_report, markdown_table

    client = tracking.client(base.tracking.uri)
    out = out or Path("report") / _slug(base.tracking.experiment)
    report = make_report(client, base.tracking.experiment, out, store=tracking.redact(base.tracking.uri))
    report.logged_to = log_report(client, report)
    print()
    print(markdown_table(report.table, report.ari))
    print(f"\nreport written to {out}/report.md ({len(report.files)} files, {len(report.results)} runs); "
          f"logged to MLflow run {report.logged_to} under report/")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semckd_ray.reproduce", description=__doc__.splitlines()[0])
    config_arguments(parser, config_required=True)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue an interrupted grid: the latest of this file, or the sweep folder PATH")
    parser.add_argument("--out", default=None, help="the report's folder (default: ./report/<experiment>)")
    args = parser.parse_args(argv)
    path = Path(args.config)
    raw = apply_overrides(read_yaml(path), args.overrides)
    reproduce(raw, path.resolve().parent, resume=args.resume, out=Path(args.out) if args.out else None)
    return 0


if __name__ == "__main__":
    run_cli(main)
