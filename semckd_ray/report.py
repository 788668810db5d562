"""``python -m semckd_ray.report --experiment NAME [--out DIR] [--tracking-uri URI]``: the paper's table from MLflow.

Reads every finished run of an MLflow experiment and writes, into ``--out`` (default
``./report/<experiment>``) and onto MLflow (under ``report/`` of the newest sweep's parent run, or
of a run named ``report`` when the experiment has no sweep):

- ``report.md``: the comparison table as in the SemCKD paper (rows methods, columns teacher->student
  pairs, cells test top-1 mean +- std over seeds, with n and the seeds) with the published value
  beside ours, the average relative improvement (ARI) of SemCKD over each method, the study
  sections below where such runs exist, and the figures;
- ``table.csv`` (one line per cell), ``ari.csv``, ``runs.csv`` (the runs behind the cells);
- ``curves_<pair>.png``: validation top-1 and every loss term per epoch, one line per run;
- ``attention_<pair>[_<config>].png``: SemCKD's validation attention at the last epoch, averaged
  over the seeds of one config;
- ``sweep_<name>.png``: each sweep's score (best validation top-1 over the epochs each trial trained)
  against every searched value, each trial marked by how many epochs it trained (ASHA stops some early);
- ``fewshot.png``, ``fewshot.csv`` and ``label_noise.png``, ``label_noise.csv``: test top-1 against
  ``data.train_fraction`` (< 1 on some runs) and ``data.label_noise`` (> 0 on some runs), per pair, a line per method;
- ``transfer.csv``: transfer runs (tag ``role=transfer``, ``student_run_id``, ``transfer_dataset``),
  rows students, columns transfer datasets;
- ``optuna_<sweep>_*``: each sweep's Optuna parameter importances and figures, copied from its
  parent run's ``optuna/`` artifacts.

Which runs count: finished runs that logged ``test_top1_at_best_val``. A run outside any sweep counts
as it is. A sweep contributes its best trial only (tag ``best_trial``, chosen on the validation
split), or that trial's seed runs when it ran several seeds: counting every trial, or the best one
on test, would turn a search into a better-looking result. A grid sweep (``search.sampler: grid``)
is a study, not a search: each of its trials that trained to its end counts. The student row is the ``vanilla`` runs
of the student model on the pair's dataset; the teacher row is the teacher runs the pair's students
name (tag ``teacher_run_id``; all vanilla runs of the teacher model where none does).

Only seeds of one experiment are averaged (``recipe``): a cell holds the runs of one config, their
logged params with the seed, storage and bookkeeping aside and, for a student, its teacher run's
config in place of the checkpoint. Where a method's runs in a column are of several configs, each
is a row of its own, labelled by the params that differ (``config_labels``: ``epochs=2``, ...). Runs
on part of the training split or on noisy labels are the studies', not the table's. ARI compares
only cells that train alike (``comparable``).

A rerun counts once (``select``): runs among those that compute the same training are one
experiment repeated, not another seed, and only the newest (by start time) counts. The same
training is the same tag ``config_sha256`` (``trainer.config_digest``: the whole config, seed
included, tracking settings aside); a run without that tag is compared by its logged config (its
params, tracking settings aside), and one with neither counts alone. A sweep run again with the
same search and base config is the same experiment too, even where its best trial came out
another config (ASHA, concurrency and GPU noise can pick another): its best trial (or seed run of
a seed) and the earlier sweep's are one result. Every run left out this way is listed, with the
run that counts instead, in ``report.md`` and in ``runs.csv``'s ``duplicates`` column. This holds
for the student row as well; the teacher row is the runs the students name, counted or not.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import re
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semckd_ray import tracking
from semckd_ray.cli import run_cli
from semckd_ray.errors import UserError

PAPER_FILE = Path(__file__).resolve().parent / "paper_results.json"
METRIC = "test_top1_at_best_val"
SCORE = "best_val_top1"  # what a sweep ranks its trials by
BASELINE_METHOD = "vanilla"
ROW_TITLES = {
    "student": "Student (vanilla)", "teacher": "Teacher (vanilla)", "kd": "KD", "fitnet": "FitNet", "at": "AT",
    "sp": "SP", "vid": "VID", "hkd": "HKD", "crd": "CRD", "semckd": "SemCKD",
}  # fmt: skip
ROW_ORDER = tuple(ROW_TITLES)  # the paper's order; other methods follow alphabetically, SemCKD stays last
# Figures: every panel is PANEL inches at DPI, so a figure's size in pixels follows from its panel grid.
PANEL = (4.0, 3.0)
DPI = 100
MAX_COLUMNS = 3


# ------------------------------------------------------------------------------------------
# Reading MLflow


@dataclass(frozen=True, order=True)
class Pair:
    dataset: str
    teacher: str
    student: str

    @property
    def name(self) -> str:
        return f"{self.teacher}->{self.student}"


@dataclass
class Result:
    """One counted run and its accuracy."""

    run: Any  # mlflow.entities.Run
    method: str
    model: str  # the trained network (the student; a vanilla run's own model)
    teacher: str
    dataset: str
    seed: str
    value: float
    sweep_id: str = ""  # the sweep it was chosen from; "" outside any sweep

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def started(self) -> tuple[int, int, str]:
        """What "newest" sorts by: start time, then end time, then run id (for a tie)."""
        info = self.run.info
        return (info.start_time or 0, info.end_time or 0, info.run_id)


@dataclass
class Rerun:
    """A run that does not count: it repeats the experiment of ``kept``, a newer run that counts."""

    dropped: Result
    kept: Result
    why: str


@dataclass
class Selection:
    results: list[Result]  # the runs that count
    reruns: list[Rerun]  # the runs left out as reruns of one of them


@dataclass
class Cell:
    """The runs of one experiment config (seeds aside) behind a table cell."""

    values: list[float] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)  # one per value, as logged ("" where a run logged none)
    params: dict[str, str] = field(default_factory=dict)  # the config the runs share (``recipe``)
    label: str = ""  # what sets it apart from the other configs of its row and pair ("" when alone)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds; NaN for a single run."""
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    @property
    def seeds_text(self) -> str:
        """The seeds, sorted, comma-separated (``"0,1,2"``); "" unless every run logged one."""
        if len(self.seeds) != len(self.values) or not all(self.seeds):
            return ""
        return ",".join(sorted(self.seeds, key=_natural))


def find_experiment(client, name: str):
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments())
        known = ", ".join(names[:30]) + (" ..." if len(names) > 30 else "") if names else "none"
        raise UserError(f"no MLflow experiment named {name!r} in this tracking store; experiments: {known}")
    return experiment


def all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def select_results(runs: list) -> list[Result]:
    """The runs that count (see the module docstring), in the order of ``runs``."""
    return select(runs).results


def select(runs: list) -> Selection:
    """The runs that count and the reruns left out (see the module docstring)."""
    by_id = {r.info.run_id: r for r in runs}
    parents = {r.info.run_id: r.data.tags.get(tracking.PARENT_RUN_TAG) for r in runs}
    has_children = {p for p in parents.values() if p}

    def is_best_trial(run) -> bool:
        """A trial that counts: its sweep's best or, in a grid sweep (a study: every combination is
        an experiment of its own, none a candidate among others), each trial trained to its end."""
        parent = by_id.get(parents[run.info.run_id])
        if parent is None or parent.data.tags.get("role") != "sweep":
            return False
        if parent.data.params.get("search.sampler") == "grid":
            return run.data.tags.get("stopped_early") != "true"
        return run.data.tags.get("best_trial") == "true"

    def sweep_of(run) -> str | None:
        """The sweep ``run`` counts for, "" outside any sweep; None when it does not count."""
        parent_id = parents[run.info.run_id]
        if parent_id is None:
            return ""
        if parent_id not in by_id:  # a trial whose sweep is gone: no way to tell whether it was the best
            return None
        if is_best_trial(run):  # several seeds: the seed runs count instead
            return parent_id if run.info.run_id not in has_children else None
        if is_best_trial(by_id[parent_id]):  # a seed run of the best trial
            return parents[parent_id]
        return None

    results = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        if (run.info.status != "FINISHED" or tags.get("role") not in ("teacher", "student")
                or not math.isfinite(metrics.get(METRIC, math.nan))):
            continue
        sweep_id = sweep_of(run)
        if sweep_id is None:
            continue
        results.append(Result(run, tags.get("method", ""), tags.get("student", ""), tags.get("teacher", ""),
                              tags.get("dataset", ""), run.data.params.get("seed", ""), metrics[METRIC],
                              sweep_id))
    return count_once(results, by_id)


# Params that do not change what a training computes: what trainer.config_digest leaves out.
_STORAGE_PARAMS = ("data.root", "data.download")


