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
- ``sweep_<name>.png``: each sweep's score (best validation top-1) against every searched value.

Which runs count: finished runs that logged ``test_top1_at_best_val``. A run outside any sweep counts
as it is. A sweep contributes its best trial only (tag ``best_trial``, chosen on the validation
split), or that trial's seed runs when it ran several seeds: counting every trial, or the best one
on test, would turn a search into a better-looking result. The teacher and student rows are the
``vanilla`` runs of those models on the pair's dataset.
"""

from __future__ import annotations

import argparse
import csv
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

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


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
    """The runs that count (see the module docstring), newest first."""
    by_id = {r.info.run_id: r for r in runs}
    parents = {r.info.run_id: r.data.tags.get(tracking.PARENT_RUN_TAG) for r in runs}
    has_children = {p for p in parents.values() if p}

    def is_best_trial(run) -> bool:
        parent = by_id.get(parents[run.info.run_id])
        return (parent is not None and parent.data.tags.get("role") == "sweep"
                and run.data.tags.get("best_trial") == "true")

    def counts(run) -> bool:
        parent_id = parents[run.info.run_id]
        if parent_id is None:
            return True
        if parent_id not in by_id:  # a trial whose sweep is gone: no way to tell whether it was the best
            return False
        if is_best_trial(run):
            return run.info.run_id not in has_children  # several seeds: the seed runs count instead
        return is_best_trial(by_id[parent_id])  # a seed run of the best trial

    results = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        if (run.info.status != "FINISHED" or tags.get("role") not in ("teacher", "student")
                or not math.isfinite(metrics.get(METRIC, math.nan)) or not counts(run)):
            continue
        results.append(Result(run, tags.get("method", ""), tags.get("student", ""), tags.get("teacher", ""),
                              tags.get("dataset", ""), run.data.params.get("seed", ""), metrics[METRIC]))
    return results


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


def plot_sweep(client, sweep, trials: list, path: Path) -> Path | None:
    """Score (best validation top-1) against each searched value, one panel per searched key."""
    keys = sorted({k[len("searched."):] for t in trials for k in t.data.tags if k.startswith("searched.")})
    scored = [t for t in trials if math.isfinite(t.data.metrics.get(SCORE, math.nan))]
    if not keys or not scored:
        return None
    fig, axes = _figure(len(keys))
    params = sweep.data.params
    for ax, key in zip(axes, keys):
        points = [(t.data.tags.get(f"searched.{key}"), t.data.metrics[SCORE], t.data.tags.get("best_trial") == "true")
                  for t in scored if f"searched.{key}" in t.data.tags]
        xs = [_as_number(x) for x, _, _ in points]
        if any(x is None for x in xs):  # a choice among names: one position per value
            names = sorted({x for x, _, _ in points})
            xs = [names.index(x) for x, _, _ in points]
            ax.set_xticks(range(len(names)), names)
        elif params.get(f"search.space.{key}.type") == "loguniform" or key.endswith("beta"):
            ax.set_xscale("log")
        ax.scatter(xs, [y for _, y, _ in points], color="C0", label="trial")
        best = [(x, y) for x, (_, y, b) in zip(xs, points) if b]
        if best:
            ax.scatter(*zip(*best), color="C3", marker="*", s=160, label="best trial")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{SCORE} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"sweep {sweep.info.run_name}: {len(scored)} trials")
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


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.replace("->", "_to_"))


def make_report(client, experiment_name: str, out: Path, store: str) -> Report:
    """Write the report of ``experiment_name`` into ``out``; ``store`` names the tracking store in the text."""
    experiment = find_experiment(client, experiment_name)
    runs = all_runs(client, experiment.experiment_id)
    results = select_results(runs)
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
    files.append(_write_csv(out / "runs.csv", [_run_line(r) for r in results], RUN_COLUMNS))
    markdown = _markdown(experiment_name, store, table, ari, results, figures)
    (out / "report.md").write_text(markdown)
    files.append(out / "report.md")
    return Report(experiment.experiment_id, out, table, ari, results, files)


TABLE_COLUMNS = ["dataset", "pair", "teacher", "student", "row", "n", "mean", "std", "paper_mean", "paper_std",
                 "run_ids"]
ARI_COLUMNS = ["method", "ari_percent", "pairs", "paper_ari_percent"]
RUN_COLUMNS = ["run_id", "run_name", "method", "teacher", "model", "dataset", "seed", METRIC, "parent_run_id"]


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


def _run_line(r: Result) -> dict[str, Any]:
    return {"run_id": r.run_id, "run_name": r.run.info.run_name, "method": r.method, "teacher": r.teacher,
            "model": r.model, "dataset": r.dataset, "seed": r.seed, METRIC: r.value,
            "parent_run_id": r.run.data.tags.get(tracking.PARENT_RUN_TAG, "")}


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _markdown(experiment: str, store: str, table: Table, ari: list[dict[str, Any]], results: list[Result],
              figures: list[tuple[str, Path]]) -> str:
    parts = [
        f"# Results of experiment `{experiment}`",
        "",
        f"From {len(results)} finished run(s) in MLflow ({store}), {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"Cells: test top-1 (%) at the epoch of best validation top-1 (`{METRIC}`), mean ± sample standard "
        "deviation over seeds, with the number of runs; *paper*: the SemCKD README (CIFAR-100) where the "
        "pair and method appear there. Teacher and student rows: `vanilla` runs of those models. A sweep "
        "counts with its best trial only (chosen on validation); runs outside sweeps count as they are.",
        "",
        markdown_table(table, ari),
        "",
        "ARI: the average relative improvement of SemCKD over a method, as the SemCKD paper defines it: "
        "the mean over pairs of (acc_SemCKD − acc_method) / (acc_method − acc_student). It is unstable "
        "where a method barely beats the student.",
        "",
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
    print(f"\nreport written to {out}/report.md ({len(report.files)} files, {len(report.results)} runs); "
          f"logged to MLflow run {report.logged_to} under report/")
    return 0


if __name__ == "__main__":
    run_cli(main)
