"""``python -m semckd_ray.tune [--config FILE] [--set key=value ...] [--resume [PATH]]``: a sweep.

Optuna (TPE, seeded) proposes values for the keys in the file's ``search.space`` (beta, the
query/key factor, the attention temperature, the projection width, or any other dotted config
key); ASHA stops poor trials early. Each trial is one Ray Train run of ``semckd_ray.trainer``
started from a Tune function trainable, scored on the validation split. MLflow gets a parent run
per sweep, a child run per trial, the best trial tagged and a summary artifact on the parent.
With no ``--config`` the embedded default, ``tune_configs/default.yaml``, runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from semckd_ray import tracking
from semckd_ray.tracking import SYSTEM_PREFIX
from semckd_ray.cli import config_arguments, run_cli
from semckd_ray.config import (
    MAX_EPOCHS,
    MAX_SEED,
    TrainConfig,
    _Section,
    apply_overrides,
    flatten,
    format_validation_error,
    get_dotted,
    parse_train_config,
    read_yaml,
    set_dotted,
)
from semckd_ray.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "tune_configs" / "default.yaml"
SWEEP_FILE = "semckd_sweep.json"
METRIC = "best_val_top1"  # validation only: the test split never steers the search
TRIAL_DRIVER_MEMORY = 512 * 1024**2  # bytes reserved for each trial's own process


MAX_RANDINT = 2**53  # randint bounds are floats here: exact integers up to 2**53, and int64 for the samplers


# The search's sections share the training config's rules (config._Section): unknown keys, non-finite
# numbers, booleans or strings for numbers are refused.
class ParamSpec(_Section):
    type: Literal["loguniform", "uniform", "randint", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ParamSpec:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a 'choice' needs a non-empty 'values' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type!r} range needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low={self.low} must be below high={self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"a 'loguniform' range needs low > 0, got {self.low}")
        if self.type == "uniform" and not math.isfinite(self.high - self.low):
            raise ValueError(f"a 'uniform' range needs a finite width high - low, got low={self.low}, high={self.high}")
        if self.type == "randint":
            for name, bound in (("low", self.low), ("high", self.high)):
                if bound != int(bound) or abs(bound) > MAX_RANDINT:
                    raise ValueError(f"a 'randint' range needs integer bounds in [-2**53, 2**53], got {name}={bound!r}")
            if int(self.high) - int(self.low) < 1:
                raise ValueError(f"an empty 'randint' range: high={self.high:g} is exclusive")
        return self

    def tune_domain(self):
        from ray import tune

        if self.type == "choice":
            return tune.choice(self.values)
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        return tune.randint(int(self.low), int(self.high))  # high exclusive

    def probe_values(self) -> list[Any]:
        """Values at the edges of the range: each must make a valid training config.

        A continuous range also gives the value just above ``low``: a fraction, which a key
        that takes integers refuses (it needs a 'randint').
        """
        if self.type == "choice":
            return list(self.values)
        if self.type == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, math.nextafter(self.low, self.high), self.high]


class SchedulerConfig(_Section):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(default=1, ge=1, le=MAX_EPOCHS)  # epochs before a trial may be stopped
    reduction_factor: float = Field(default=2.0, gt=1)


class SearchConfig(_Section):
    num_samples: int = Field(default=8, ge=1)  # with sampler 'grid': the number of combinations
    # 'tpe': Optuna's TPE proposes each trial from the scores so far. 'grid': every combination of
    # the 'choice' values once (Optuna's GridSampler), as a study of fractions or noise rates needs.
    sampler: Literal["tpe", "grid"] = "tpe"
    max_concurrent: int | None = Field(default=None, ge=1)  # None: as many as the cluster holds
    repeats: int = Field(default=1, ge=1, le=MAX_SEED + 1)  # seeds per trial; the score is their mean
    seed: int = Field(default=0, ge=0, le=MAX_SEED)  # Optuna's TPE sampler: numpy's RandomState, [0, 2**32)
    space: dict[str, ParamSpec] = Field(default_factory=dict)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)

    @model_validator(mode="after")
    def _grid_is_choices(self) -> SearchConfig:
        if self.sampler != "grid" or not self.space:
            return self
        ranges = [key for key, spec in self.space.items() if spec.type != "choice"]
        if ranges:
            raise ValueError(f"sampler 'grid' runs every combination of 'choice' values; {', '.join(ranges)} "
                             "is a range: give it type 'choice' with its values, or use sampler 'tpe'")
        size = self.grid_size()
        if "num_samples" not in self.model_fields_set:
            self.__dict__["num_samples"] = size  # set without validate_assignment re-running this check
        elif self.num_samples != size:
            raise ValueError(f"sampler 'grid' runs each of the {size} combinations of search.space once: "
                             f"set num_samples to {size} or leave it out (got {self.num_samples})")
        return self

    def grid_size(self) -> int:
        return math.prod(len(spec.values) for spec in self.space.values())

    def optuna_sampler(self, names: dict[str, str]):
        """The Optuna sampler; ``names``: ``{trial parameter name: dotted key}``, as Tune names them."""
        if self.sampler == "grid":
            from semckd_ray.grid_sampler import GridSampler

            return GridSampler({name: self.space[key].values for name, key in names.items()}, seed=self.seed)
        import optuna

        return optuna.samplers.TPESampler(seed=self.seed)


def parse_search(raw: dict[str, Any], config_dir: Path,
                 cells: list[dict[str, Any]] | None = None) -> tuple[SearchConfig, TrainConfig]:
    """Validate the search section and check that every value it may sample gives a valid config.

    ``cells``: a grid of whole configurations (``semckd_ray.reproduce``), searched as the one key
    ``CELL``; each cell's ``set`` (dotted key -> value) applied to ``raw`` must be a valid config."""
    try:
        search = SearchConfig.model_validate(raw.get("search") or {})
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, model=SearchConfig, prefix="search")) from None
    base = parse_train_config(raw, config_dir=config_dir)  # a typo in the training config comes first
    if cells is not None:
        for cell in cells:
            cell_config(raw, cell, config_dir)
        return search, base
    if not search.space:
        raise UserError("search.space is empty: name at least one dotted config key to search, "
                        "e.g. method.beta: {type: loguniform, low: 10, high: 1000}")
    for key, spec in search.space.items():
        try:
            get_dotted(base.model_dump(), key)
        except KeyError:
            if not key.startswith("method.options."):
                raise UserError(f"search.space key {key!r} is not a config key") from None
        for value in spec.probe_values():
            probe = with_values(raw, {key: value})
            try:
                parse_train_config(probe, config_dir=config_dir)
            except UserError as exc:
                hint = ""
                if spec.type in ("uniform", "loguniform") and value not in (spec.low, spec.high):
                    hint = (f" (a {spec.type!r} range samples fractions: use type 'randint' for a key "
                            "that takes integers)")
                raise UserError(f"search.space.{key}: the value {value!r} is invalid{hint}: {exc}") from None
    _check_trial_seeds(search, base)
    if search.scheduler.type == "asha" and search.scheduler.grace_period > base.optim.epochs:
        raise UserError(f"search.scheduler.grace_period={search.scheduler.grace_period} is above optim.epochs="
                        f"{base.optim.epochs}, ASHA's last epoch: allowed 1 to {base.optim.epochs}")
    return search, base