def _params_digest(params: dict[str, str], under: str = "") -> str | None:
    """The digest of a logged config, its tracking and storage settings aside (those under ``under``:
    a sweep logs its base config as ``base.*``); None when nothing is left."""

    def storage(key: str) -> bool:
        rest = key[len(under):] if key.startswith(under) else None
        return rest is not None and (rest.startswith("tracking.") or rest in _STORAGE_PARAMS)

    kept = {k: v for k, v in params.items() if not storage(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest() if kept else None


def identities(result: Result, by_id: dict[str, Any]) -> set[tuple[str, ...]]:
    """What makes two counted runs one experiment: a shared element.

    ``("config", sha)``: the run's ``config_sha256`` tag (its training); without the tag,
    ``("params", sha)``: its logged config. ``("sweep", sha, method, teacher, model, dataset, seed)``
    for a sweep's result: its sweep's logged search and base config (tracking settings aside) and
    the seed it trained. None of them for a run that logged neither tag nor params.
    """
    run = result.run
    keys: set[tuple[str, ...]] = set()
    digest = run.data.tags.get("config_sha256")
    if digest:
        keys.add(("config", digest))
    elif (logged := _params_digest(run.data.params)) is not None:
        keys.add(("params", logged))
    sweep = by_id.get(result.sweep_id) if result.sweep_id else None
    if sweep is not None and (searched := _params_digest(sweep.data.params, under="base.")) is not None:
        key = ("sweep", searched, result.method, result.teacher, result.model, result.dataset, result.seed)
        if sweep.data.params.get("search.sampler") == "grid":
            # Each trial of a grid sweep is an experiment of its own: the sweep run again pairs them
            # up by their searched values, which every rerun of the grid samples alike.
            key += tuple(f"{k}={v}" for k, v in sorted(run.data.tags.items()) if k.startswith("searched."))
        keys.add(key)
    return keys


_WHY = {"config": "same config_sha256", "params": "same logged config (no config_sha256 tag)",
        "sweep": "same sweep run again (same search and base config), same seed"}


def count_once(results: list[Result], by_id: dict[str, Any]) -> Selection:
    """Keep the newest of every group of ``results`` that share an identity (``identities``).

    Groups are closed under sharing: a standalone run and a sweep's best trial of its config, and
    that sweep run again, are one experiment. The newest run counts: a rerun follows a fix more
    often than not, and it is the one the code as it is now produced.
    """
    group = list(range(len(results)))  # union-find over the results

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    keys = [identities(r, by_id) for r in results]
    first: dict[tuple[str, ...], int] = {}
    for i, ks in enumerate(keys):
        for k in ks:
            if k in first:
                group[root(i)] = root(first[k])
            else:
                first[k] = i
    newest: dict[int, int] = {}
    for i, r in enumerate(results):
        g = root(i)
        if g not in newest or r.started > results[newest[g]].started:
            newest[g] = i
    counted, reruns = [], []
    for i, r in enumerate(results):
        kept = newest[root(i)]
        if kept == i:
            counted.append(r)
            continue
        shared = sorted({k[0] for k in keys[i] & keys[kept]})
        why = "; ".join(_WHY[k] for k in shared) or "the same experiment as another of its reruns"
        reruns.append(Rerun(r, results[kept], why))
    return Selection(counted, reruns)


# ------------------------------------------------------------------------------------------
# What experiment a run is: its config, seed aside


FRACTION, NOISE = "data.train_fraction", "data.label_noise"
STUDY_DEFAULTS = {FRACTION: 1.0, NOISE: 0.0}  # what a run that logged neither (an older run) trained on
# Params that leave what a training computes as it is, besides the seed: where it stores things, how
# often it checkpoints, its config's name, what a worker is given, how it evaluates in batches. The
# teacher checkpoint is replaced by its run's config (below): teachers of one config are seeds of it.
_NOT_RECIPE = ("seed", "name", "data.root", "data.download", "data.eval_batch_size", "teacher.checkpoint",
               "scaling.max_failures", "scaling.cpus_per_worker", "scaling.gpus_per_worker")
_NOT_RECIPE_PREFIXES = ("tracking.", "checkpoint.")
TEACHER_PREFIX = "teacher_run."  # a student's recipe holds its teacher run's recipe under this prefix
# Short names for the labels that tell configs apart; the keys of an alias say one thing, and the
# first of them that differs names it.
SHORT_NAMES = {"optim.epochs": "epochs", "optim.batch_size": "batch", "optim.batch_size_per_worker": "batch/worker",
               FRACTION: "fraction", NOISE: "noise", "optim.lr_decay_epochs": "lr decay at",
               "optim.warmup_epochs": "warmup", "optim.weight_decay": "wd", "teacher.checkpoint": "teacher checkpoint"}
ALIASES = {"beta": ("method.beta_effective", "method.beta"), "lr": ("optim.lr_effective", "optim.lr"),
           "workers": ("scaling.world_size", "scaling.num_workers")}
LABEL_ORDER = ("epochs", "beta", "workers", "batch", "fraction", "noise", "lr")
# What two cells must agree on to be compared (ARI): the training recipe, not the method.
_COMPARED_PREFIXES = ("optim.", "data.")
_COMPARED = ("scaling.num_workers", "scaling.world_size")


def _natural(text: str) -> tuple:
    """Sort key reading the numbers in ``text`` as numbers: "epochs=4" before "epochs=10"."""
    parts = re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", text)
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts) if p)


def study_value(run, key: str) -> float:
    """The run's ``data.train_fraction`` or ``data.label_noise``; a run that logged none: 1.0 / 0.0."""
    value = _as_number(run.data.params.get(key))
    return STUDY_DEFAULTS[key] if value is None else value


def is_study(run) -> bool:
    """Trained on part of the training split or on noisy labels: a study's run, not the main table's."""
    return study_value(run, FRACTION) < 1.0 or study_value(run, NOISE) > 0.0


def teacher_id(run) -> str:
    """The teacher run a student distilled from: its ``teacher_run_id`` tag, else its ``runs:/`` checkpoint."""
    tagged = run.data.tags.get("teacher_run_id")
    if tagged:
        return tagged
    checkpoint = run.data.params.get("teacher.checkpoint") or run.data.tags.get("teacher_checkpoint") or ""
    return checkpoint[len("runs:/"):].partition("/")[0] if checkpoint.startswith("runs:/") else ""


def recipe(run, lookup: dict[str, Any] | None = None) -> dict[str, str]:
    """The experiment config of ``run``: its logged params, seed and bookkeeping aside (``_NOT_RECIPE``).

    Seeds of one experiment share it; runs that differ in it are other experiments and are never
    averaged. ``data.train_fraction`` and ``data.label_noise`` are always in it (1.0 and 0.0 for a
    run that did not log them). A student's holds its teacher run's recipe under ``teacher_run.``
    (the teacher found in ``lookup`` by ``teacher_id``), else its ``teacher.checkpoint``.
    """
    params = {k: v for k, v in run.data.params.items()
              if k not in _NOT_RECIPE and not k.startswith(_NOT_RECIPE_PREFIXES)}
    for key in STUDY_DEFAULTS:
        params[key] = str(study_value(run, key))
    tid = teacher_id(run)
    teacher = (lookup or {}).get(tid) if tid else None
    if teacher is not None:
        params.update({TEACHER_PREFIX + k: v for k, v in recipe(teacher).items()})
    elif run.data.params.get("teacher.checkpoint") not in (None, "", "None"):
        params["teacher.checkpoint"] = run.data.params["teacher.checkpoint"]
    return params


