"""``python -m semckd_ray.report`` on real runs: the table's cells are MLflow's numbers, the figures are images.

A module fixture trains, in-process and without Ray, on digits (batch 32, 1-2 epochs): a resnet14
teacher, the vanilla resnet8 student baseline, KD with two seeds, SemCKD, and a two-trial SemCKD
"sweep" (parent run, trials, best trial tagged, as ``semckd_ray.tune`` leaves them). Runs that must not count (an
unfinished run, the sweep's other trial) sit beside them.
"""

from __future__ import annotations

import csv
import json
import math
import statistics

import matplotlib.image
import pytest
import torch

from semckd_ray import report, tracking
from semckd_ray.attention import DPI, FIGSIZE
from semckd_ray.config import parse_train_config
from semckd_ray.errors import UserError
from semckd_ray.train_loop import LocalReporter, run_worker
from semckd_ray.trainer import start_run

EXPERIMENT = "report-digits"
PAIR = "resnet14->resnet8"


def _raw(uri: str, **sections) -> dict:
    raw = {
        "name": "rep",
        "data": {"dataset": "digits", "val_size": 1000},  # 437 images to train on: short epochs
        "student": {"model": "resnet8"},
        "method": {"name": "vanilla"},
        "optim": {"epochs": 2, "batch_size": 32, "lr": 0.05, "lr_decay_epochs": []},
        "scaling": {"cpus_per_worker": 1},
        "checkpoint": {"every": 1},
        "tracking": {"uri": uri, "experiment": EXPERIMENT},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return raw


def _train(uri: str, folder, parent: str | None = None, tags: dict | None = None, **sections) -> str:
    cfg = parse_train_config(_raw(uri, **sections))
    run_id = start_run(cfg, parent_run_id=parent, tags=tags)
    run_worker(cfg.model_dump(mode="json"), LocalReporter(folder / run_id, resume=False),
               run_id=run_id, tracking_uri=uri)
    tracking.client(uri).set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The trained runs (ids by role) and the report written from them.

    The module runs in the fixture's folder: MLflow puts a SQLite store's artifacts under ./mlruns.
    """
    folder = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield _train_and_report(folder)


def _train_and_report(folder) -> dict:
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = tracking.client(uri)
    runs = {"teacher": _train(uri, folder, student={"model": "resnet14"}, optim={"epochs": 1})}
    teacher = {"model": "resnet14", "checkpoint": f"runs:/{runs['teacher']}"}
    runs["student"] = _train(uri, folder)
    runs["kd"] = [_train(uri, folder, seed=s, method={"name": "kd"}, teacher=teacher) for s in (0, 1)]
    semckd = {"name": "semckd", "beta": 50}
    runs["semckd"] = _train(uri, folder, method=semckd, teacher=teacher)

    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    sweep = client.create_run(experiment_id, run_name="sweep-beta", tags={"role": "sweep"}).info.run_id
    client.log_param(sweep, "search.space.method.beta.type", "loguniform")
    trials = [
        _train(uri, folder, parent=sweep, tags={"searched.method.beta": str(beta), "tune_trial_id": f"t{beta}"},
               method={**semckd, "beta": beta}, teacher=teacher, optim={"epochs": 1})
        for beta in (10.0, 100.0)
    ]
    scores = [client.get_run(t).data.metrics["best_val_top1"] for t in trials]
    runs["best_trial"], runs["other_trial"] = trials if scores[0] >= scores[1] else trials[::-1]
    client.set_tag(runs["best_trial"], "best_trial", "true")
    client.set_terminated(sweep, "FINISHED")
    runs["sweep"] = sweep
    # Started, never finished: must not count.
    runs["unfinished"] = start_run(parse_train_config(_raw(uri, method={"name": "kd"}, teacher=teacher, seed=7)))

    out = folder / "out"
    with pytest.raises(SystemExit) as exit_info:
        report.run_cli(report.main, ["--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(out)])
    assert exit_info.value.code == 0
    return {"uri": uri, "client": client, "runs": runs, "out": out}


def _metric(store, run_id: str, key: str = report.METRIC) -> float:
    return store["client"].get_run(run_id).data.metrics[key]


def _table(store) -> dict[str, dict[str, str]]:
    with open(store["out"] / "table.csv") as f:
        return {line["row"]: line for line in csv.DictReader(f)}


def test_table_has_one_column_per_pair_and_one_row_per_method(store):
    table = _table(store)
    assert set(table) == {"student", "teacher", "kd", "semckd"}  # digits: no paper rows
    with open(store["out"] / "table.csv") as f:
        assert {line["pair"] for line in csv.DictReader(f)} == {PAIR}
    markdown = (store["out"] / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| Method"))
    assert header == f"| Method | {PAIR} | ARI |"
    rows = [line.split(" | ")[0].lstrip("| ") for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert rows == ["Student (vanilla)", "Teacher (vanilla)", "KD", "**SemCKD**"]


def test_cells_are_mean_and_std_over_seeds_of_the_runs_that_count(store):
    runs, table = store["runs"], _table(store)
    kd = [_metric(store, r) for r in runs["kd"]]
    assert table["kd"]["n"] == "2"
    assert float(table["kd"]["mean"]) == pytest.approx(statistics.fmean(kd), abs=1e-4)
    assert float(table["kd"]["std"]) == pytest.approx(statistics.stdev(kd), abs=1e-4)
    assert set(table["kd"]["run_ids"].split()) == set(runs["kd"])  # not the unfinished one
    # Standalone SemCKD and the sweep's best trial; not the sweep's other trial.
    assert set(table["semckd"]["run_ids"].split()) == {runs["semckd"], runs["best_trial"]}
    semckd = [_metric(store, runs["semckd"]), _metric(store, runs["best_trial"])]
    assert float(table["semckd"]["mean"]) == pytest.approx(statistics.fmean(semckd), abs=1e-4)
    for row in ("student", "teacher"):
        assert table[row]["run_ids"] == runs[row]
        assert float(table[row]["mean"]) == pytest.approx(_metric(store, runs[row]), abs=1e-4)
        assert table[row]["std"] == ""  # one run: no spread
    markdown = (store["out"] / "report.md").read_text()
    assert f"{statistics.fmean(kd):.2f} ± {statistics.stdev(kd):.2f} (n=2)" in markdown


def test_ari_follows_the_papers_definition(store):
    # From MLflow's own numbers: table.csv's 4-decimal means would move a ratio over a small kd - student.
    runs = store["runs"]
    sem = statistics.fmean([_metric(store, runs["semckd"]), _metric(store, runs["best_trial"])])
    kd = statistics.fmean([_metric(store, r) for r in runs["kd"]])
    stu = _metric(store, runs["student"])
    with open(store["out"] / "ari.csv") as f:
        (line,) = list(csv.DictReader(f))
    assert line["method"] == "kd"
    if kd == stu:  # the paper's ratio is undefined: the pair is left out
        assert (line["pairs"], line["ari_percent"]) == ("0", "")
    else:
        assert line["pairs"] == "1"
        assert float(line["ari_percent"]) == pytest.approx(100 * (sem - kd) / (kd - stu), abs=0.005 + 1e-9)


def test_ari_reproduces_the_papers_column_from_its_table():
    paper = report.load_paper()
    rows = {row: {pair: v["mean"] for pair, v in cells.items()} for row, cells in paper["rows"].items()}
    for method, published in paper["ari_percent"].items():
        ours, pairs = report.average_relative_improvement(rows["semckd"], rows[method], rows["student"])
        assert pairs == len(paper["pairs"])
        assert ours == pytest.approx(published, abs=0.25)  # the paper computed it before rounding
    assert statistics.fmean(paper["ari_percent"].values()) == pytest.approx(paper["ari_average_percent"], abs=0.01)


def test_paper_values_sit_beside_ours_for_the_papers_pairs():
    paper = report.load_paper()
    pair = report.Pair("cifar100", "resnet32x4", "resnet8x4")
    table = report.Table([pair], ["student", "kd"], {("kd", pair): report.Cell([74.0, 74.5], ["a", "b"])}, paper)
    assert report.cell_text(table, "kd", pair) == "74.25 ± 0.35 (n=2) · paper 74.42 ± 0.05"
    assert report.cell_text(table, "student", pair) == "– · paper 73.09 ± 0.30"
    other = report.Pair("digits", "resnet32x4", "resnet8x4")
    assert report.cell_text(report.Table([other], ["kd"], {}, paper), "kd", other) == "–"


def _png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image.shape[1], image.shape[0]


def test_figures_are_pngs_of_the_expected_size(store):
    out = store["out"]
    # val_top1, train_ce, train_kd, train_semckd, train_total
    assert _png(out / "curves_digits_resnet14_to_resnet8.png") == report.figure_size(5)
    assert _png(out / "curves_vanilla.png") == report.figure_size(3)  # val_top1, train_ce, train_total
    assert _png(out / "sweep_sweep-beta.png") == report.figure_size(1)  # one searched key
    assert _png(out / "attention_digits_resnet14_to_resnet8.png") == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)
    markdown = (out / "report.md").read_text()
    for name in ("curves_digits_resnet14_to_resnet8.png", "curves_vanilla.png", "sweep_sweep-beta.png",
                 "attention_digits_resnet14_to_resnet8.png"):
        assert f"({name})" in markdown


def test_semckd_runs_log_attention_rows_that_sum_to_one(store):
    client, run_id = store["client"], store["runs"]["semckd"]
    keys = [f"attn_s{i}_t{j}" for i in range(3) for j in range(3)]  # resnet8 and resnet14: 3 maps each
    history = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}
    for epoch in (1, 2):
        attention = torch.tensor([[history[f"attn_s{i}_t{j}"][epoch] for j in range(3)] for i in range(3)])
        torch.testing.assert_close(attention.sum(1), torch.ones(3), rtol=0, atol=1e-6)
        assert (attention >= 0).all()
    assert not any(k.startswith("attn_") for k in client.get_run(store["runs"]["kd"][0]).data.metrics)
    # A heat map per checkpoint epoch (checkpoint.every = 1).
    pngs = sorted(a.path for a in client.list_artifacts(run_id, "attention"))
    assert pngs == ["attention/epoch_001.png", "attention/epoch_002.png"]
    local = client.download_artifacts(run_id, "attention/epoch_002.png", str(store["out"].parent))
    assert _png(local) == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)


def test_report_is_logged_on_the_sweeps_parent_run(store):
    client = store["client"]
    logged = {a.path for a in client.list_artifacts(store["runs"]["sweep"], "report")}
    assert {"report/report.md", "report/table.csv", "report/ari.csv", "report/runs.csv",
            "report/sweep_sweep-beta.png"} <= logged


def test_without_a_sweep_the_report_goes_to_a_report_run(store, tmp_path):
    client, uri = store["client"], store["uri"]
    experiment_id = client.create_experiment("report-one-run")
    run = client.create_run(experiment_id, tags={"role": "student", "method": "kd", "student": "resnet8",
                                                 "teacher": "resnet14", "dataset": "digits"})
    client.log_metric(run.info.run_id, report.METRIC, 50.0)
    client.set_terminated(run.info.run_id, "FINISHED")
    for _ in range(2):  # a second report reuses the report run
        assert report.main(["--experiment", "report-one-run", "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    report_runs = client.search_runs([experiment_id], filter_string="tags.role = 'report'")
    assert len(report_runs) == 1 and report_runs[0].info.status == "FINISHED"
    assert "report/report.md" in {a.path for a in client.list_artifacts(report_runs[0].info.run_id, "report")}


def test_seed_runs_of_the_best_trial_count_instead_of_the_trial(store):
    """With ``search.repeats`` > 1 the best trial's seed runs are the results, not the trial's mean."""
    client = store["client"]
    experiment_id = client.create_experiment("report-repeats")
    tags = {"role": "student", "method": "semckd", "student": "resnet8", "teacher": "resnet14", "dataset": "digits"}

    def run(value: float, **extra) -> str:
        run_id = client.create_run(experiment_id, tags={**tags, **extra}).info.run_id
        client.log_metric(run_id, report.METRIC, value)
        client.set_terminated(run_id, "FINISHED")
        return run_id

    sweep = client.create_run(experiment_id, tags={"role": "sweep"}).info.run_id
    best = run(61.0, **{tracking.PARENT_RUN_TAG: sweep, "best_trial": "true"})
    other = run(99.0, **{tracking.PARENT_RUN_TAG: sweep})
    seeds = [run(v, **{tracking.PARENT_RUN_TAG: best}) for v in (60.0, 62.0)]
    run(98.0, **{tracking.PARENT_RUN_TAG: other})
    run(97.0, **{tracking.PARENT_RUN_TAG: "0" * 32})  # its sweep is gone
    standalone = run(50.0)
    chosen = report.select_results(report.all_runs(client, experiment_id))
    assert {r.run_id for r in chosen} == {*seeds, standalone}


def test_unknown_experiment_and_no_finished_run_are_user_errors(store, tmp_path, capsys):
    uri, client = store["uri"], store["client"]
    with pytest.raises(UserError, match=r"no MLflow experiment named 'nope'.*report-digits"):
        report.main(["--experiment", "nope", "--tracking-uri", uri, "--out", str(tmp_path)])
    experiment_id = client.create_experiment("report-empty")
    client.create_run(experiment_id, tags={"role": "student"})  # still running
    with pytest.raises(SystemExit) as exit_info:
        report.run_cli(report.main, ["--experiment", "report-empty", "--tracking-uri", uri, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "has no finished training run" in capsys.readouterr().err
    with pytest.raises(UserError, match="no MLflow store"):
        report.main(["--experiment", EXPERIMENT, "--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}"])


def test_paper_results_cover_section_10_of_the_spec():
    paper = json.loads(report.PAPER_FILE.read_text())
    assert len(paper["pairs"]) == 7
    assert set(paper["rows"]) == {"student", "teacher", "kd", "fitnet", "at", "sp", "vid", "hkd", "semckd"}
    for row, cells in paper["rows"].items():
        assert set(cells) == set(paper["pairs"]), row
    assert paper["rows"]["semckd"]["resnet32x4->resnet8x4"] == {"mean": 76.23, "std": 0.04}
    assert paper["rows"]["teacher"]["wrn_40_2->MobileNetV2"] == {"mean": 75.61, "std": None}
    assert math.isclose(paper["ari_percent"]["kd"], 72.65)