def _check_trial_seeds(search: SearchConfig, base: TrainConfig) -> None:
    """A trial's repeats train with seeds seed, seed + 1, ..., seed + repeats - 1: each must be a seed."""
    if search.repeats == 1:
        return
    spec = search.space.get("seed")
    seeds = [base.seed] if spec is None else [v for v in spec.probe_values() if isinstance(v, int)]
    top = max(seeds, default=base.seed) + search.repeats - 1
    if top > MAX_SEED:
        raise UserError(f"search.repeats={search.repeats} trains seeds up to seed + {search.repeats - 1} = {top}, "
                        f"above the largest seed {MAX_SEED}: lower seed or search.repeats")


# ------------------------------------------------------------------------------------------
# The trial


def short_names(keys: list[str]) -> dict[str, str]:
    """``{short name: dotted key}``: each key's last part, or as many parts as tell it apart.

    Tune's progress table cuts a column's name at 20 characters (``...od/options/factor``); the
    trials' parameters go by these names there, and by their dotted keys everywhere else.
    """
    parts = {key: key.split(".") for key in keys}
    for depth in range(1, max((len(p) for p in parts.values()), default=1) + 1):
        names = {key: ".".join(p[-depth:]) for key, p in parts.items()}
        if len(set(names.values())) == len(names):
            return {name: key for key, name in names.items()}
    return {key: key for key in keys}


CELL = "cell"  # the one searched key of a grid of configurations: an index into its cells


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config ``raw`` with ``values`` (dotted key -> value) set in it."""
    out = json.loads(json.dumps(raw))
    for key, value in values.items():
        set_dotted(out, key, value)
    return out


def cell_config(raw: dict[str, Any], cell: dict[str, Any], config_dir: str | Path) -> TrainConfig:
    """The training config of one grid cell: ``raw`` with the cell's ``set`` (dotted key -> value)."""
    trial_raw = with_values(raw, cell["set"])
    try:
        return parse_train_config(trial_raw, config_dir=config_dir)
    except UserError as exc:
        label = ", ".join(f"{k}={v}" for k, v in cell["label"].items())
        raise UserError(f"the grid's run {label}: {exc}") from None


