"""``python -m semckd_ray.report --experiment NAME [--out DIR] [--tracking-uri URI]``: the paper's table from MLflow.

Reads every finished run of an MLflow experiment and writes, into ``--out`` (default
``./report/<experiment>``) and onto MLflow (under ``report/`` of the newest sweep's parent run, or
of a run named ``report`` when the experiment has no sweep):

- ``report.md``: the comparison table as in the SemCKD paper (rows methods, columns teacher->student
  pairs, cells test top-1 mean +- std over seeds) with the published value beside ours, the average
  relative improvement (ARI) of SemCKD over each method, and the figures below;
- ``table.csv`` (one line per cell), ``ari.csv``, ``runs.csv`` (the runs behind the cells);
- ``curves_<pair>.png``: validation top-1 and every loss term per epoch, one line per run;
- ``attention_<pair>.png``: SemCKD's validation attention at the last epoch, averaged over seeds;
- ``sweep_<name>.png``: each sweep's score (best validation top-1 over the epochs each trial trained)
  against every searched value, each trial marked by how many epochs it trained (ASHA stops some early).

Which runs count: finished runs that logged ``test_top1_at_best_val``. A run outside any sweep counts
as it is. A sweep contributes its best trial only (tag ``best_trial``, chosen on the validation
split), or that trial's seed runs when it ran several seeds: counting every trial, or the best one
on test, would turn a search into a better-looking result. The teacher and student rows are the
``vanilla`` runs of those models on the pair's dataset.

A rerun counts once (``select``): runs among those that compute the same training are one
experiment repeated, not another seed, and only the newest (by start time) counts. The same
training is the same tag ``config_sha256`` (``trainer.config_digest``: the whole config, seed
included, tracking settings aside); a run without that tag is compared by its logged config (its
params, tracking settings aside), and one with neither counts alone. A sweep run again with the
same search and base config is the same experiment too, even where its best trial came out
another config (ASHA, concurrency and GPU noise can pick another): its best trial (or seed run of
a seed) and the earlier sweep's are one result. Every run left out this way is listed, with the
run that counts instead, in ``report.md`` and in ``runs.csv``'s ``duplicates`` column. This holds
for the teacher and student rows as well.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
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
    values: list[float] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds; NaN for a single run."""
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan


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
        parent = by_id.get(parents[run.info.run_id])
        return (parent is not None and parent.data.tags.get("role") == "sweep"
                and run.data.tags.get("best_trial") == "true")

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
        keys.add(("sweep", searched, result.method, result.teacher, result.model, result.dataset, result.seed))
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
# The table


@dataclass
class Table:
    pairs: list[Pair]
    rows: list[str]  # "student", "teacher", then methods
    cells: dict[tuple[str, Pair], Cell]
    paper: dict[str, Any]

    def paper_cell(self, row: str, pair: Pair) -> dict[str, float] | None:
        if pair.dataset != self.paper["dataset"]:
            return None
        return self.paper["rows"].get(row, {}).get(pair.name)

    @property
    def has_paper_pairs(self) -> bool:
        return any(p.dataset == self.paper["dataset"] and p.name in self.paper["pairs"] for p in self.pairs)

    def means(self, row: str) -> dict[Pair, float]:
        return {p: c.mean for (r, p), c in self.cells.items() if r == row and c.values}


def load_paper() -> dict[str, Any]:
    return json.loads(PAPER_FILE.read_text())


def build_table(results: list[Result], paper: dict[str, Any]) -> Table:
    cells: dict[tuple[str, Pair], Cell] = defaultdict(Cell)
    vanilla: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in results:
        if r.method == BASELINE_METHOD:
            vanilla[r.dataset, r.model].append(r)
        else:
            pair = Pair(r.dataset, r.teacher, r.model)
            cells[r.method, pair].values.append(r.value)
            cells[r.method, pair].run_ids.append(r.run_id)
    paper_order = {name: i for i, name in enumerate(paper["pairs"])}
    pairs = sorted({p for _, p in cells}, key=lambda p: (p.dataset != paper["dataset"],
                                                          paper_order.get(p.name, len(paper_order)), p))
    for pair in pairs:
        for row, model in (("student", pair.student), ("teacher", pair.teacher)):
            for r in vanilla.get((pair.dataset, model), []):
                cells[row, pair].values.append(r.value)
                cells[row, pair].run_ids.append(r.run_id)
    table = Table(pairs, [], dict(cells), paper)
    methods = {m for m, _ in cells} | {"student", "teacher"}
    if table.has_paper_pairs:
        methods |= set(paper["rows"])  # the paper's rows, for context, where a column is the paper's
    table.rows = sorted(methods, key=lambda m: (m == "semckd", ROW_ORDER.index(m) if m in ROW_ORDER else 99, m))
    return table