def recipe_digest(params: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def short_name(key: str) -> str:
    if key.startswith(TEACHER_PREFIX):
        return "teacher " + short_name(key[len(TEACHER_PREFIX):])
    for name, keys in ALIASES.items():
        if key in keys:
            return name
    if key in SHORT_NAMES:
        return SHORT_NAMES[key]
    if key.startswith("method.options."):
        return key[len("method.options."):]
    head, _, rest = key.partition(".")
    return rest if rest and head in ("optim", "method", "data", "scaling") else key


def _alias_rank(key: str) -> int | None:
    bare = key[len(TEACHER_PREFIX):] if key.startswith(TEACHER_PREFIX) else key
    return next((keys.index(bare) for keys in ALIASES.values() if bare in keys), None)


def _label_order(item: tuple[str, str]) -> tuple:
    name = item[0]
    teacher = name.startswith("teacher ")
    bare = name[len("teacher "):] if teacher else name
    return (teacher, LABEL_ORDER.index(bare) if bare in LABEL_ORDER else len(LABEL_ORDER), bare)


def _named(keys: list[str]) -> list[tuple[str, str]]:
    """(short name, key) for ``keys``: an alias once (its first key there), the batch per worker only
    without the batch and the workers (it follows from them), full names where two short names clash."""
    by_name: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        by_name[short_name(key)].append(key)
    shown: list[tuple[str, str]] = []
    for name, named in by_name.items():
        if len(named) == 1:
            shown.append((name, named[0]))
        elif all(_alias_rank(k) is not None for k in named):
            shown.append((name, min(named, key=_alias_rank)))
        else:
            shown.extend((k, k) for k in named)
    names = {name for name, _ in shown}
    for prefix in ("", "teacher "):
        if names & {prefix + "batch", prefix + "workers"}:
            shown = [(n, k) for n, k in shown if n != prefix + "batch/worker"]
    return sorted(shown, key=_label_order)


def label_keys(configs: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(short name, key) of the params that tell ``configs`` apart, as their labels show them.

    Every param that differs (one that a config did not log shows as ``unset``), the teacher's
    among them where all logged it; of the teacher params only some logged (a teacher run found for
    some students only), where the others do not tell the configs apart, the fewest, the common
    ones (epochs, beta, ...) first. ``method.options`` (``{}`` where empty) gives way to its keys.
    """
    keys = sorted({k for c in configs for k in c})
    differing = [k for k in keys if len({c.get(k) for c in configs}) > 1]
    teachers = (TEACHER_PREFIX, "teacher.checkpoint")  # the teacher run's config, or its checkpoint without it
    chosen = [k for k in differing if not k.startswith(teachers) or all(k in c for c in configs)]
    if any(k.startswith("method.options.") for k in chosen):
        chosen = [k for k in chosen if k != "method.options"]

    def distinct(ks: list[str]) -> int:
        return len({tuple(c.get(k) for k in ks) for c in configs})

    target = distinct(differing)
    for key in sorted((k for k in differing if k not in chosen), key=lambda k: (_label_order((short_name(k), k)), k)):
        if distinct(chosen) == target:
            break
        if distinct([*chosen, key]) > distinct(chosen):
            chosen.append(key)
    return _named(chosen)


def merged_label_keys(lists: list[list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """The union of several ``label_keys``, a short name once: what labels a row's configs in every column."""
    shown: dict[str, str] = {}
    for name, key in (item for keys in lists for item in keys):
        shown.setdefault(name, key)
    return sorted(shown.items(), key=_label_order)


def _value_text(value: str | None) -> str:
    if value is None:
        return "unset"
    return value if len(value) <= 24 else value[:23] + "…"


def config_labels(configs: list[dict[str, str]], shown: list[tuple[str, str]] | None = None) -> list[str]:
    """One label per config, saying what sets it apart (``epochs=2, beta=50.0``): the params of ``shown``
    (default: ``label_keys(configs)``); "" for a config alone."""
    if shown is None:
        if len(configs) < 2:
            return [""] * len(configs)
        shown = label_keys(configs)
    labels = [", ".join(f"{name}={_value_text(c.get(key))}" for name, key in shown) for c in configs]
    for i, label in enumerate(labels):  # never two alike (a difference a label cannot show)
        if labels.count(label) > 1 or (not label and len(configs) > 1):
            labels[i] = f"{label + ', ' if label else ''}config {recipe_digest(configs[i])[:8]}"
    return labels


@dataclass
class Group:
    """Items (runs) of one recipe, and what sets it apart from the other groups it was split from."""

    label: str
    params: dict[str, str]
    items: list[Any]


def group_by_recipe(items: list, params_of) -> list[tuple[dict[str, str], list]]:
    """``items`` by the digest of ``params_of(item)``, in the order first seen."""
    groups: dict[str, tuple[dict[str, str], list]] = {}
    for item in items:
        params = params_of(item)
        groups.setdefault(recipe_digest(params), (params, []))[1].append(item)
    return list(groups.values())


def labelled(groups: list[tuple[dict[str, str], list]], shown: list[tuple[str, str]] | None = None) -> list[Group]:
    """Each group with its label (``config_labels``), in the labels' natural order."""
    labels = config_labels([params for params, _ in groups], shown)
    return sorted((Group(label, params, items) for label, (params, items) in zip(labels, groups)),
                  key=lambda g: _natural(g.label))


def _cell(group: Group) -> Cell:
    rs = group.items
    return Cell([r.value for r in rs], [r.run_id for r in rs], [r.seed for r in rs], group.params, group.label)


def comparable(a: dict[str, str], b: dict[str, str]) -> bool:
    """Whether two configs train alike (``optim.*``, ``data.*``, the workers) where both logged the key."""
    return all(a[k] == b[k] for k in a.keys() & b.keys() if k.startswith(_COMPARED_PREFIXES) or k in _COMPARED)


# ------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True, order=True)
class Row:
    """A row of the table: a method ("student", "teacher", or a method name) and the config's label."""

    method: str
    label: str = ""

    @property
    def title(self) -> str:
        base = ROW_TITLES.get(self.method, self.method)
        if not self.label:
            return base
        return f"{base[:-1]}, {self.label})" if base.endswith(")") else f"{base} ({self.label})"


def _as_row(row: Row | str) -> Row:
    return row if isinstance(row, Row) else Row(row)


def _row_order(row: Row) -> tuple:
    m = row.method
    return (m == "semckd", ROW_ORDER.index(m) if m in ROW_ORDER else 99, m, _natural(row.label))


@dataclass
class Table:
    pairs: list[Pair]
    rows: list[Row]  # "student", "teacher", then methods; a method once per config label it has
    cells: dict[tuple[Row, Pair], Cell]
    paper: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # which teacher runs the teacher row is, where it needs saying
    row_of: dict[tuple[str, Pair], Row] = field(default_factory=dict)  # (run id, pair) -> the row it counts in

    def __post_init__(self):
        self.rows = [_as_row(r) for r in self.rows]
        self.cells = {(_as_row(r), p): c for (r, p), c in self.cells.items()}

    classes: dict[Pair, set[float]] = field(default_factory=dict)  # the class counts the column's runs logged

    def paper_source(self, pair: Pair) -> dict[str, Any] | None:
        """The published table with ``pair``'s column: CIFAR-100's (the main one), or another table of
        ``paper["other_tables"]`` (ImageNet: a folder tree) where every run of the column logged its
        ``num_classes`` (``data_classes``): an ``imagefolder`` of other classes is not ImageNet."""
        if pair.dataset == self.paper["dataset"]:
            return self.paper
        for other in self.paper.get("other_tables", ()):
            if (pair.dataset == other["dataset"] and pair.name in other["pairs"]
                    and self.classes.get(pair) == {float(other["num_classes"])}):
                return other
        return None

    def paper_cell(self, row: Row | str, pair: Pair) -> dict[str, float] | None:
        source = self.paper_source(pair)
        return None if source is None else source["rows"].get(_as_row(row).method, {}).get(pair.name)

    @property
    def has_paper_pairs(self) -> bool:
        return any(p.dataset == self.paper["dataset"] and p.name in self.paper["pairs"] for p in self.pairs)

    def means(self, row: Row | str) -> dict[Pair, float]:
        row = _as_row(row)
        return {p: c.mean for (r, p), c in self.cells.items() if r == row and c.values}

    def cells_of(self, method: str, pair: Pair) -> list[Cell]:
        """The cells of every config of ``method`` in ``pair``'s column."""
        return [c for (r, p), c in self.cells.items() if r.method == method and p == pair and c.values]


def load_paper() -> dict[str, Any]:
    return json.loads(PAPER_FILE.read_text())


def build_table(results: list[Result], paper: dict[str, Any], lookup: dict[str, Any] | None = None) -> Table:
    """The comparison table of ``results`` (study runs aside: ``is_study``), one cell per config.

    ``lookup`` maps run ids to runs (every run of the experiment, and the teachers named from
    elsewhere): where the teacher row's runs and the students' teachers' configs come from.
    """
    lookup = {r.run_id: r.run for r in results} if lookup is None else lookup
    recipes: dict[str, dict[str, str]] = {}

    def recipe_of(r: Result) -> dict[str, str]:
        if r.run_id not in recipes:
            recipes[r.run_id] = recipe(r.run, lookup)
        return recipes[r.run_id]

    by_cell: dict[tuple[str, Pair], list[Result]] = defaultdict(list)
    vanilla: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in results:
        if is_study(r.run):
            continue
        if r.method == BASELINE_METHOD:
            vanilla[r.dataset, r.model].append(r)
        else:
            by_cell[r.method, Pair(r.dataset, r.teacher, r.model)].append(r)
    paper_order = {name: i for i, name in enumerate(paper["pairs"])}
    pairs = sorted({p for _, p in by_cell}, key=lambda p: (p.dataset != paper["dataset"],
                                                           paper_order.get(p.name, len(paper_order)), p))
    table = Table(pairs, [], {}, paper)
    for (_, pair), rs in by_cell.items():
        table.classes.setdefault(pair, set()).update(r.run.data.metrics.get("data_classes", math.nan) for r in rs)

    def place(method: str, cells: dict[Pair, list[Result]]) -> None:
        """The cells of a row's method: where a column has several configs, every column's are labelled
        by what differs there, so that a row is one config across the columns."""
        grouped = {pair: group_by_recipe(rs, recipe_of) for pair, rs in cells.items() if rs}
        shown = merged_label_keys([label_keys([p for p, _ in groups]) for groups in grouped.values()
                                   if len(groups) > 1])
        for pair, groups in grouped.items():
            for group in labelled(groups, shown or None):
                row = Row(method, group.label)
                table.cells[row, pair] = _cell(group)
                for r in group.items:
                    table.row_of[r.run_id, pair] = row

    for method in dict.fromkeys(m for m, _ in by_cell):
        place(method, {p: rs for (m, p), rs in by_cell.items() if m == method})
    place("student", {pair: vanilla.get((pair.dataset, pair.student), []) for pair in pairs})
    place("teacher", {pair: _teachers(table, pair, [r for (_, p), rs in by_cell.items() if p == pair for r in rs],
                                      lookup, vanilla) for pair in pairs})
    rows = set(r for r, _ in table.cells)
    methods = {"student", "teacher"}
    for pair in pairs:  # the paper's rows, for context, where a column is the paper's
        source = table.paper_source(pair)
        if source is not None and pair.name in source["pairs"]:
            methods |= set(source["rows"])
    rows |= {Row(m) for m in methods if not any(r.method == m for r in rows)}
    table.rows = sorted(rows, key=_row_order)
    return table


def _teachers(table: Table, pair: Pair, students: list[Result], lookup: dict[str, Any],
              vanilla: dict[tuple[str, str], list[Result]]) -> list[Result]:
    """The teacher row's runs of ``pair``: those its students name (``teacher_id``), noted in ``table.notes``.

    Where no student names its teacher (older runs), every vanilla run of the teacher's model.
    """
    where = f"{pair.name} ({pair.dataset})"
    named: dict[str, list[Result]] = defaultdict(list)
    unnamed = []
    for s in students:
        tid = teacher_id(s.run)
        (named[tid] if tid else unnamed).append(s)
    if not named:
        table.notes.append(f"{where}: no student run names its teacher run (tag `teacher_run_id`); the teacher "
                           f"row is every vanilla {pair.teacher} run on {pair.dataset}.")
        return vanilla.get((pair.dataset, pair.teacher), [])

    def users(rs: list[Result]) -> str:
        rows: dict[str, list[str]] = defaultdict(list)
        for r in rs:
            rows[table.row_of[r.run_id, pair].title].append(r.seed or "?")
        return "; ".join(f"{title} seed{'s' * (len(s) > 1)} {','.join(sorted(s, key=_natural))}"
                         for title, s in sorted(rows.items()))

    found = []
    for tid, rs in sorted(named.items()):
        run = lookup.get(tid)
        value = run.data.metrics.get(METRIC, math.nan) if run is not None else math.nan
        if run is None or not math.isfinite(value):
            why = "is not in this tracking store" if run is None else f"has no `{METRIC}`"
            table.notes.append(f"{where}: teacher run `{tid}` ({users(rs)}) {why}; the teacher row leaves it out.")
            continue
        found.append(Result(run, BASELINE_METHOD, run.data.tags.get("student", pair.teacher), "",
                            run.data.tags.get("dataset", pair.dataset), run.data.params.get("seed", ""), value))
    if len(named) > 1:
        table.notes.append(f"{where}: the students distilled from {len(named)} teacher runs: "
                           + "; ".join(f"`{tid}` ({users(rs)})" for tid, rs in sorted(named.items())) + ".")
    if unnamed:
        table.notes.append(f"{where}: {len(unnamed)} student run(s) name no teacher run (no `teacher_run_id`): "
                           f"{users(unnamed)}.")
    return found


def average_relative_improvement(semckd: dict, method: dict, student: dict) -> tuple[float, int]:
    """ARI of SemCKD over a method, in %: mean over pairs of (SemCKD - method) / (method - student).

    The SemCKD paper's definition; each argument maps a pair to its mean accuracy. Pairs where any
    of the three is missing, or where the method equals the student (division by zero), are left out.
    Returns (ARI, number of pairs used); NaN with no pair.
    """
    ratios = [(semckd[p] - method[p]) / (method[p] - student[p])
              for p in semckd if p in method and p in student and method[p] != student[p]]
    return (100.0 * statistics.fmean(ratios), len(ratios)) if ratios else (math.nan, 0)


def ari_cells(table: Table, method: str, pair: Pair) -> tuple[Cell, Cell, Cell] | str:
    """The SemCKD, ``method`` and student cells of ``pair`` that ARI compares, or why there are none.

    Comparable cells train alike (``comparable``: epochs, batch, data, workers); of the configs in the
    column, exactly one such choice must exist: "missing" (a row has no run), "not comparable" (no
    choice trains alike) or "ambiguous" (several do) otherwise.
    """
    cells = [table.cells_of(m, pair) for m in ("semckd", method, "student")]
    if not all(cells):
        return "missing"
    choices = [(s, m, b) for s in cells[0] for m in cells[1] for b in cells[2]
               if comparable(s.params, m.params) and comparable(s.params, b.params) and comparable(m.params, b.params)]
    if len(choices) == 1:
        return choices[0]
    return "ambiguous" if choices else "not comparable"


def ari_rows(table: Table) -> list[dict[str, Any]]:
    rows = []
    for method in dict.fromkeys(r.method for r in table.rows):
        if method in ("student", "teacher", "semckd"):
            continue
        semckd, ours, student = {}, {}, {}
        left_out = []
        for pair in table.pairs:
            chosen = ari_cells(table, method, pair)
            if isinstance(chosen, str):
                if chosen != "missing":
                    left_out.append(f"{pair.name} ({chosen})")
                continue
            semckd[pair], ours[pair], student[pair] = (c.mean for c in chosen)
        ari, n = average_relative_improvement(semckd, ours, student)
        rows.append({"method": method, "ari_percent": ari, "pairs": n, "pairs_left_out": "; ".join(left_out),
                     "paper_ari_percent": table.paper["ari_percent"].get(method, math.nan)
                     if table.has_paper_pairs else math.nan})
    return rows


# ------------------------------------------------------------------------------------------
# Formatting


def _num(value: float | None, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if value is not None and math.isfinite(value) else ""


def _mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.2f} ± {std:.2f}" if std is not None and math.isfinite(std) else f"{mean:.2f}"


def cell_summary(cell: Cell | None) -> str:
    """``73.40 ± 0.20 (n=3: 0,1,2)``: mean ± std, the number of runs and their seeds; "–" without a run."""
    if cell is None or not cell.values:
        return "–"
    seeds = cell.seeds_text
    return f"{_mean_std(cell.mean, cell.std)} (n={len(cell.values)}{': ' + seeds if seeds else ''})"


def cell_text(table: Table, row: Row | str, pair: Pair) -> str:
    ours = cell_summary(table.cells.get((_as_row(row), pair)))
    paper = table.paper_cell(row, pair)
    return ours if paper is None else f"{ours} · paper {_mean_std(paper['mean'], paper['std'])}"


def _ari_text(a: dict[str, Any]) -> str:
    text = f"{_num(a['ari_percent'])}% ({a['pairs']} pair{'s' * (a['pairs'] > 1)})" if a["pairs"] else "–"
    if a.get("pairs_left_out"):
        text += f", left out: {a['pairs_left_out']}"
    if math.isfinite(a["paper_ari_percent"]):
        text += f" · paper {a['paper_ari_percent']:.2f}%"
    return text


def markdown_table(table: Table, ari: list[dict[str, Any]]) -> str:
    """Rows methods (a method once per config where a column has several), columns pairs, ARI last.

    A method's ARI stands on its first row.
    """
    ari_by_method = {a["method"]: a for a in ari}
    several_datasets = len({p.dataset for p in table.pairs}) > 1
    header = ["Method", *(p.name + (f" ({p.dataset})" if several_datasets else "") for p in table.pairs), "ARI"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    finite = [a["ari_percent"] for a in ari if a["pairs"]]
    seen: set[str] = set()
    for row in table.rows:
        first = row.method not in seen
        seen.add(row.method)
        a = ari_by_method.get(row.method)
        if not first:
            ari_text = ""
        elif row.method == "semckd":
            ari_text = f"avg {statistics.fmean(finite):.2f}%" if finite else "–"
            if table.has_paper_pairs:
                ari_text += f" · paper avg {table.paper['ari_average_percent']:.2f}%"
        else:
            ari_text = "" if a is None else _ari_text(a)
        title = f"**{row.title}**" if row.method == "semckd" else row.title
        lines.append("| " + " | ".join([title, *(cell_text(table, row, p) for p in table.pairs), ari_text]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Figures


def _figure(panels: int):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    columns = min(MAX_COLUMNS, panels)
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(PANEL[0] * columns, PANEL[1] * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def figure_size(panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure with ``panels`` panels."""
    columns = min(MAX_COLUMNS, panels)
    return round(PANEL[0] * columns * DPI), round(PANEL[1] * math.ceil(panels / columns) * DPI)


def curve_keys(runs: list) -> list[str]:
    """Validation top-1, then every loss term the runs logged (``train_<term>``, total last)."""
    losses = {k for r in runs for k in r.data.metrics
              if k.startswith("train_") and k not in ("train_top1", "train_top5", "train_steps")}
    return ["val_top1", *sorted(losses, key=lambda k: (k == "train_total", k))]


def plot_curves(client, results: list[Result], title: str, path: Path,
                labels: dict[str, str] | None = None) -> Path:
    """One panel per ``curve_keys``; a colour per method (or vanilla model), a line style per run of it.

    ``labels``: a run's legend entry (its row, config label included) by run id; by default its method.
    """
    from matplotlib.ticker import MaxNLocator

    keys = curve_keys([r.run for r in results])
    fig, axes = _figure(len(keys))
    colors: dict[str, str] = {}
    drawn: dict[str, int] = defaultdict(int)
    order = {row: i for i, row in enumerate(ROW_ORDER)}
    for r in sorted(results, key=lambda r: (order.get(r.method, len(order)), r.model, (labels or {}).get(r.run_id, ""),
                                            _natural(r.seed))):
        label = ROW_TITLES.get(r.method, r.method) if r.method != BASELINE_METHOD else f"{r.model} (vanilla)"
        label = (labels or {}).get(r.run_id, label)
        style = dict(color=colors.setdefault(label, f"C{len(colors) % 10}"), marker=".",
                     linestyle=("-", "--", ":", "-.")[drawn[label] % 4], label=f"{label} seed {r.seed}")
        drawn[label] += 1
        for ax, key in zip(axes, keys):
            history = sorted({m.step: m.value for m in client.get_metric_history(r.run_id, key)}.items())
            if history:
                ax.plot(*zip(*history), **style)
    for ax, key in zip(axes, keys):
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=DPI)
    return path


SWEEP_TITLE = "score: best validation top-1 over the epochs each trial trained"
SWEEP_MARKERS = ("o", "s", "^", "v", "D", "P", "X")


@dataclass
class SweepPoint:
    """One scored trial of a sweep, as ``plot_sweep`` draws it."""

    run_id: str
    searched: dict[str, str]  # searched key -> the trial's value, as tagged (``searched.<key>``)
    score: float  # SCORE: the best validation top-1 over the epochs it trained
    epochs: int | None  # epochs it trained (its ``epoch`` metric); None if it logged none
    label: str  # its legend entry: how many epochs, and why not all of them
    best: bool


def epochs_label(trial, sweep) -> str:
    """``"8 epochs (all)"``, ``"2 epochs (stopped by ASHA)"``, ...: how long a trial trained, and why.

    All of them: its ``epoch`` metric reached its ``optim.epochs`` (or the sweep's
    ``base.optim.epochs``). Fewer: the tag ``stopped_early`` (the scheduler stopped it),
    ``stopped_reason`` (its loss diverged), else its run's status.
    """
    epoch = trial.data.metrics.get("epoch")
    if epoch is None or not math.isfinite(epoch):
        return "epochs not logged"
    epochs = int(epoch)
    text = f"{epochs} epoch{'s' * (epochs != 1)}"
    planned = _as_number(trial.data.params.get("optim.epochs", sweep.data.params.get("base.optim.epochs")))
    if "stopped_reason" in trial.data.tags:
        return f"{text} (diverged)"
    if planned is not None and epochs >= planned:
        return f"{text} (all)"
    if trial.data.tags.get("stopped_early") == "true":
        scheduler = sweep.data.params.get("scheduler", sweep.data.params.get("search.scheduler.type"))
        return f"{text} (stopped by ASHA)" if scheduler == "asha" else f"{text} (stopped early)"
    if trial.info.status != "FINISHED":
        return f"{text} ({trial.info.status.lower()})"
    return text


def sweep_points(sweep, trials: list) -> list[SweepPoint]:
    """The scored trials of ``sweep``, longest-trained first."""
    points = []
    for t in trials:
        score = t.data.metrics.get(SCORE, math.nan)
        if not math.isfinite(score):
            continue
        epoch = t.data.metrics.get("epoch")
        points.append(SweepPoint(
            t.info.run_id, {k[len("searched."):]: v for k, v in t.data.tags.items() if k.startswith("searched.")},
            score, int(epoch) if epoch is not None and math.isfinite(epoch) else None, epochs_label(t, sweep),
            t.data.tags.get("best_trial") == "true"))
    return sorted(points, key=lambda p: (-(p.epochs if p.epochs is not None else -1), p.label, p.run_id))


def sweep_figure(sweep, trials: list):
    """The figure of ``plot_sweep``, or None with nothing to draw."""
    points = sweep_points(sweep, trials)
    keys = sorted({k for p in points for k in p.searched})
    if not keys or not points:
        return None
    labels = list(dict.fromkeys(p.label for p in points))  # longest-trained first
    styles = {label: dict(color=f"C{i % 10}", marker=SWEEP_MARKERS[i % len(SWEEP_MARKERS)])
              for i, label in enumerate(labels)}
    fig, axes = _figure(len(keys))
    params = sweep.data.params
    handles: dict[str, Any] = {}
    for ax, key in zip(axes, keys):
        shown = [p for p in points if key in p.searched]
        xs = [_as_number(p.searched[key]) for p in shown]
        if any(x is None for x in xs):  # a choice among names: one position per value
            names = sorted({p.searched[key] for p in shown})
            xs = [names.index(p.searched[key]) for p in shown]
            ax.set_xticks(range(len(names)), names)
        elif params.get(f"search.space.{key}.type") == "loguniform" or key.endswith("beta"):
            ax.set_xscale("log")
        for label in labels:
            group = [(x, p.score) for x, p in zip(xs, shown) if p.label == label]
            if group:
                handles[label] = ax.scatter(*zip(*group), label=label, **styles[label])
        best = [(x, p.score) for x, p in zip(xs, shown) if p.best]
        if best:
            handles["best trial"] = ax.scatter(*zip(*best), facecolors="none", edgecolors="C3", marker="*",
                                               s=260, linewidths=1.2, label="best trial")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{SCORE} (%)")
        ax.grid(alpha=0.3)
    ordered = [label for label in [*labels, "best trial"] if label in handles]
    axes[0].legend([handles[label] for label in ordered], ordered, fontsize=7)
    fig.suptitle(f"sweep {sweep.info.run_name}: {len(points)} trials\n{SWEEP_TITLE}", fontsize=8)
    return fig


def plot_sweep(client, sweep, trials: list, path: Path) -> Path | None:
    """Score (best validation top-1) against each searched value, one panel per searched key.

    Each point is a trial, its colour and marker saying how many epochs it trained (``epochs_label``:
    a trial ASHA stopped early scored over fewer epochs than one that trained them all); a star
    rings the best trial.
    """
    fig = sweep_figure(sweep, trials)
    if fig is None:
        return None
    fig.savefig(path, dpi=DPI)
    return path


def _as_number(value: str | None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def final_attention(results: list[Result]):
    """SemCKD's validation attention at the last epoch (``attn_s{i}_t{j}``), averaged over ``results``."""
    import torch

    maps = []
    for r in results:
        entries = {tuple(int(x[1:]) for x in k[len("attn_"):].split("_")): v
                   for k, v in r.run.data.metrics.items() if k.startswith("attn_s")}
        if entries:
            s, t = (max(i for i, _ in entries) + 1, max(j for _, j in entries) + 1)
            maps.append(torch.tensor([[entries.get((i, j), math.nan) for j in range(t)] for i in range(s)],
                                     dtype=torch.float64))
    if not maps or len({m.shape for m in maps}) != 1:
        return None
    return torch.stack(maps).mean(0)


# ------------------------------------------------------------------------------------------
# Studies: few-shot and label noise, transfer, and Optuna's view of a sweep


def pair_title(pair: Pair) -> str:
    """``resnet14->resnet8``; a model trained without a teacher by its name alone."""
    return pair.name if pair.teacher else pair.student


@dataclass
class StudyLine:
    """One method and config of a pair, at every value of the study's param it trained with."""

    pair: Pair
    row: Row
    points: dict[float, Cell]  # the param's value -> the runs at it


@dataclass
class Study:
    key: str  # FRACTION or NOISE
    name: str  # "few-shot", "label noise"
    pairs: list[Pair]
    lines: list[StudyLine]

    @property
    def values(self) -> list[float]:
        return sorted({v for line in self.lines for v in line.points})


STUDIES = {FRACTION: ("few-shot", "fraction of the training split", "fewshot"),
           NOISE: ("label noise", "label noise rate", "label_noise")}


def build_study(results: list[Result], key: str, lookup: dict[str, Any]) -> Study | None:
    """The runs of a study on ``key`` (``data.train_fraction`` or ``data.label_noise``), None without one.

    Every counted run is a point at its value of ``key`` (1.0 / 0.0 for a run without it); a line is
    a method of a pair (the vanilla student runs of the pair's student included) at one config, that
    param aside; only lines with a point away from the default (fraction < 1, noise > 0) are drawn,
    and with their default point as the reference.
    """
    default = STUDY_DEFAULTS[key]

    def recipe_of(r: Result) -> dict[str, str]:
        params = recipe(r.run, lookup)
        params.pop(key, None)
        return params

    panels: dict[Pair, dict[str, list[Result]]] = defaultdict(lambda: defaultdict(list))
    students = [r for r in results if r.method != BASELINE_METHOD]
    pairs = {Pair(r.dataset, r.teacher, r.model) for r in students}
    for r in students:
        panels[Pair(r.dataset, r.teacher, r.model)][r.method].append(r)
    for r in results:
        if r.method == BASELINE_METHOD:
            for pair in [p for p in pairs if (p.dataset, p.student) == (r.dataset, r.model)] or [
                    Pair(r.dataset, "", r.model)]:
                panels[pair]["student"].append(r)
    lines = []
    for pair, methods in panels.items():
        for method, rs in methods.items():
            groups = [(params, items) for params, items in group_by_recipe(rs, recipe_of)
                      if any(study_value(r.run, key) != default for r in items)]
            for group in labelled(groups):
                at: dict[float, list[Result]] = defaultdict(list)
                for r in group.items:
                    at[study_value(r.run, key)].append(r)
                points = {v: _cell(Group(group.label, group.params, at[v])) for v in sorted(at)}
                lines.append(StudyLine(pair, Row(method, group.label), points))
    if not lines:
        return None
    lines.sort(key=lambda line: (line.pair, _row_order(line.row)))
    return Study(key, STUDIES[key][0], sorted({line.pair for line in lines}), lines)


def study_figure(study: Study):
    """Test top-1 against the study's param, a panel per pair, a line per method (error bars: std)."""
    fig, axes = _figure(len(study.pairs))
    for ax, pair in zip(axes, study.pairs):
        for line in (line for line in study.lines if line.pair == pair):
            xs = sorted(line.points)
            ys = [line.points[x].mean for x in xs]
            err = [line.points[x].std if math.isfinite(line.points[x].std) else 0.0 for x in xs]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=line.row.title)
        ax.set_title(f"{pair_title(pair)} ({pair.dataset})", fontsize=10)
        ax.set_xlabel(STUDIES[study.key][1])
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{study.name}: {METRIC},\nmean ± std over seeds", fontsize=9)
    return fig


def _value_header(study: Study, value: float) -> str:
    return f"{short_name(study.key)} {value:g}"


def study_markdown(study: Study, figure: Path | None) -> list[str]:
    """Few-shot: a table per pair, methods as rows and fractions as columns; label noise: noise rates
    as rows and methods side by side."""
    param = f"`{study.key}`"
    what = ("trained on part of the training split" if study.key == FRACTION else
            "trained with that fraction of the training labels made noisy")
    lines = [f"## {study.name[0].upper() + study.name[1:]}", "",
             f"Runs {what} ({param}; a run that did not log it counts as "
             f"{STUDY_DEFAULTS[study.key]:g}), beside the runs at {STUDY_DEFAULTS[study.key]:g} of the same config "
             f"as the reference. Cells: `{METRIC}`, mean ± std over seeds (n: seeds). Rows that differ in more "
             "than this param are kept apart and labelled by what differs.", ""]
    for pair in study.pairs:
        mine = [line for line in study.lines if line.pair == pair]
        values = sorted({v for line in mine for v in line.points})
        lines += [f"### {pair_title(pair)} ({pair.dataset})", ""]
        if study.key == FRACTION:
            header = ["Method", *(_value_header(study, v) for v in values)]
            body = [[line.row.title, *(cell_summary(line.points.get(v)) for v in values)] for line in mine]
        else:
            header = [short_name(study.key), *(line.row.title for line in mine)]
            body = [[f"{v:g}", *(cell_summary(line.points.get(v)) for line in mine)] for v in values]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                  *("| " + " | ".join(cells) + " |" for cells in body), ""]
    if figure is not None:
        lines += [f"![{study.name}]({figure.name})", ""]
    return lines


def _study_lines(study: Study) -> list[dict[str, Any]]:
    return [{"dataset": line.pair.dataset, "pair": pair_title(line.pair), "teacher": line.pair.teacher,
             "student": line.pair.student, "row": line.row.method, "config": line.row.label, study.key: f"{v:g}",
             "n": len(c.values), "seeds": " ".join(sorted(c.seeds, key=_natural)), "mean": _num(c.mean, 4),
             "std": _num(c.std, 4), "run_ids": " ".join(c.run_ids)}
            for line in study.lines for v, c in line.points.items()]


TRANSFER_METRICS = (METRIC, "test_top1")  # the headline, then the last epoch's


@dataclass
class Transfer:
    """Transfer runs (tag role=transfer) by the student they evaluate: rows students, columns datasets."""

    datasets: list[str]
    rows: list[tuple[Pair, Row]]
    cells: dict[tuple[Pair, Row, str], dict[str, Cell]]  # metric -> its cell
    student_ids: dict[tuple[Pair, Row, str], list[str]]
    notes: list[str] = field(default_factory=list)


def build_transfer(runs: list, lookup: dict[str, Any]) -> Transfer | None:
    """The transfer table: finished runs tagged role=transfer, each evaluating the training run of its
    ``student_run_id`` tag on its ``transfer_dataset``; None without one.

    A row is a student's method, pair and config (its seeds are the cell's runs, split like the main
    table); one transfer run counts per student and dataset (the newest).
    """
    newest: dict[tuple[str, str], Any] = {}
    for run in runs:
        tags = run.data.tags
        if (tags.get("role") != "transfer" or run.info.status != "FINISHED"
                or not math.isfinite(run.data.metrics.get(METRIC, math.nan))):
            continue
        k = (tags.get("student_run_id", ""), tags.get("transfer_dataset", "?"))
        started = (run.info.start_time or 0, run.info.end_time or 0, run.info.run_id)
        if k not in newest or started > (newest[k].info.start_time or 0, newest[k].info.end_time or 0,
                                         newest[k].info.run_id):
            newest[k] = run
    if not newest:
        return None
    notes = []
    items: list[tuple[Result, str, Any]] = []  # (the student, the transfer dataset, the transfer run)
    for (sid, dataset), run in sorted(newest.items()):
        student = lookup.get(sid)
        if student is None:
            notes.append(f"transfer run `{run.info.run_id}` ({dataset}) names student run `{sid or '?'}`, which is "
                         "not in this tracking store; left out.")
            continue
        tags = student.data.tags
        items.append((Result(student, tags.get("method", ""), tags.get("student", ""), tags.get("teacher", ""),
                             tags.get("dataset", ""), student.data.params.get("seed", ""), math.nan), dataset, run))
    by_pair: dict[tuple[Pair, str], list] = defaultdict(list)
    for item in items:
        s = item[0]
        vanilla = s.method == BASELINE_METHOD
        by_pair[Pair(s.dataset, "" if vanilla else s.teacher, s.model), "student" if vanilla else s.method].append(item)
    table = Transfer([], [], {}, {}, notes)
    recipes: dict[str, dict[str, str]] = {}
    for (pair, method), group_items in by_pair.items():
        def recipe_of(item) -> dict[str, str]:
            sid = item[0].run_id
            return recipes.setdefault(sid, recipe(item[0].run, lookup))

        for group in labelled(group_by_recipe(group_items, recipe_of)):
            row = Row(method, group.label)
            table.rows.append((pair, row))
            for s, dataset, run in group.items:
                cells = table.cells.setdefault((pair, row, dataset), {m: Cell() for m in TRANSFER_METRICS})
                for metric, cell in cells.items():
                    value = run.data.metrics.get(metric, math.nan)
                    if math.isfinite(value):
                        cell.values.append(value)
                        cell.run_ids.append(run.info.run_id)
                        cell.seeds.append(s.seed)
                table.student_ids.setdefault((pair, row, dataset), []).append(s.run_id)
    table.rows.sort(key=lambda pr: (pr[0], _row_order(pr[1])))
    table.datasets = sorted({d for _, _, d in table.cells})
    return table


def transfer_markdown(transfer: Transfer) -> list[str]:
    lines = ["## Transfer", "",
             f"Each trained student evaluated on another dataset by a transfer run (tag `role=transfer`, "
             f"`student_run_id`, `transfer_dataset`). Cells: the transfer runs' `{METRIC}`, mean ± std over the "
             "students' seeds (n: seeds); `transfer.csv` has their `test_top1` as well.", ""]
    header = ["Student (trained on)", *transfer.datasets]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for pair, row in transfer.rows:
        cells = [cell_summary(transfer.cells.get((pair, row, d), {}).get(METRIC)) for d in transfer.datasets]
        lines.append(f"| {row.title}, {pair_title(pair)} ({pair.dataset}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [*(f"- {note}" for note in transfer.notes), *([""] if transfer.notes else [])]
    return lines


def _transfer_lines(transfer: Transfer) -> list[dict[str, Any]]:
    lines = []
    for (pair, row, dataset), cells in transfer.cells.items():
        head, top1 = cells[METRIC], cells["test_top1"]
        lines.append({"dataset": pair.dataset, "teacher": pair.teacher, "student": pair.student, "row": row.method,
                      "config": row.label, "transfer_dataset": dataset, "n": len(head.values),
                      "seeds": " ".join(sorted(head.seeds, key=_natural)), "mean": _num(head.mean, 4),
                      "std": _num(head.std, 4), "test_top1_mean": _num(top1.mean, 4),
                      "test_top1_std": _num(top1.std, 4), "run_ids": " ".join(head.run_ids),
                      "student_run_ids": " ".join(transfer.student_ids[pair, row, dataset])})
    return sorted(lines, key=lambda x: (x["dataset"], x["teacher"], x["student"], x["row"], x["config"],
                                        x["transfer_dataset"]))


OPTUNA_FILES = ("optuna/param_importances.csv", "optuna/param_importances.png", "optuna/history.png")


def optuna_markdown(client, sweeps: list, out: Path) -> tuple[list[str], list[Path]]:
    """A section per sweep: Optuna's parameter importances (the parent run's ``optuna/param_importances.csv``)
    and its two figures, copied into ``out``; a sweep without them (an older one) says so."""
    if not sweeps:
        return [], []
    lines = ["## Sweeps as Optuna saw them", "",
             "Per sweep, the importance Optuna gives each searched parameter (its share of the score's variance "
             "across the trials: fANOVA) and its figures, from the sweep's parent run (`optuna/`).", ""]
    files: list[Path] = []
    for sweep in sweeps:
        run_id = sweep.info.run_id
        name = sweep.info.run_name or run_id
        lines += [f"### Sweep {name}", ""]
        try:
            logged = {a.path for a in client.list_artifacts(run_id, "optuna")}
        except Exception:  # an artifact store out of reach: as if none
            logged = set()
        present = [p for p in OPTUNA_FILES if p in logged]
        if not present:
            lines += [f"Sweep `{name}` (run `{run_id}`) has no Optuna artifacts (`{'`, `'.join(OPTUNA_FILES)}`): "
                      "it ran before sweeps logged them.", ""]
            continue
        copied: dict[str, Path] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for path in present:
                local = Path(client.download_artifacts(run_id, path, tmp))
                target = out / f"optuna_{_slug(name)}_{Path(path).name}"
                target.write_bytes(local.read_bytes())
                copied[path] = target
        files.extend(copied.values())
        if OPTUNA_FILES[0] in copied:
            with open(copied[OPTUNA_FILES[0]], newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("param")]
            rows.sort(key=lambda r: -(_as_number(r.get("importance")) or 0.0))
            lines += ["| searched parameter | importance |", "|---|---|",
                      *(f"| `{r['param']}` | {_num(_as_number(r.get('importance')), 3) or r.get('importance', '')} |"
                        for r in rows), ""]
        else:
            lines += [f"Sweep `{name}` logged no `{OPTUNA_FILES[0]}`.", ""]
        for path, caption in ((OPTUNA_FILES[1], "parameter importances"), (OPTUNA_FILES[2], "optimization history")):
            if path in copied:
                lines += [f"![{name}: {caption}]({copied[path].name})", ""]
    return lines, files


# ------------------------------------------------------------------------------------------
# The report


@dataclass
class Report:
    experiment_id: str
    folder: Path
    table: Table
    ari: list[dict[str, Any]]
    results: list[Result]
    files: list[Path]
    logged_to: str | None = None
    reruns: list[Rerun] = field(default_factory=list)  # runs left out as reruns of a counted one
    studies: list[Study] = field(default_factory=list)  # few-shot, label noise: those with runs
    transfer: Transfer | None = None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.replace("->", "_to_"))


def _lookup(client, runs: list, wanted: set[str]) -> dict[str, Any]:
    """Runs by id: the experiment's, and those of ``wanted`` (teachers, students) found elsewhere in the store."""
    lookup = {r.info.run_id: r for r in runs}
    for run_id in sorted(wanted - set(lookup)):
        try:
            lookup[run_id] = client.get_run(run_id)
        except Exception:  # deleted, or not in this store: the report says so where it matters
            pass
    return lookup


def make_report(client, experiment_name: str, out: Path, store: str) -> Report:
    """Write the report of ``experiment_name`` into ``out``; ``store`` names the tracking store in the text."""
    experiment = find_experiment(client, experiment_name)
    runs = all_runs(client, experiment.experiment_id)
    selection = select(runs)
    results = selection.results
    if not results:
        raise UserError(
            f"experiment {experiment_name!r} has no finished training run with {METRIC!r} "
            f"({len(runs)} run(s) in all); train one first (python -m semckd_ray.train ...)"
        )
    wanted = {teacher_id(r.run) for r in results} | {
        r.data.tags.get("student_run_id", "") for r in runs if r.data.tags.get("role") == "transfer"}
    lookup = _lookup(client, runs, wanted - {""})
    for r in list(lookup.values()):  # the teachers of students found elsewhere
        if (tid := teacher_id(r)) and tid not in lookup:
            lookup.update(_lookup(client, [], {tid}))
    paper = load_paper()
    table = build_table(results, paper, lookup)
    ari = ari_rows(table)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    main_results = [r for r in results if not is_study(r.run)]
    figures: list[tuple[str, Path]] = []
    for pair in table.pairs:
        in_pair = [r for r in main_results if (r.run_id, pair) in table.row_of and r.method != BASELINE_METHOD]
        students = [r for r in main_results if r.method == BASELINE_METHOD
                    and (r.dataset, r.model) == (pair.dataset, pair.student)]
        labels = {r.run_id: table.row_of[r.run_id, pair].title for r in in_pair}
        for r in students:
            row = table.row_of.get((r.run_id, pair))
            labels[r.run_id] = f"{r.model} (vanilla{', ' + row.label if row and row.label else ''})"
        slug = _slug(pair.dataset + "_" + pair.name)
        path = plot_curves(client, in_pair + students, f"{pair.name} on {pair.dataset}",
                           out / f"curves_{slug}.png", labels)
        figures.append((f"Learning curves, {pair.name} ({pair.dataset})", path))
        for row in [row for row in table.rows if row.method == "semckd" and (row, pair) in table.cells]:
            semckd = [r for r in in_pair if table.row_of[r.run_id, pair] == row]
            attention = final_attention(semckd)
            if attention is None:
                continue
            from semckd_ray.attention import plot_attention

            last_epoch = max(int(r.run.data.metrics.get("epoch", 0)) for r in semckd)
            label = f" ({row.label})" if row.label else ""
            path = plot_attention(attention, out / f"attention_{slug}{'_' + _slug(row.label) if row.label else ''}.png",
                                  epoch=last_epoch, title=f"{pair.name}{label}, mean of {len(semckd)} run(s)")
            figures.append((f"SemCKD attention at the last epoch, {pair.name} ({pair.dataset}){label}", path))
    vanilla = [r for r in main_results if r.method == BASELINE_METHOD]
    if vanilla:
        by_model: dict[tuple[str, str], list[Result]] = defaultdict(list)
        for r in vanilla:
            by_model[r.dataset, r.model].append(r)
        labels = {}
        for rs in by_model.values():
            for group in labelled(group_by_recipe(rs, lambda r: recipe(r.run, lookup))):
                for r in group.items:
                    labels[r.run_id] = f"{r.model} (vanilla{', ' + group.label if group.label else ''})"
        path = plot_curves(client, vanilla, "vanilla training (teachers and student baselines)",
                           out / "curves_vanilla.png", labels)
        figures.append(("Learning curves, vanilla training", path))
    sweeps = sorted((r for r in runs if r.data.tags.get("role") == "sweep"), key=lambda r: r.info.start_time)
    # A grid of whole configurations (python -m semckd_ray.reproduce, searched as "cell") searches
    # nothing: it is the table, with no score to plot against its cells nor importances.
    from semckd_ray.tune import CELL

    searches = [s for s in sweeps if f"search.space.{CELL}.type" not in s.data.params]
    for sweep in searches:
        trials = [r for r in runs if r.data.tags.get(tracking.PARENT_RUN_TAG) == sweep.info.run_id]
        path = plot_sweep(client, sweep, trials, out / f"sweep_{_slug(sweep.info.run_name)}.png")
        if path is not None:
            figures.append((f"Sweep {sweep.info.run_name}: score against the searched values", path))
    files.extend(p for _, p in figures)

    sections: list[str] = []
    studies = [s for s in (build_study(results, key, lookup) for key in STUDIES) if s is not None]
    for study in studies:
        stem = STUDIES[study.key][2]
        figure = out / f"{stem}.png"
        study_figure(study).savefig(figure, dpi=DPI)
        files.append(figure)
        files.append(_write_csv(out / f"{stem}.csv", _study_lines(study), _study_columns(study.key)))
        sections += study_markdown(study, figure)
    transfer = build_transfer(runs, lookup)
    if transfer is not None:
        files.append(_write_csv(out / "transfer.csv", _transfer_lines(transfer), TRANSFER_COLUMNS))
        sections += transfer_markdown(transfer)
    optuna_lines, optuna_files = optuna_markdown(client, searches, out)
    sections += optuna_lines
    files.extend(optuna_files)

    files.append(_write_csv(out / "table.csv", _table_lines(table), TABLE_COLUMNS))
    files.append(_write_csv(out / "ari.csv", [{**a, "ari_percent": _num(a["ari_percent"]),
                                                "paper_ari_percent": _num(a["paper_ari_percent"])} for a in ari],
                            ARI_COLUMNS))
    dropped: dict[str, list[str]] = defaultdict(list)
    for rerun in selection.reruns:
        dropped[rerun.kept.run_id].append(rerun.dropped.run_id)
    configs = {run_id: row.label for (run_id, _), row in reversed(list(table.row_of.items()))}  # first pair's
    files.append(_write_csv(out / "runs.csv", [_run_line(r, dropped[r.run_id], configs.get(r.run_id, ""), lookup)
                                               for r in results], RUN_COLUMNS))
    markdown = _markdown(experiment_name, store, table, ari, results, figures, selection.reruns, sections)
    (out / "report.md").write_text(markdown)
    files.append(out / "report.md")
    return Report(experiment.experiment_id, out, table, ari, results, files, reruns=selection.reruns,
                  studies=studies, transfer=transfer)


TABLE_COLUMNS = ["dataset", "pair", "teacher", "student", "row", "config", "n", "seeds", "mean", "std",
                 "paper_mean", "paper_std", "run_ids"]  # config: what sets the cell apart from the row's others
ARI_COLUMNS = ["method", "ari_percent", "pairs", "pairs_left_out", "paper_ari_percent"]
RUN_COLUMNS = ["run_id", "run_name", "method", "teacher", "model", "dataset", "seed", METRIC, "config",
               FRACTION, NOISE, "teacher_run_id", "recipe_sha256", "parent_run_id", "config_sha256",
               "duplicates"]  # duplicates: the reruns left out for this run, space-separated
TRANSFER_COLUMNS = ["dataset", "teacher", "student", "row", "config", "transfer_dataset", "n", "seeds", "mean", "std",
                    "test_top1_mean", "test_top1_std", "run_ids", "student_run_ids"]


def _study_columns(key: str) -> list[str]:
    return ["dataset", "pair", "teacher", "student", "row", "config", key, "n", "seeds", "mean", "std", "run_ids"]


def _table_lines(table: Table) -> list[dict[str, Any]]:
    lines = []
    for pair in table.pairs:
        for row in table.rows:
            cell = table.cells.get((row, pair))
            if cell is None and any(r.method == row.method and p == pair for r, p in table.cells):
                continue  # another config of the method has this pair's runs
            cell = cell or Cell()
            paper = table.paper_cell(row, pair) or {}
            lines.append({
                "dataset": pair.dataset, "pair": pair.name, "teacher": pair.teacher, "student": pair.student,
                "row": row.method, "config": row.label, "n": len(cell.values),
                "seeds": " ".join(sorted(cell.seeds, key=_natural)), "mean": _num(cell.mean, 4),
                "std": _num(cell.std, 4), "paper_mean": _num(paper.get("mean")), "paper_std": _num(paper.get("std")),
                "run_ids": " ".join(cell.run_ids),
            })
    return lines


def _run_line(r: Result, duplicates: list[str], config: str, lookup: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": r.run_id, "run_name": r.run.info.run_name, "method": r.method, "teacher": r.teacher,
            "model": r.model, "dataset": r.dataset, "seed": r.seed, METRIC: r.value, "config": config,
            FRACTION: f"{study_value(r.run, FRACTION):g}", NOISE: f"{study_value(r.run, NOISE):g}",
            "teacher_run_id": teacher_id(r.run), "recipe_sha256": recipe_digest(recipe(r.run, lookup)),
            "parent_run_id": r.run.data.tags.get(tracking.PARENT_RUN_TAG, ""),
            "config_sha256": r.run.data.tags.get("config_sha256", ""), "duplicates": " ".join(duplicates)}


def _started_text(r: Result) -> str:
    start = r.run.info.start_time
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start / 1000)) if start else "?"


def _row_of(r: Result) -> str:
    if r.method == BASELINE_METHOD:
        return f"{r.model} (vanilla)"
    return f"{ROW_TITLES.get(r.method, r.method)}, {r.teacher}->{r.model}"


def reruns_markdown(reruns: list[Rerun]) -> list[str]:
    """The section of report.md that lists the runs left out as reruns, with the run counted instead."""
    if not reruns:
        return []
    lines = [
        "## Reruns counted once",
        "",
        "These finished runs repeat the experiment of a newer run (the same `config_sha256`: the same "
        "training, seed included; or the same sweep run again) and do not count: a rerun is not "
        "another seed. The newest run counts.",
        "",
        "| left out | started | counted instead | started | row, pair (dataset) | seed | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in sorted(reruns, key=lambda x: (x.kept.started, x.dropped.started)):
        d, k = x.dropped, x.kept
        lines.append(f"| `{d.run_id}` ({d.run.info.run_name}) | {_started_text(d)} | `{k.run_id}` "
                     f"({k.run.info.run_name}) | {_started_text(k)} | {_row_of(k)} ({k.dataset}) | "
                     f"{k.seed or '?'} | {x.why} |")
    return [*lines, ""]


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _markdown(experiment: str, store: str, table: Table, ari: list[dict[str, Any]], results: list[Result],
              figures: list[tuple[str, Path]], reruns: list[Rerun] = (), sections: list[str] = ()) -> str:
    left_out = (f"; {len(reruns)} rerun(s) of these left out (listed under *Reruns counted once*)"
                if reruns else "")
    studied = sum(is_study(r.run) for r in results)
    in_studies = (f" ({studied} of them trained on part of the training split or on noisy labels: in the "
                  "study sections below, not in the table)") if studied else ""
    ari_left_out = any(a.get("pairs_left_out") for a in ari)
    parts = [
        f"# Results of experiment `{experiment}`",
        "",
        f"From {len(results)} finished run(s) in MLflow ({store}), {time.strftime('%Y-%m-%d %H:%M')}"
        f"{in_studies}{left_out}.",
        "",
        f"Cells: test top-1 (%) at the epoch of best validation top-1 (`{METRIC}`), mean ± sample standard "
        "deviation over seeds, with the number of runs and their seeds (`n=3: 0,1,2`); *paper*: the SemCKD "
        "README (CIFAR-100) where the pair and method appear there, and the published ImageNet figures "
        "(ResNet-34 -> ResNet-18: teacher, student, KD, SemCKD) for a 1000-class `imagefolder` column. Only seeds of one experiment config are "
        "averaged: the runs' logged config, seed and storage settings aside, and the teacher run's config for a "
        "student. Where a method's runs in a column are of several configs, each has a row of its own, "
        "labelled by the params that differ (`epochs=2`, `beta=50.0`, `workers=2`, `batch=128`, ...). "
        "Student row: `vanilla` runs of the student model; teacher row: the teacher runs the column's students "
        "distilled from (their `teacher_run_id`). A sweep counts with its best trial only (chosen on "
        "validation); runs outside sweeps count as they are. A rerun counts once: runs of the same training "
        "(`config_sha256`, seed included), or of the same sweep run again, are one result, the newest run's.",
        "",
        markdown_table(table, ari),
        "",
        "ARI: the average relative improvement of SemCKD over a method, as the SemCKD paper defines it: "
        "the mean over pairs of (acc_SemCKD − acc_method) / (acc_method − acc_student), over the pairs where "
        "the three rows have exactly one choice of configs that train alike (same `optim.*`, `data.*` and "
        "workers)" + ("; the pairs left out say why" if ari_left_out else "") + ". It is unstable where a "
        "method barely beats the student.",
        "",
    ]
    if table.notes:
        parts += ["Teacher row:", "", *(f"- {note}" for note in table.notes), ""]
    parts += [*sections, *reruns_markdown(list(reruns))]
    for caption, path in figures:
        parts += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
    return "\n".join(parts)


def log_report(client, report: Report) -> str:
    """Log the report's files under ``report/`` of the newest sweep, or of the experiment's ``report`` run."""
    experiment_id = report.experiment_id
    sweeps = client.search_runs([experiment_id], filter_string="tags.role = 'sweep'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if sweeps:
        run_id = sweeps[0].info.run_id
    else:
        existing = client.search_runs([experiment_id], filter_string="tags.role = 'report'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
        run_id = existing[0].info.run_id if existing else client.create_run(
            experiment_id, run_name="report", tags={"role": "report"}).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        # Exactly this report's files, whatever else the output folder holds.
        for path in report.files:
            (Path(tmp) / path.name).write_bytes(path.read_bytes())
        client.log_artifacts(run_id, tmp, "report")
    if not sweeps:
        client.set_terminated(run_id, "FINISHED")
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semckd_ray.report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment)")
    parser.add_argument("--out", default=None, help="output folder (default: ./report/<experiment>)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    args = parser.parse_args(argv)
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"no MLflow store at {uri} (the file does not exist); pass --tracking-uri or set "
                        "$MLFLOW_TRACKING_URI to the store the runs were logged to")
    client = tracking.client(uri)
    out = Path(args.out) if args.out else Path("report") / _slug(args.experiment)
    report = make_report(client, args.experiment, out, store=tracking.redact(uri))
    report.logged_to = log_report(client, report)
    print(markdown_table(report.table, report.ari))
    left_out = f", {len(report.reruns)} rerun(s) left out" if report.reruns else ""
    print(f"\nreport written to {out}/report.md ({len(report.files)} files, {len(report.results)} runs{left_out}); "
          f"logged to MLflow run {report.logged_to} under report/")
    return 0


if __name__ == "__main__":
    run_cli(main)