def _sampled(params: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A trial's values by dotted key (a sweep started before short names had nested params)."""
    return {names.get(k, k): v for k, v in flatten(params).items()}


def run_trial(params: dict[str, Any], *, raw: dict[str, Any], config_dir: str, parent_run_id: str,
              sweep_name: str, repeats: int, names: dict[str, str], cells: list[dict[str, Any]] | None = None) -> None:
    """A Tune function trainable: one Ray Train run per repeat, logged as the trial's MLflow run.

    With ``cells`` (a grid of configurations) the trial trains the cell its ``CELL`` value names,
    and its run is tagged with the cell's label (``searched.<key>``) instead of the index."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from semckd_ray.trainer import fit

    sampled = _sampled(params, names)
    if cells is not None:
        cell = cells[int(sampled[CELL])]
        cfg, sampled = cell_config(raw, cell, config_dir), dict(cell["label"])
    else:
        cfg = parse_train_config(with_values(raw, sampled), config_dir=config_dir)
    trial_id = tune.get_context().get_trial_id()
    run_id = _trial_run(cfg, parent_run_id, trial_id, sampled, sweep_name)
    run = tracking.client(cfg.tracking.uri).get_run(run_id)
    if run.info.status == "FINISHED":
        # Finished before the sweep's driver died, but Tune's saved state did not know yet:
        # report the logged result instead of training again.
        logged = {k: v for k, v in run.data.metrics.items() if not k.startswith(SYSTEM_PREFIX)}
        tune.report({**logged, "epoch": int(logged.get("epoch", cfg.optim.epochs))})
        return
    if repeats == 1:
        fit(cfg, run_id=run_id, train_run_name=f"{sweep_name}-{trial_id}", callbacks=[TuneReportCallback()])
        return
    _run_repeats(cfg, run_id, trial_id, sweep_name, sampled, repeats)


def _run_repeats(cfg: TrainConfig, run_id: str, trial_id: str, sweep_name: str, sampled: dict[str, Any],
                 repeats: int) -> None:
    """The trial's seeds train at the same time; after every epoch the trial reports their mean.

    Each seed is a Ray Train run of its own (a child of the trial's MLflow run), started from a
    thread of this process; their per-epoch results come back through a Ray queue. The trial reports
    epoch ``e`` once every seed has finished it, so ASHA judges the mean after the first rung and
    stops a poor trial there, with all its seeds, instead of after every seed has trained to the end.
    Seeds that the cluster cannot hold at once wait for resources, as any training does.

    The seeds do not wait for each other: a seed that started first trains on while the trial waits
    for the slower one to reach the rung, and is stopped with the trial wherever it then is. Holding
    it at the rung would deadlock wherever the slower seed waits for the resources the faster holds.
    """
    import threading

    from ray import tune
    from ray.util.queue import Queue

    from semckd_ray.spool import SpooledLogger, spool_dir
    from semckd_ray.trainer import finish_run, fit

    reports = Queue(actor_options={"num_cpus": 0})
    seeds = []
    for k in range(repeats):
        seed_cfg = cfg.model_copy(deep=True)
        seed_cfg.seed = cfg.seed + k  # data.split_seed stays: every seed is scored on the same split
        seeds.append((seed_cfg, _trial_run(seed_cfg, run_id, f"{trial_id}-seed{k}", sampled, sweep_name, seed=k)))
    client = tracking.client(cfg.tracking.uri)
    finished = {k for k, (_, seed_run) in enumerate(seeds) if client.get_run(seed_run).info.status == "FINISHED"}
    # A resumed sweep: what each seed logged before the driver died stands in for the epochs that
    # its resumed training will not report again (the trial's logger skips the epochs its run has).
    by_epoch: dict[int, dict[int, dict[str, float]]] = {}
    for k, (_, seed_run) in enumerate(seeds):
        for epoch, metrics in _history(cfg.tracking.uri, seed_run).items():
            by_epoch.setdefault(epoch, {})[k] = metrics

    def train(k: int) -> None:
        seed_cfg, seed_run = seeds[k]
        try:
            result = fit(seed_cfg, run_id=seed_run, train_run_name=f"{sweep_name}-{trial_id}-seed{k}",
                         callbacks=[_seed_reports(reports, k)])
            diverged = result.metrics.get("diverged")
            reports.put((k, "diverged" if diverged else "done", result.metrics.get("epoch")))
        except BaseException as exc:  # the trial fails with the seed's error, below
            reports.put((k, "failed", f"{type(exc).__name__}: {exc}"))

    for k in range(repeats):
        if k not in finished:
            threading.Thread(target=train, args=(k,), name=f"seed{k}", daemon=True).start()
    logger = SpooledLogger(cfg.tracking.uri, run_id, spool_dir(cfg.tracking.storage_path, run_id), writer="trial")
    done, diverged = set(finished), {}
    last = cfg.optim.epochs

    def ready(epoch: int) -> bool:
        # The last epoch waits for every seed's training to end, so that the trial's last report,
        # after which Tune may end this process, comes after every run is closed.
        return len(by_epoch.get(epoch, ())) == repeats and (epoch < last or len(done) == repeats)

    reported = 0
    while True:
        while ready(reported + 1):
            reported += 1
            per_seed = list(by_epoch.pop(reported).values())
            mean = {key: sum(m[key] for m in per_seed) / repeats
                    for key in per_seed[0] if all(key in m for m in per_seed)}
            mean["epoch"] = reported
            logger.log_metrics(mean, step=reported)
            # Sent or spooled before the report: ASHA ends this process right after the report it
            # stops the trial on, and the trial's curve must still hold that epoch.
            logger.checkpoint()
            if reported == last:
                logger.close()
                finish_run(cfg, run_id, "FINISHED")
            tune.report(mean)
        if len(done) == repeats:
            break
        k, kind, value = reports.get()
        if kind == "epoch":
            by_epoch.setdefault(int(value["epoch"]), {})[k] = value
        elif kind == "failed":
            raise RuntimeError(f"seed {k} of trial {trial_id} failed: {value}")
        else:
            done.add(k)
            if kind == "diverged":
                diverged[k] = value
    if diverged:
        reason = "; ".join(f"seed {k} diverged in epoch {int(e)}" for k, e in sorted(diverged.items()))
        logger.set_tag("stopped_reason", reason)
        logger.close()
        finish_run(cfg, run_id, "FAILED", reason)


def _seed_reports(queue, seed_index: int):
    """A Ray Train callback that sends each epoch's rank-0 metrics to the trial through ``queue``.

    It runs in the training's controller (an actor of its own), hence the Ray queue. Defined here,
    not at import, because ``ray.train`` is heavy and ``python -m semckd_ray.tune`` checks the
    config before it needs Ray.
    """
    from ray.train import UserCallback

    class SeedReports(UserCallback):
        def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
            numbers = {k: float(v) for k, v in metrics[0].items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            queue.put((seed_index, "epoch", numbers))

    return SeedReports()


def _history(uri: str, run_id: str) -> dict[int, dict[str, float]]:
    client = tracking.client(uri)
    run = client.get_run(run_id)
    out: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        if key.startswith(SYSTEM_PREFIX):  # the machine's samples, on their own steps
            continue
        for m in client.get_metric_history(run_id, key):
            out.setdefault(m.step, {})[key] = m.value
    return out


def _trial_run(cfg: TrainConfig, parent_run_id: str, trial_id: str, sampled: dict[str, Any], sweep_name: str,
               seed: int | None = None) -> str:
    """The trial's MLflow run (or, with ``seed``, that seed's run under the trial's): found again by its
    trial id when a resumed sweep re-runs the trial."""
    from semckd_ray.trainer import start_run

    client = tracking.client(cfg.tracking.uri)
    parent = client.get_run(parent_run_id)
    existing = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.tune_trial_id = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'",
        max_results=1,
    )
    if existing:
        run_id = existing[0].info.run_id
        if existing[0].info.status != "FINISHED":
            client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {"tune_trial_id": trial_id, "sweep_name": sweep_name,
            **{f"searched.{k}": str(v) for k, v in sampled.items()}}
    cfg = cfg.model_copy(deep=True)
    if seed is None:
        # Numbered in the order the trials started; summarize() settles a tie between two that
        # started at once.
        number = 1 + len(client.search_runs([parent.info.experiment_id], max_results=10000,
                                            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"))
        cfg.tracking.run_name = trial_run_name(sweep_name, number, sampled)
    else:
        cfg.tracking.run_name = f"{parent.info.run_name} seed {seed}"
    return start_run(cfg, parent_run_id=parent_run_id, tags=tags)


def _sweep_clock(sweep_name: str) -> tuple[str, str, str]:
    """``(config name, "HH:MM:SS", "YYYY-MM-DD")`` of a sweep named ``NAME-YYYYMMDD-HHMMSS`` (the
    whole name and no time for any other name)."""
    match = re.fullmatch(r"(.+)-(\d{4})(\d\d)(\d\d)-(\d\d)(\d\d)(\d\d)", sweep_name)
    if match is None:
        return sweep_name, "", ""
    name, year, month, day, hour, minute, second = match.groups()
    return name, f"{hour}:{minute}:{second}", f"{year}-{month}-{day}"


def sweep_run_name(sweep_name: str) -> str:
    """The parent run's name: what tells two sweeps of one config apart comes first, where the UI's
    name column still shows it (``default 17:12:05 2026-12-02``)."""
    name, clock, day = _sweep_clock(sweep_name)
    return f"{name} {clock} {day}".rstrip()


def trial_run_name(sweep_name: str, number: int, sampled: dict[str, Any]) -> str:
    """``default 17:12 #03 beta=34.3 factor=8 soft=1.18``: the sweep, the trial's number, its values."""
    name, clock, _ = _sweep_clock(sweep_name)
    short = {key: name for name, key in short_names(list(sampled)).items()}  # teacher.model, student.model
    values = " ".join(f"{short[key]}={_short(value)}" for key, value in sorted(sampled.items()))
    return " ".join(part for part in (name, clock[:5], f"#{number:02d}", values) if part)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------
# The sweep


def sweep(raw: dict[str, Any], config_dir: Path, resume: str | None = None, *,
          cells: list[dict[str, Any]] | None = None, grid_sha256: str | None = None, callbacks=None) -> dict[str, Any]:
    """Run the sweep of ``raw`` (its ``search`` section), or continue it (``resume``); returns the summary.

    ``cells``: a grid of whole configurations instead of a search (``semckd_ray.reproduce``): the
    search section is then a grid over ``CELL``; ``grid_sha256`` (default: ``grid_digest(cells)``)
    is what a resumed grid must match. ``callbacks``: a function of the parent run's id that
    returns more Tune callbacks for a new sweep (Tune keeps them in its saved state: a resumed sweep
    has them again)."""
    # First of all, before Ray, MLflow or torch is imported: the config and the search space.
    search, base = parse_search(raw, config_dir, cells)

    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from semckd_ray import storage
    from semckd_ray.nodes import alive_nodes, check_cluster, storage_path
    from semckd_ray.teacher import ensure_teacher
    from semckd_ray.capacity import TrialCapacity, cluster_growth, worker_resources
    from semckd_ray.scheduling import ClusterLimiter
    from semckd_ray.trainer import check_resources, cluster_capacity, ensure_ray, preflight

    base.tracking.uri = tracking.resolve_tracking_uri(base.tracking.uri)
    # Next, before Ray or a teacher's training starts: a wrong --resume PATH is refused.
    found = _find_sweep(storage_path(base, [], check=False), base.name, resume) if resume else None
    grid = (grid_sha256 or grid_digest(cells)) if cells is not None else None
    if found is not None:
        check_same_grid(found[1], grid)
    tracking.check_reachable(base.tracking.uri)
    base = preflight(ensure_teacher(base))
    # Every trial shares the resolved teacher, tracking store and absolute paths.
    raw = {**base.model_dump(mode="json"), "search": raw.get("search")}
    ensure_ray()
    growth = cluster_growth()
    check_resources(base, cluster_capacity(), nodes=alive_nodes(), growth=growth)
    root = check_cluster(base)  # tracking, storage and data as every node sees them, before any run
    # The trials' trainers keep their checkpoints where this driver checked, not under their own cwd.
    raw["tracking"]["storage_path"] = root
    # How many trials run (or wait for resources) at once is asked again before each new trial:
    # a node that joins is used without a restart, and on an autoscaling cluster the waiting
    # trials' resource requests are the demand the autoscaler sees.
    capacity = TrialCapacity(worker_resources(base.scaling), base.scaling.num_workers * search.repeats,
                             search.max_concurrent)

    client = tracking.client(base.tracking.uri)
    if found is not None:
        sweep_dir, info = found
        parent_run_id, sweep_name = info["parent_run_id"], info["sweep_name"]
        client.update_run(parent_run_id, status="RUNNING")
        print(f"[semckd-ray] resuming sweep {sweep_name} ({storage.redact(sweep_dir)})", flush=True)
        _send_spools(client, root, parent_run_id)  # what its trainings kept while MLflow was down
    else:
        sweep_name = f"{base.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        sweep_dir = storage.join(root, sweep_name)  # where Tune keeps the sweep: a folder or a URI
        parent_run_id = _start_parent(base, search, sweep_name, raw, cells)

    names = short_names(list(search.space))
    trainable = tune.with_parameters(
        run_trial, raw=raw, config_dir=str(config_dir), parent_run_id=parent_run_id,
        sweep_name=sweep_name, repeats=search.repeats, names=names, cells=cells,
    )
    # The trial's own process only waits on its TorchTrainer, whose workers hold the CPUs/GPUs:
    # reserving a CPU for it as well would leave the workers of concurrent trials none to run on.
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    if found is not None:
        # The sweep's URI as found (an S3 endpoint's query included), which Tune reads its state from.
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
    else:
        param_space = {name: search.space[key].tune_domain() for name, key in names.items()}
        scheduler = (
            ASHAScheduler(time_attr="epoch", max_t=base.optim.epochs, grace_period=search.scheduler.grace_period,
                          reduction_factor=search.scheduler.reduction_factor)
            if search.scheduler.type == "asha" else FIFOScheduler()
        )
        searcher = ClusterLimiter(OptunaSearch(sampler=search.optuna_sampler(names)), capacity)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
                num_samples=search.num_samples,
            ),
            # A trial whose process died (its node lost) runs again: it finds its MLflow run by its
            # trial id, and its Ray Train run, of the same name, continues from its last checkpoint.
            # Every trial's results go to MLflow; Tune keeps its CSV and JSON per trial, and no TensorBoard
            # files (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS, below) that nobody is told to read.
            run_config=tune.RunConfig(name=sweep_name, storage_path=root, verbose=1,
                                      callbacks=[CSVLoggerCallback(), JsonLoggerCallback(),
                                                 *(callbacks(parent_run_id) if callbacks else [])],
                                      failure_config=tune.FailureConfig(max_failures=base.scaling.max_failures)),
        )
        # What --resume finds, beside Tune's own state, through the storage path's filesystem.
        _write_sweep(sweep_dir, json.dumps(
                {"parent_run_id": parent_run_id, "sweep_name": sweep_name, "tracking_uri": tracking.redact(base.tracking.uri),
                 "grid_sha256": grid}))
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # read by tuner.fit(), in this process
    print(f"[semckd-ray] sweep {sweep_name}: {search.num_samples} trials, up to {capacity()} at a time on the "
          f"cluster as it is now; MLflow parent run {parent_run_id} ({sweep_run_name(sweep_name)!r})", flush=True)
    try:
        results = tuner.fit()
    except BaseException:
        client.set_terminated(parent_run_id, "KILLED")
        raise
    _send_spools(client, root, parent_run_id)
    summary = summarize(base, parent_run_id, results, search)
    client.set_terminated(parent_run_id, "FINISHED")
    return summary