def average_relative_improvement(semckd: dict, method: dict, student: dict) -> tuple[float, int]:
    """ARI of SemCKD over a method, in %: mean over pairs of (SemCKD - method) / (method - student).

    The SemCKD paper's definition; each argument maps a pair to its mean accuracy. Pairs where any
    of the three is missing, or where the method equals the student (division by zero), are left out.
    Returns (ARI, number of pairs used); NaN with no pair.
    """
    ratios = [(semckd[p] - method[p]) / (method[p] - student[p])
              for p in semckd if p in method and p in student and method[p] != student[p]]
    return (100.0 * statistics.fmean(ratios), len(ratios)) if ratios else (math.nan, 0)


def ari_rows(table: Table) -> list[dict[str, Any]]:
    semckd, student = table.means("semckd"), table.means("student")
    rows = []
    for method in table.rows:
        if method in ("student", "teacher", "semckd"):
            continue
        ours, n = average_relative_improvement(semckd, table.means(method), student)
        rows.append({"method": method, "ari_percent": ours, "pairs": n,
                     "paper_ari_percent": table.paper["ari_percent"].get(method, math.nan)
                     if table.has_paper_pairs else math.nan})
    return rows


# ------------------------------------------------------------------------------------------
# Formatting


def _num(value: float | None, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if value is not None and math.isfinite(value) else ""


def _mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.2f} ± {std:.2f}" if std is not None and math.isfinite(std) else f"{mean:.2f}"


def cell_text(table: Table, row: str, pair: Pair) -> str:
    cell = table.cells.get((row, pair))
    ours = f"{_mean_std(cell.mean, cell.std)} (n={len(cell.values)})" if cell and cell.values else "–"
    paper = table.paper_cell(row, pair)
    return ours if paper is None else f"{ours} · paper {_mean_std(paper['mean'], paper['std'])}"


def markdown_table(table: Table, ari: list[dict[str, Any]]) -> str:
    ari_by_method = {a["method"]: a for a in ari}
    several_datasets = len({p.dataset for p in table.pairs}) > 1
    header = ["Method", *(p.name + (f" ({p.dataset})" if several_datasets else "") for p in table.pairs), "ARI"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    finite = [a["ari_percent"] for a in ari if a["pairs"]]
    for row in table.rows:
        a = ari_by_method.get(row)
        if row == "semckd":
            ari_text = f"avg {statistics.fmean(finite):.2f}%" if finite else "–"
            if table.has_paper_pairs:
                ari_text += f" · paper avg {table.paper['ari_average_percent']:.2f}%"
        elif a is None:
            ari_text = ""
        else:
            ari_text = f"{_num(a['ari_percent'])}% ({a['pairs']} pair{'s' * (a['pairs'] > 1)})" if a["pairs"] else "–"
            if math.isfinite(a["paper_ari_percent"]):
                ari_text += f" · paper {a['paper_ari_percent']:.2f}%"
        title = ROW_TITLES.get(row, row)
        title = f"**{title}**" if row == "semckd" else title
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


def plot_curves(client, results: list[Result], title: str, path: Path) -> Path:
    """One panel per ``curve_keys``; a colour per method (or vanilla model), a line style per run of it."""
    from matplotlib.ticker import MaxNLocator

    keys = curve_keys([r.run for r in results])
    fig, axes = _figure(len(keys))
    colors: dict[str, str] = {}
    drawn: dict[str, int] = defaultdict(int)
    order = {row: i for i, row in enumerate(ROW_ORDER)}
    for r in sorted(results, key=lambda r: (order.get(r.method, len(order)), r.model, r.seed)):
        label = ROW_TITLES.get(r.method, r.method) if r.method != BASELINE_METHOD else f"{r.model} (vanilla)"
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


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.replace("->", "_to_"))


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
    paper = load_paper()
    table = build_table(results, paper)
    ari = ari_rows(table)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    by_pair: dict[Pair, list[Result]] = defaultdict(list)
    for r in results:
        if r.method != BASELINE_METHOD:
            by_pair[Pair(r.dataset, r.teacher, r.model)].append(r)
    figures: list[tuple[str, Path]] = []
    for pair in table.pairs:
        students = [r for r in results
                    if r.method == BASELINE_METHOD and (r.dataset, r.model) == (pair.dataset, pair.student)]
        path = plot_curves(client, by_pair[pair] + students, f"{pair.name} on {pair.dataset}",
                           out / f"curves_{_slug(pair.dataset + '_' + pair.name)}.png")
        figures.append((f"Learning curves, {pair.name} ({pair.dataset})", path))
        attention = final_attention([r for r in by_pair[pair] if r.method == "semckd"])
        if attention is not None:
            from semckd_ray.attention import plot_attention

            runs_used = sum(r.method == "semckd" for r in by_pair[pair])
            last_epoch = max(int(r.run.data.metrics.get("epoch", 0)) for r in by_pair[pair] if r.method == "semckd")
            path = plot_attention(attention, out / f"attention_{_slug(pair.dataset + '_' + pair.name)}.png",
                                  epoch=last_epoch, title=f"{pair.name}, mean of {runs_used} run(s)")
            figures.append((f"SemCKD attention at the last epoch, {pair.name} ({pair.dataset})", path))
    vanilla = [r for r in results if r.method == BASELINE_METHOD]
    if vanilla:
        path = plot_curves(client, vanilla, "vanilla training (teachers and student baselines)",
                           out / "curves_vanilla.png")
        figures.append(("Learning curves, vanilla training", path))
    sweeps = sorted((r for r in runs if r.data.tags.get("role") == "sweep"), key=lambda r: r.info.start_time)
    for sweep in sweeps:
        trials = [r for r in runs if r.data.tags.get(tracking.PARENT_RUN_TAG) == sweep.info.run_id]
        path = plot_sweep(client, sweep, trials, out / f"sweep_{_slug(sweep.info.run_name)}.png")
        if path is not None:
            figures.append((f"Sweep {sweep.info.run_name}: score against the searched values", path))
    files.extend(p for _, p in figures)

    files.append(_write_csv(out / "table.csv", _table_lines(table), TABLE_COLUMNS))
    files.append(_write_csv(out / "ari.csv", [{**a, "ari_percent": _num(a["ari_percent"]),
                                                "paper_ari_percent": _num(a["paper_ari_percent"])} for a in ari],
                            ARI_COLUMNS))
    dropped: dict[str, list[str]] = defaultdict(list)
    for rerun in selection.reruns:
        dropped[rerun.kept.run_id].append(rerun.dropped.run_id)
    files.append(_write_csv(out / "runs.csv", [_run_line(r, dropped[r.run_id]) for r in results], RUN_COLUMNS))
    markdown = _markdown(experiment_name, store, table, ari, results, figures, selection.reruns)
    (out / "report.md").write_text(markdown)
    files.append(out / "report.md")
    return Report(experiment.experiment_id, out, table, ari, results, files, reruns=selection.reruns)