def _send_spools(client, root: str, parent_run_id: str) -> None:
    """Send what the sweep's trials and seeds spooled and did not send themselves: a trial that
    Tune ended while MLflow was unreachable leaves its last epochs in its spool."""
    from semckd_ray.spool import send_spool, spools

    for run_id, folder in spools(root).items():
        try:
            parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
            grandparent = client.get_run(parent).data.tags.get("mlflow.parentRunId") if parent else None
        except Exception:  # a run this store does not have, or MLflow still down: left for sync
            continue
        if parent_run_id in (parent, grandparent):
            send_spool(client, run_id, folder)


def grid_digest(cells: list[dict[str, Any]], raw: dict[str, Any] | None = None) -> str:
    """What a resumed grid must match: its cells, in order (each trial trains the cell of its
    index), and the config they apply to."""
    import hashlib

    return hashlib.sha256(json.dumps({"cells": cells, "raw": raw}, sort_keys=True).encode()).hexdigest()


def check_same_grid(marker: dict[str, Any], grid_sha256: str | None) -> None:
    """A sweep resumed as it started: a search as a search, a grid with the same runs and config."""
    if marker.get("grid_sha256") != grid_sha256:
        raise UserError(f"--resume: the sweep {marker['sweep_name']} ran another grid (or search); resume it with "
                        "the file and --set values it started with, or start again without --resume")


def _start_parent(base: TrainConfig, search: SearchConfig, sweep_name: str, raw: dict[str, Any],
                  cells: list[dict[str, Any]] | None = None) -> str:
    client = tracking.client(base.tracking.uri)
    experiment_id = tracking.get_or_create_experiment(client, base.tracking.experiment)
    run = client.create_run(experiment_id, run_name=sweep_run_name(sweep_name), tags={
        "role": "sweep", "sweep_name": sweep_name, "git_commit": tracking.git_commit(),
        "dataset": base.data.dataset, "method": base.method.name,
        "student": base.student.model, "teacher": base.teacher.model if base.teacher else "",
    })
    params = {f"search.{k}": v for k, v in flatten(search.model_dump(mode="json")).items()}
    params.update({"searcher": f"optuna.{'GridSampler' if search.sampler == 'grid' else 'TPESampler'}",
                   "scheduler": search.scheduler.type, "metric": METRIC})
    params.update({f"base.{k}": v for k, v in flatten(base.model_dump(mode="json")).items()})
    tracking.log_params(client, run.info.run_id, params)
    with tempfile.TemporaryDirectory() as tmp:
        import yaml

        path = Path(tmp) / "experiment.yaml"
        path.write_text(yaml.safe_dump(tracking.redact(raw), sort_keys=False))
        client.log_artifact(run.info.run_id, str(path))
        if cells is not None:  # what each trial's cell index stands for
            path = Path(tmp) / "grid.json"
            path.write_text(json.dumps(tracking.redact(cells), indent=1))
            client.log_artifact(run.info.run_id, str(path))
    # The sweep's trials, best first, with the searched values and the scores as columns.
    searched = list(search.space) if cells is None else list(dict.fromkeys(k for c in cells for k in c["label"]))
    tracking.share_runs_view(
        client, experiment_id, run.info.run_id,
        search_filter=f"tags.sweep_name = '{sweep_name}' and tags.role != 'sweep'",
        order_by=f"metrics.`{METRIC}`",
        columns=[*(f"params.`{key}`" for key in searched), f"metrics.`{METRIC}`", "metrics.`test_top1_at_best_val`",
                 "metrics.`epoch`", "tags.`stopped_early`", "tags.`best_trial`"],
    )
    return run.info.run_id