TABLE_COLUMNS = ["dataset", "pair", "teacher", "student", "row", "n", "mean", "std", "paper_mean", "paper_std",
                 "run_ids"]
ARI_COLUMNS = ["method", "ari_percent", "pairs", "paper_ari_percent"]
RUN_COLUMNS = ["run_id", "run_name", "method", "teacher", "model", "dataset", "seed", METRIC, "parent_run_id",
               "config_sha256", "duplicates"]  # duplicates: the reruns left out for this run, space-separated


def _table_lines(table: Table) -> list[dict[str, Any]]:
    lines = []
    for pair in table.pairs:
        for row in table.rows:
            cell = table.cells.get((row, pair), Cell())
            paper = table.paper_cell(row, pair) or {}
            lines.append({
                "dataset": pair.dataset, "pair": pair.name, "teacher": pair.teacher, "student": pair.student,
                "row": row, "n": len(cell.values), "mean": _num(cell.mean, 4), "std": _num(cell.std, 4),
                "paper_mean": _num(paper.get("mean")), "paper_std": _num(paper.get("std")),
                "run_ids": " ".join(cell.run_ids),
            })
    return lines


def _run_line(r: Result, duplicates: list[str]) -> dict[str, Any]:
    return {"run_id": r.run_id, "run_name": r.run.info.run_name, "method": r.method, "teacher": r.teacher,
            "model": r.model, "dataset": r.dataset, "seed": r.seed, METRIC: r.value,
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
              figures: list[tuple[str, Path]], reruns: list[Rerun] = ()) -> str:
    left_out = (f"; {len(reruns)} rerun(s) of these left out (listed under *Reruns counted once*)"
                if reruns else "")
    parts = [
        f"# Results of experiment `{experiment}`",
        "",
        f"From {len(results)} finished run(s) in MLflow ({store}), {time.strftime('%Y-%m-%d %H:%M')}{left_out}.",
        "",
        f"Cells: test top-1 (%) at the epoch of best validation top-1 (`{METRIC}`), mean ± sample standard "
        "deviation over seeds, with the number of runs; *paper*: the SemCKD README (CIFAR-100) where the "
        "pair and method appear there. Teacher and student rows: `vanilla` runs of those models. A sweep "
        "counts with its best trial only (chosen on validation); runs outside sweeps count as they are. "
        "A rerun counts once: runs of the same training (`config_sha256`, seed included), or of the same "
        "sweep run again, are one result, the newest run's.",
        "",
        markdown_table(table, ari),
        "",
        "ARI: the average relative improvement of SemCKD over a method, as the SemCKD paper defines it: "
        "the mean over pairs of (acc_SemCKD − acc_method) / (acc_method − acc_student). It is unstable "
        "where a method barely beats the student.",
        "",
        *reruns_markdown(list(reruns)),
    ]
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