def _write_sweep(sweep_dir: str, marker: str) -> None:
    """The sweep's marker, ``SWEEP_FILE`` in its folder (a local one or a URI): what ``--resume`` finds."""
    from semckd_ray import storage

    storage.write_text(storage.join(sweep_dir, SWEEP_FILE), marker)


def _find_sweep(root: str, name: str, resume: str) -> tuple[str, dict[str, Any]]:
    """``(the sweep's folder, its marker's content)`` for ``--resume``; a clear UserError otherwise.

    ``resume`` is ``"latest"`` (the newest sweep of the config ``name`` under the storage path
    ``root``) or a sweep's folder: a local path or a URI (``s3://bucket/prefix/NAME?endpoint_override=...``).
    Both are read through their own filesystem (pyarrow's, as Ray reads them); a local folder comes
    back absolute.
    """
    from semckd_ray import storage

    def marker(folder: str) -> dict[str, Any] | None:
        try:
            text = storage.read_text(storage.join(folder, SWEEP_FILE))
        except Exception as exc:  # pyarrow: OSError (unreachable, no bucket, denied), ArrowInvalid (bad URI)
            raise UserError(storage.redact(f"--resume: cannot read {storage.join(folder, SWEEP_FILE)} "
                                           f"({type(exc).__name__}: {exc})")) from None
        if text is None:
            return None
        try:
            info = json.loads(text)
            info["parent_run_id"], info["sweep_name"]
        except (ValueError, KeyError, TypeError):
            raise UserError(storage.redact(f"--resume: {storage.join(folder, SWEEP_FILE)} is not a sweep's "
                                           "marker (no parent_run_id and sweep_name in it)")) from None
        return info

    def local(path: str) -> str:
        return path if storage.is_uri(path) else str(Path(path.removeprefix("file://")).expanduser().resolve())

    root = local(root)
    example = storage.join(root, f"{name}-YYYYMMDD-HHMMSS")
    if resume != "latest":
        folder = local(resume)
        info = marker(folder)
        if info is None:
            raise UserError(storage.redact(f"--resume {resume}: no sweep there (missing {SWEEP_FILE}); pass the "
                                           f"folder of a sweep under the storage path, e.g. {example}"))
        return folder, info
    try:
        names = storage.list_dir(root)
    except Exception as exc:
        raise UserError(storage.redact(f"--resume: cannot list the storage path {root} "
                                       f"({type(exc).__name__}: {exc})")) from None
    pattern = re.compile(rf"{re.escape(name)}-\d{{8}}-\d{{6}}")  # the sweeps of this config, by start time
    for found in sorted((n for n in names if pattern.fullmatch(n)), reverse=True):
        info = marker(storage.join(root, found))
        if info is not None:
            return storage.join(root, found), info
    raise UserError(storage.redact(f"--resume: no sweep named {name!r} under {root}; pass its folder: "
                                   f"--resume PATH (e.g. {example})"))


def summarize(base: TrainConfig, parent_run_id: str, results, search: SearchConfig) -> dict[str, Any]:
    """Close every trial's run truthfully, tag the best, and log the summary on the parent, with
    Optuna's view of the search (``semckd_ray.optuna_views``: ``optuna/param_importances.csv``, its
    figure, ``optuna/history.png``, metrics ``importance/<name>``), rebuilt from the trials' runs."""
    from semckd_ray.trainer import close_run

    client = tracking.client(base.tracking.uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        max_results=10000,
    )
    errored = {r.metrics.get("trial_id") for r in results if r.error} if results is not None else set()
    rows = []
    for number, run in enumerate(sorted(children, key=lambda r: (r.info.start_time, r.info.run_id)), start=1):
        metrics = run.data.metrics
        epochs = int(metrics.get("epoch", 0))
        status = run.info.status
        tune_errored = run.data.tags.get("tune_trial_id") in errored
        # A training that diverged reports its last result with ``diverged``, after which Tune may end
        # the trial's process before fit() has closed the run FAILED: the metric says so all the same.
        diverged = "stopped_reason" in run.data.tags or bool(metrics.get("diverged"))
        stopped = run.data.tags.get("stopped_early") == "true"
        if diverged and (status != "FAILED"
                         or not run.data.tags.get("failure_reason", "").startswith("training loss diverged")):
            # Still RUNNING, or FAILED with the teardown's error that fit() wrote over the worker's reason.
            status = "FAILED"
            close_run(client, run.info.run_id, status, f"training loss diverged in epoch {epochs}")
        elif not diverged and (status == "RUNNING" or (status == "FAILED" and not tune_errored)):
            # Tune ended the trial's process before or while fit() closed the run: ASHA stopped
            # it early, or at max_t, the last epoch. Such a run neither failed nor keeps running:
            # a trial that ASHA stopped has ended as the search meant it to, and is FINISHED with
            # the tag stopped_early (MLflow's KILLED would show it as a failure, with a red cross).
            if tune_errored:
                status = "FAILED"
            else:
                status = "FINISHED"
                if epochs < base.optim.epochs:
                    stopped = True
                    client.set_tag(run.info.run_id, "stopped_early", "true")
            close_run(client, run.info.run_id, status)  # drops fit()'s reason for Tune's teardown
        if search is not None and "sweep_name" in run.data.tags:
            # The trials' numbers, in the order they started: two that started at once may have
            # counted the same runs before them.
            name = trial_run_name(run.data.tags["sweep_name"], number, _searched(run.data.tags))
            if name != run.info.run_name:
                client.update_run(run.info.run_id, name=name)
        if search is None or search.repeats > 1:
            _close_seed_runs(client, parent.info.experiment_id, run.info.run_id, base.optim.epochs, status)
        rows.append({
            "run_id": run.info.run_id,
            "trial_id": run.data.tags.get("tune_trial_id", ""),
            **{k: v for k, v in run.data.tags.items() if k.startswith("searched.")},
            "best_val_top1": metrics.get("best_val_top1", math.nan),
            "test_top1_at_best_val": metrics.get("test_top1_at_best_val", math.nan),
            "epochs": epochs,
            "status": "STOPPED_EARLY" if stopped and status == "FINISHED" else status,
        })
    if search is not None and search.space and CELL not in search.space:  # a grid of configs has no importances
        from semckd_ray.optuna_views import log_optuna_views

        # The trials in the order they started (the history's x axis); it never raises.
        log_optuna_views(client, parent_run_id, rows, search.space, short_names(list(search.space)))
    rows.sort(key=lambda r: -r["best_val_top1"] if math.isfinite(r["best_val_top1"]) else math.inf)
    best = rows[0] if rows and math.isfinite(rows[0]["best_val_top1"]) else None
    if best is not None:
        client.set_tag(best["run_id"], "best_trial", "true")
        client.set_tag(parent_run_id, "best_run_id", best["run_id"])
        client.log_metric(parent_run_id, "best_val_top1", best["best_val_top1"])
    with tempfile.TemporaryDirectory() as tmp:
        columns = sorted({k for r in rows for k in r}, key=lambda k: (k != "run_id", k != "trial_id", k))
        with open(Path(tmp) / "summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        (Path(tmp) / "summary.json").write_text(json.dumps(rows, indent=1))
        client.log_artifact(parent_run_id, str(Path(tmp) / "summary.csv"))
        client.log_artifact(parent_run_id, str(Path(tmp) / "summary.json"))
    return {"parent_run_id": parent_run_id, "best": best, "trials": rows,
            "tracking_uri": base.tracking.uri, "experiment": base.tracking.experiment,
            "experiment_id": parent.info.experiment_id}


def _close_seed_runs(client, experiment_id: str, trial_run_id: str, epochs: int, trial_status: str) -> None:
    """A trial's seeds that Tune's end of the trial left open, or marked failed as it tore them down:
    finished if they trained every epoch, else stopped early with their trial (FINISHED, tagged
    stopped_early), or KILLED with a trial that failed."""
    from semckd_ray.trainer import close_run

    seeds = client.search_runs([experiment_id], max_results=1000,
                               filter_string=f"tags.`mlflow.parentRunId` = '{trial_run_id}'")
    for run in seeds:
        status = run.info.status
        torn_down = status == "FAILED" and trial_status != "FAILED" and "stopped_reason" not in run.data.tags
        if status != "RUNNING" and not torn_down:
            continue
        if int(run.data.metrics.get("epoch", 0)) >= epochs:
            close_run(client, run.info.run_id, "FINISHED")
        elif trial_status == "FAILED":
            close_run(client, run.info.run_id, "KILLED")
        else:
            client.set_tag(run.info.run_id, "stopped_early", "true")
            close_run(client, run.info.run_id, "FINISHED")


def _searched(tags: dict[str, str]) -> dict[str, Any]:
    """A trial's sampled values from its ``searched.*`` tags (numbers as numbers)."""
    out: dict[str, Any] = {}
    for key, text in tags.items():
        if key.startswith("searched."):
            try:
                number = float(text)
                out[key[len("searched."):]] = int(number) if number.is_integer() and "." not in text else number
            except ValueError:
                out[key[len("searched."):]] = text
    return out


def print_summary(summary: dict[str, Any]) -> None:
    rows = summary["trials"]
    searched = sorted({k for r in rows for k in r if k.startswith("searched.")})
    header = ["trial_id", *[k[len("searched."):] for k in searched], "best_val_top1", "test_top1_at_best_val",
              "epochs", "status"]
    table = [[str(r.get("trial_id", ""))] + [_fmt(r.get(k)) for k in searched]
             + [_fmt(r["best_val_top1"]), _fmt(r["test_top1_at_best_val"]), str(r["epochs"]), r["status"]]
             for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    best = summary["best"]
    if best is not None:
        print(f"\nbest trial {best['trial_id']} (MLflow run {best['run_id']}): validation top-1 "
              f"{best['best_val_top1']:.2f}, test top-1 at that epoch {best['test_top1_at_best_val']:.2f}")
        for key in searched:
            print(f"  {key[len('searched.'):]} = {best.get(key)}")
    print(f"\nsweep parent run: {summary['parent_run_id']} in experiment {summary['experiment']!r}")
    print(f"browse it: {tracking.browse_hint(summary['tracking_uri'])}")
    if summary.get("experiment_id"):
        print("its trials, best first, searched values and scores as columns: "
              + tracking.runs_view_url(summary["tracking_uri"], summary["experiment_id"], summary["parent_run_id"]))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if math.isfinite(value) else "-"
    if value is None:
        return "-"
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semckd_ray.tune", description=__doc__.splitlines()[0])
    config_arguments(parser, config_required=False)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue an interrupted sweep: the latest of this config, or the sweep folder PATH")
    args = parser.parse_args(argv)
    path = Path(args.config) if args.config else DEFAULT_CONFIG
    raw = apply_overrides(read_yaml(path), args.overrides)
    summary = sweep(raw, path.resolve().parent, resume=args.resume)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    run_cli(main)
