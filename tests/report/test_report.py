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


def _semckd_labels(store) -> dict[str, str]:
    """The fixture's two SemCKD configs (standalone: 2 epochs, beta 50; the sweep's best trial: 1 epoch, its
    beta) by run id: the labels that keep them apart."""
    params = {k: store["client"].get_run(store["runs"][k]).data.params for k in ("semckd", "best_trial")}
    return {store["runs"][k]: f"epochs={p['optim.epochs']}, beta={p['method.beta_effective']}"
            for k, p in params.items()}


def test_table_has_one_column_per_pair_and_one_row_per_method(store):
    table = _table(store)
    assert set(table) == {"student", "teacher", "kd", "semckd"}  # digits: no paper rows
    with open(store["out"] / "table.csv") as f:
        assert {line["pair"] for line in csv.DictReader(f)} == {PAIR}
    markdown = (store["out"] / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| Method"))
    assert header == f"| Method | {PAIR} | ARI |"
    rows = [line.split(" | ")[0].lstrip("| ") for line in markdown.splitlines() if line.startswith("| ")][1:]
    # The standalone SemCKD run and the sweep's best trial are two configs: a row each, never averaged.
    labels = sorted(_semckd_labels(store).values(), key=report._natural)
    assert labels[0].startswith("epochs=1, beta=") and labels[1] == "epochs=2, beta=50.0"
    assert rows == ["Student (vanilla)", "Teacher (vanilla)", "KD", *(f"**SemCKD ({x})**" for x in labels)]


def test_cells_are_mean_and_std_over_seeds_of_the_runs_that_count(store):
    runs, table = store["runs"], _table(store)
    kd = [_metric(store, r) for r in runs["kd"]]
    assert table["kd"]["n"] == "2"
    assert float(table["kd"]["mean"]) == pytest.approx(statistics.fmean(kd), abs=1e-4)
    assert float(table["kd"]["std"]) == pytest.approx(statistics.stdev(kd), abs=1e-4)
    assert set(table["kd"]["run_ids"].split()) == set(runs["kd"])  # not the unfinished one
    assert table["kd"]["seeds"] == "0 1" and table["kd"]["config"] == ""
    # Standalone SemCKD and the sweep's best trial, each a cell of its own (other configs); not the other trial.
    with open(store["out"] / "table.csv") as f:
        semckd = {line["config"]: line for line in csv.DictReader(f) if line["row"] == "semckd"}
    assert {line["run_ids"]: label for label, line in semckd.items()} == _semckd_labels(store)
    for run_id, label in _semckd_labels(store).items():
        assert semckd[label]["n"] == "1"
        assert float(semckd[label]["mean"]) == pytest.approx(_metric(store, run_id), abs=1e-4)
    for row in ("student", "teacher"):
        assert table[row]["run_ids"] == runs[row]
        assert float(table[row]["mean"]) == pytest.approx(_metric(store, runs[row]), abs=1e-4)
        assert table[row]["std"] == ""  # one run: no spread
    markdown = (store["out"] / "report.md").read_text()
    assert f"{statistics.fmean(kd):.2f} ± {statistics.stdev(kd):.2f} (n=2: 0,1)" in markdown


def test_ari_follows_the_papers_definition(store):
    # From MLflow's own numbers: table.csv's 4-decimal means would move a ratio over a small kd - student.
    runs = store["runs"]
    # Of the two SemCKD configs, the one that trains like KD and the student (2 epochs) is compared.
    sem = _metric(store, runs["semckd"])
    kd = statistics.fmean([_metric(store, r) for r in runs["kd"]])
    stu = _metric(store, runs["student"])
    with open(store["out"] / "ari.csv") as f:
        (line,) = list(csv.DictReader(f))
    assert line["method"] == "kd"
    if kd == stu:  # the paper's ratio is undefined: the pair is left out
        assert (line["pairs"], line["ari_percent"], line["pairs_left_out"]) == ("0", "", "")
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


def test_imagenet_figures_sit_beside_a_1000_class_folder_tree_only():
    paper = report.load_paper()
    pair = report.Pair("imagefolder", "ResNet34", "ResNet18")
    cells = {("semckd", pair): report.Cell([70.1], ["a"])}
    imagenet = report.Table([pair], ["teacher", "student", "kd", "semckd"], cells, paper, classes={pair: {1000.0}})
    assert report.cell_text(imagenet, "semckd", pair) == "70.10 (n=1) · paper 70.87"
    assert [report.cell_text(imagenet, row, pair) for row in ("teacher", "student", "kd")] == [
        "– · paper 73.31", "– · paper 69.76", "– · paper 70.68"]
    for classes in ({10.0}, {1000.0, 10.0}, set()):  # another tree, a mixed column, runs without the metric
        other = report.Table([pair], ["semckd"], cells, paper, classes={pair: classes})
        assert report.cell_text(other, "semckd", pair) == "70.10 (n=1)"
    cifar = report.Table([pair], ["kd"], {}, paper, classes={pair: {1000.0}})
    assert report.cell_text(cifar, "kd", report.Pair("cifar100", "ResNet34", "ResNet18")) == "–"


def _logged_run(run_id: str, classes: float, method: str):
    """An MLflow run as the store returns it: a student of ResNet34 on a folder tree of ``classes`` classes."""
    from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunTag

    info = RunInfo(run_id, "0", "u", "FINISHED", 0, 1, "active", run_name=run_id)
    data = RunData(metrics=[Metric("data_classes", classes, 0, 0)], params=[Param("method.name", method)],
                   tags=[RunTag("method", method)])
    return Run(info, data)


def test_build_table_takes_a_columns_class_count_from_its_runs_metrics():
    paper = report.load_paper()

    def semckd_text(*classes: float) -> str:
        results = [report.Result(_logged_run(f"r{k}", c, "semckd"), "semckd", "ResNet18", "ResNet34", "imagefolder",
                                 str(k), 70.0) for k, c in enumerate(classes)]
        table = report.build_table(results, paper)
        return report.cell_text(table, "semckd", table.pairs[0])

    assert semckd_text(1000.0, 1000.0).endswith("· paper 70.87")
    assert "paper" not in semckd_text(1000.0, 100.0)
    assert "paper" not in semckd_text(10.0)


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
    # SemCKD's attention per config: the standalone run's and the best trial's, never averaged together.
    attention = [f"attention_digits_resnet14_to_resnet8_{report._slug(label)}.png"
                 for label in _semckd_labels(store).values()]
    for name in attention:
        assert _png(out / name) == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)
    assert not (out / "attention_digits_resnet14_to_resnet8.png").exists()
    markdown = (out / "report.md").read_text()
    for name in ("curves_digits_resnet14_to_resnet8.png", "curves_vanilla.png", "sweep_sweep-beta.png", *attention):
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


# ------------------------------------------------------------------------------------------
# Reruns and the sweep figure, on runs made by hand (no training): a store of their own


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A client on an empty tracking store of its own, the module in its folder (MLflow's ./mlruns)."""
    folder = tmp_path_factory.mktemp("report-bare")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield tracking.client(f"sqlite:///{folder / 'mlflow.db'}")


STUDENT_TAGS = {"role": "student", "method": "kd", "student": "resnet8", "teacher": "resnet14", "dataset": "digits"}


def _finished(client, experiment_id: str, value: float, start: int, *, seed: int | None = 0,
              params: dict | None = None, status: str = "FINISHED", **tags) -> str:
    """A run as a training leaves it: tags, params (seed included), ``test_top1_at_best_val``, closed."""
    run_id = client.create_run(experiment_id, start_time=start, tags={**STUDENT_TAGS, **tags},
                               run_name=f"run-{start}").info.run_id
    for key, v in {**({"seed": seed} if seed is not None else {}), **(params or {})}.items():
        client.log_param(run_id, key, v)
    client.log_metric(run_id, report.METRIC, value)
    client.set_terminated(run_id, status, end_time=start + 100)
    return run_id


def test_a_rerun_of_the_same_training_counts_once_and_is_listed(bare, tmp_path):
    client = bare
    experiment_id = client.create_experiment("report-reruns")
    # KD seed 0 trained twice (same config_sha256: one experiment), seed 1 once: two seeds, n=2.
    kd_first = _finished(client, experiment_id, 90.0, 1000, config_sha256="a" * 64)
    kd_seed1 = _finished(client, experiment_id, 80.0, 1500, seed=1, config_sha256="b" * 64)
    kd_rerun = _finished(client, experiment_id, 91.0, 2000, config_sha256="a" * 64)
    # The student baseline trained twice: its row counts it once too, the newest.
    vanilla = {"role": "teacher", "method": "vanilla", "teacher": ""}
    student_rerun = _finished(client, experiment_id, 71.0, 200, config_sha256="c" * 64, **vanilla)
    student_first = _finished(client, experiment_id, 70.0, 100, config_sha256="c" * 64, **vanilla)
    # Teacher runs without the tag: their logged config, tracking settings and data folder aside, decides.
    config = {"optim.epochs": 2, "data.dataset": "digits"}
    teacher_vanilla = {**vanilla, "student": "resnet14"}
    teacher_first = _finished(client, experiment_id, 95.0, 300, **teacher_vanilla,
                              params={**config, "tracking.uri": "sqlite:///a.db", "data.root": "/a"})
    teacher_rerun = _finished(client, experiment_id, 96.0, 400, **teacher_vanilla,
                              params={**config, "tracking.uri": "http://host:5000", "data.root": "/b"})
    teacher_other = _finished(client, experiment_id, 94.0, 500, **teacher_vanilla,
                              params={**config, "optim.epochs": 4})  # another training: counts
    # Not finished: neither counted nor a rerun of anything.
    _finished(client, experiment_id, 99.0, 3000, config_sha256="a" * 64, status="FAILED")

    made = report.make_report(client, "report-reruns", tmp_path, store="test")
    table = {line["row"]: line for line in csv.DictReader(open(tmp_path / "table.csv"))}
    assert table["kd"]["n"] == "2"  # two seeds count twice; the rerun of seed 0 once
    assert set(table["kd"]["run_ids"].split()) == {kd_rerun, kd_seed1}  # the newest of seed 0
    assert float(table["kd"]["mean"]) == pytest.approx(statistics.fmean([91.0, 80.0]), abs=1e-4)
    assert (table["student"]["n"], table["student"]["run_ids"]) == ("1", student_rerun)
    # No student names its teacher run here: the teacher row is the resnet14 vanilla runs, one cell per
    # config (2 and 4 epochs), not their mean.
    with open(tmp_path / "table.csv") as f:
        teachers = {line["config"]: line for line in csv.DictReader(f) if line["row"] == "teacher"}
    assert {c: (t["n"], t["run_ids"]) for c, t in teachers.items()} == {
        "epochs=2": ("1", teacher_rerun), "epochs=4": ("1", teacher_other)}
    assert "no student run names its teacher run" in (tmp_path / "report.md").read_text()

    dropped = {r.dropped.run_id: (r.kept.run_id, r.why) for r in made.reruns}
    assert dropped == {
        kd_first: (kd_rerun, "same config_sha256"),
        student_first: (student_rerun, "same config_sha256"),
        teacher_first: (teacher_rerun, "same logged config (no config_sha256 tag)"),
    }
    with open(tmp_path / "runs.csv") as f:
        runs = {line["run_id"]: line for line in csv.DictReader(f)}
    assert set(runs) == {kd_rerun, kd_seed1, student_rerun, teacher_rerun, teacher_other}
    assert runs[kd_rerun]["duplicates"] == kd_first and runs[kd_rerun]["config_sha256"] == "a" * 64
    assert runs[teacher_rerun]["duplicates"] == teacher_first
    assert runs[kd_seed1]["duplicates"] == ""
    markdown = (tmp_path / "report.md").read_text()
    assert "; 3 rerun(s) of these left out" in markdown
    assert "91.00 (n=1" not in markdown and f"{statistics.fmean([91.0, 80.0]):.2f} ± " in markdown
    section = markdown[markdown.index("## Reruns counted once"):]
    for first, (kept, why) in dropped.items():
        (line,) = [line for line in section.splitlines() if f"`{first}`" in line]
        assert f"`{kept}`" in line and why in line


def test_a_sweep_run_again_counts_once_even_where_its_best_trial_differs(bare):
    """Same search and base config: one experiment, whichever config came out best each time."""
    client = bare
    experiment_id = client.create_experiment("report-sweep-reruns")
    search = {"search.space.method.beta.type": "loguniform", "search.seed": 0, "scheduler": "asha",
              "base.optim.epochs": 8, "base.method.name": "semckd"}

    def sweep(start: int, **params) -> str:
        run_id = client.create_run(experiment_id, start_time=start, tags={"role": "sweep"}).info.run_id
        for key, v in {**search, "base.tracking.uri": f"sqlite:///{start}.db", **params}.items():
            client.log_param(run_id, key, v)
        client.set_terminated(run_id, "FINISHED", end_time=start + 900)
        return run_id

    def best(parent: str, start: int, beta: float, **extra) -> str:
        return _finished(client, experiment_id, 60.0 + start / 1000, start, method="semckd",
                         config_sha256=f"{beta:064.0f}",
                         **{tracking.PARENT_RUN_TAG: parent, "best_trial": "true", **extra})

    first, again, other = sweep(1000), sweep(5000), sweep(9000, **{"search.seed": 1})
    best_first = best(first, 1100, 10.0)
    best_again = best(again, 5100, 100.0)  # another beta came out best this time: still a rerun
    best_other = best(other, 9100, 30.0)  # another search (its seed): another experiment
    # search.repeats > 1, run twice: the seed runs of the two best trials pair up by seed.
    repeats = {**search, "search.repeats": 2}
    sweep_runs = []
    for start in (20000, 30000):
        parent = sweep(start, **repeats)
        trial = _finished(client, experiment_id, 50.0, start + 100, method="semckd", config_sha256=f"{start + 50:064d}",
                          **{tracking.PARENT_RUN_TAG: parent, "best_trial": "true"})
        sweep_runs.append([_finished(client, experiment_id, 50.0 + s, start + 200 + s, seed=s, method="semckd",
                                     config_sha256=f"{start + s:064d}", **{tracking.PARENT_RUN_TAG: trial})
                           for s in (0, 1)])

    selection = report.select(report.all_runs(client, experiment_id))
    assert {r.run_id for r in selection.results} == {best_again, best_other, *sweep_runs[1]}
    dropped = {r.dropped.run_id: (r.kept.run_id, r.why) for r in selection.reruns}
    why = "same sweep run again (same search and base config), same seed"
    assert dropped == {best_first: (best_again, why), sweep_runs[0][0]: (sweep_runs[1][0], why),
                       sweep_runs[0][1]: (sweep_runs[1][1], why)}


def test_a_standalone_run_and_a_sweeps_best_trial_of_its_config_count_once(bare):
    client = bare
    experiment_id = client.create_experiment("report-standalone-and-trial")
    parent = client.create_run(experiment_id, tags={"role": "sweep"}).info.run_id
    client.set_terminated(parent, "FINISHED")
    trial = _finished(client, experiment_id, 61.0, 1000, config_sha256="d" * 64,
                      **{tracking.PARENT_RUN_TAG: parent, "best_trial": "true"})
    standalone = _finished(client, experiment_id, 62.0, 2000, config_sha256="d" * 64)
    selection = report.select(report.all_runs(client, experiment_id))
    assert [r.run_id for r in selection.results] == [standalone]
    assert [(r.dropped.run_id, r.kept.run_id) for r in selection.reruns] == [(trial, standalone)]


def test_sweep_figure_marks_how_many_epochs_each_trial_trained(bare, tmp_path):
    client = bare
    experiment_id = client.create_experiment("report-sweep-figure")
    sweep = client.create_run(experiment_id, run_name="sweep-asha", tags={"role": "sweep"}).info.run_id
    for key, v in {"scheduler": "asha", "base.optim.epochs": 8, "search.space.method.beta.type": "loguniform"}.items():
        client.log_param(sweep, key, v)

    def trial(beta: float, score: float | None, epochs: int, status: str, **tags) -> str:
        run_id = client.create_run(experiment_id, tags={**STUDENT_TAGS, tracking.PARENT_RUN_TAG: sweep,
                                                        "searched.method.beta": str(beta), **tags}).info.run_id
        client.log_param(run_id, "optim.epochs", 8)
        for epoch in range(1, epochs + 1):
            client.log_metric(run_id, "epoch", epoch, step=epoch)
        if score is not None:
            client.log_metric(run_id, report.SCORE, score)
        client.set_terminated(run_id, status)
        return run_id

    full = [trial(10.0, 90.0, 8, "FINISHED", best_trial="true"), trial(300.0, 85.0, 8, "FINISHED")]
    stopped = [trial(100.0, 80.0, 2, "FINISHED", stopped_early="true"),  # as the sweep closes them
               trial(30.0, 81.0, 2, "FINISHED", stopped_early="true")]
    diverged = trial(1000.0, 20.0, 3, "FAILED", stopped_reason="non-finite training loss")
    trial(500.0, None, 1, "FAILED")  # no score: not drawn
    client.set_terminated(sweep, "FINISHED")
    sweep_run = client.get_run(sweep)
    trials = [r for r in report.all_runs(client, experiment_id) if r.info.run_id != sweep]

    labels = {p.run_id: p.label for p in report.sweep_points(sweep_run, trials)}
    assert labels == {**{r: "8 epochs (all)" for r in full}, **{r: "2 epochs (stopped by ASHA)" for r in stopped},
                      diverged: "3 epochs (diverged)"}
    fig = report.sweep_figure(sweep_run, trials)
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "8 epochs (all)", "3 epochs (diverged)", "2 epochs (stopped by ASHA)", "best trial"]
    drawn = {c.get_label(): sorted(map(tuple, c.get_offsets().tolist())) for c in ax.collections}
    assert drawn == {"8 epochs (all)": [(10.0, 90.0), (300.0, 85.0)], "3 epochs (diverged)": [(1000.0, 20.0)],
                     "2 epochs (stopped by ASHA)": [(30.0, 81.0), (100.0, 80.0)], "best trial": [(10.0, 90.0)]}
    title = fig._suptitle.get_text()
    assert title.startswith("sweep sweep-asha: 5 trials") and report.SWEEP_TITLE in title
    assert "best validation top-1 over the epochs each trial trained" in report.SWEEP_TITLE
    assert ax.get_xscale() == "log"
    path = report.plot_sweep(client, sweep_run, trials, tmp_path / "sweep.png")
    assert _png(path) == report.figure_size(1)


def test_the_fixtures_sweep_trials_trained_all_their_epochs(store):
    client, runs = store["client"], store["runs"]
    sweep = client.get_run(runs["sweep"])
    trials = [client.get_run(runs[k]) for k in ("best_trial", "other_trial")]
    assert {p.label for p in report.sweep_points(sweep, trials)} == {"1 epoch (all)"}  # optim.epochs 1


# ------------------------------------------------------------------------------------------
# Unlike runs kept apart, studies, transfer and Optuna: hand-made runs in the bare store


def _params(method: str, model: str, epochs: int, teacher: str | None = None, **more) -> dict:
    """What a training logs, in short: its config as params (tracking settings that differ run to run)."""
    return {"data.dataset": "digits", "method.name": method, "student.model": model, "optim.epochs": epochs,
            "optim.batch_size": 64, "tracking.uri": f"sqlite:///{model}-{epochs}.db", "name": "exp",
            **({"teacher.model": teacher[0], "teacher.checkpoint": f"runs:/{teacher[1]}"} if teacher else {}),
            **more}


def _vanilla(client, experiment_id: str, model: str, value: float, start: int, seed: int = 0, epochs: int = 4,
             **params) -> str:
    return _finished(client, experiment_id, value, start, seed=seed, params=_params("vanilla", model, epochs, **params),
                     role="teacher", method="vanilla", student=model, teacher="")


def _student(client, experiment_id: str, method: str, value: float, start: int, seed: int, epochs: int,
             teacher: tuple[str, str], model: str = "resnet8", **params) -> str:
    return _finished(client, experiment_id, value, start, seed=seed,
                     params=_params(method, model, epochs, teacher, **params),
                     method=method, student=model, teacher=teacher[0], teacher_run_id=teacher[1])


def _csv(path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _md_row(markdown: str, title: str) -> list[str]:
    (line,) = [line for line in markdown.splitlines() if line.startswith(f"| {title} |")]
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_two_configs_of_a_cell_stay_apart_and_the_teacher_row_is_the_students_teacher(bare, tmp_path):
    client = bare
    experiment_id = client.create_experiment("report-configs")
    teacher = _vanilla(client, experiment_id, "resnet14", 95.0, 100, epochs=8)
    _vanilla(client, experiment_id, "resnet14", 60.0, 110, seed=1, epochs=8)  # named by no student: not the row
    teacher20 = _vanilla(client, experiment_id, "resnet20", 96.0, 120, epochs=8)
    students = [_vanilla(client, experiment_id, "resnet8", v, 200 + s, seed=s) for s, v in enumerate((70.0, 72.0))]
    t14, t20 = ("resnet14", teacher), ("resnet20", teacher20)
    kd2 = [_student(client, experiment_id, "kd", v, 300 + s, s, 2, t14) for s, v in enumerate((71.0, 73.0))]
    kd4 = [_student(client, experiment_id, "kd", v, 400 + s, s, 4, t14) for s, v in enumerate((75.0, 77.0))]
    semckd = [_student(client, experiment_id, "semckd", v, 500 + s, s, 4, t14) for s, v in enumerate((78, 79, 80))]
    # A second pair where KD trained 2 epochs only: SemCKD (4) is not comparable with it.
    _student(client, experiment_id, "kd", 74.0, 600, 0, 2, t20)
    _student(client, experiment_id, "semckd", 76.0, 610, 0, 4, t20)

    made = report.make_report(client, "report-configs", tmp_path, store="test")
    pair14, pair20 = (report.Pair("digits", t, "resnet8") for t in ("resnet14", "resnet20"))
    table = made.table
    kd_rows = [r for r in table.rows if r.method == "kd"]
    assert [r.title for r in kd_rows] == ["KD (epochs=2)", "KD (epochs=4)"]
    assert set(table.cells[report.Row("kd", "epochs=2"), pair14].run_ids) == set(kd2)
    assert set(table.cells[report.Row("kd", "epochs=4"), pair14].run_ids) == set(kd4)
    assert table.cells[report.Row("kd", "epochs=2"), pair20].values == [74.0]  # alone in its column: not split
    assert (report.Row("kd"), pair20) not in table.cells  # its label comes from the other column's split
    assert table.cells[report.Row("teacher"), pair14].run_ids == [teacher]
    assert table.cells[report.Row("teacher"), pair20].run_ids == [teacher20]
    assert set(table.cells[report.Row("student"), pair14].run_ids) == set(students)
    assert set(table.cells[report.Row("semckd"), pair14].run_ids) == set(semckd)

    lines = [x for x in _csv(tmp_path / "table.csv") if x["pair"] == "resnet14->resnet8"]
    by_row = {(x["row"], x["config"]): x for x in lines}
    assert set(by_row) == {("student", ""), ("teacher", ""), ("kd", "epochs=2"), ("kd", "epochs=4"), ("semckd", "")}
    assert (by_row["kd", "epochs=4"]["n"], by_row["kd", "epochs=4"]["seeds"]) == ("2", "0 1")
    assert float(by_row["kd", "epochs=4"]["mean"]) == pytest.approx(76.0)
    assert (by_row["teacher", ""]["mean"], by_row["teacher", ""]["run_ids"]) == ("95.0000", teacher)

    markdown = (tmp_path / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| Method"))
    assert header == "| Method | resnet14->resnet8 | resnet20->resnet8 | ARI |"
    assert _md_row(markdown, "Teacher (vanilla)")[1:3] == ["95.00 (n=1: 0)", "96.00 (n=1: 0)"]
    assert _md_row(markdown, "Student (vanilla)")[1] == "71.00 ± 1.41 (n=2: 0,1)"
    kd2_md, kd4_md = _md_row(markdown, "KD (epochs=2)"), _md_row(markdown, "KD (epochs=4)")
    assert kd2_md[1:3] == ["72.00 ± 1.41 (n=2: 0,1)", "74.00 (n=1: 0)"]
    assert kd4_md[1:3] == ["76.00 ± 1.41 (n=2: 0,1)", "–"]
    assert _md_row(markdown, "**SemCKD**")[1] == "79.00 ± 1.00 (n=3: 0,1,2)"
    # ARI over the comparable cells only: 4 epochs in the first pair; the second pair has none.
    (ari,) = made.ari
    assert ari["pairs"] == 1 and ari["ari_percent"] == pytest.approx(100 * (79 - 76) / (76 - 71))
    assert ari["pairs_left_out"] == "resnet20->resnet8 (not comparable)"
    assert kd2_md[3] == "60.00% (1 pair), left out: resnet20->resnet8 (not comparable)" and kd4_md[3] == ""
    runs = {x["run_id"]: x for x in _csv(tmp_path / "runs.csv")}
    assert runs[kd2[0]]["config"] == "epochs=2" and runs[kd2[0]]["teacher_run_id"] == teacher
    assert runs[kd2[0]]["recipe_sha256"] == runs[kd2[1]]["recipe_sha256"] != runs[kd4[0]]["recipe_sha256"]


def test_students_of_several_teacher_runs_say_so(bare, tmp_path):
    client = bare
    experiment_id = client.create_experiment("report-teachers")
    # Two teacher seeds of one config, and a teacher of another config (1 epoch).
    teachers = [_vanilla(client, experiment_id, "resnet14", v, 100 + s, seed=s, epochs=8)
                for s, v in enumerate((94.0, 96.0))]
    short = _vanilla(client, experiment_id, "resnet14", 50.0, 120, seed=0, epochs=1)
    _vanilla(client, experiment_id, "resnet8", 70.0, 200)
    kd = [_student(client, experiment_id, "kd", 75.0 + s, 300 + s, s, 4, ("resnet14", teachers[s])) for s in (0, 1)]
    from_short = _student(client, experiment_id, "kd", 60.0, 400, 0, 4, ("resnet14", short))
    missing = "f" * 32
    _student(client, experiment_id, "kd", 61.0, 500, 0, 4, ("resnet14", missing))

    made = report.make_report(client, "report-teachers", tmp_path, store="test")
    pair = report.Pair("digits", "resnet14", "resnet8")
    cells = {r: c for (r, p), c in made.table.cells.items() if p == pair}
    # A student's config holds its teacher's: students of teacher seeds are seeds; the 1-epoch teacher's is apart.
    kd_cells = {r.label: c for r, c in cells.items() if r.method == "kd"}
    assert set(kd_cells["teacher epochs=8"].run_ids) == set(kd)
    assert kd_cells["teacher epochs=1"].run_ids == [from_short]
    teacher_cells = {r.label: c for r, c in cells.items() if r.method == "teacher"}
    assert set(teacher_cells) == {"epochs=1", "epochs=8"}
    assert set(teacher_cells["epochs=8"].run_ids) == set(teachers) and teacher_cells["epochs=8"].mean == 95.0
    markdown = (tmp_path / "report.md").read_text()
    assert "the students distilled from 4 teacher runs" in markdown
    assert f"teacher run `{missing}`" in markdown and "is not in this tracking store" in markdown
    assert "Teacher (vanilla, epochs=8) | 95.00 ± 1.41 (n=2: 0,1)" in markdown


def test_config_labels_name_what_differs_by_short_names():
    base = {"optim.epochs": "4", "method.beta": "None", "method.beta_effective": "400.0", "scaling.num_workers": "1",
            "scaling.world_size": "1", "optim.batch_size": "64", "optim.batch_size_per_worker": "64"}
    other = {**base, "method.beta": "50.0", "method.beta_effective": "50.0", "scaling.num_workers": "2",
             "scaling.world_size": "2", "optim.batch_size_per_worker": "32", "method.options.soft": "0.5"}
    assert report.config_labels([base, other]) == ["beta=400.0, workers=1, soft=unset",
                                                  "beta=50.0, workers=2, soft=0.5"]
    assert report.config_labels([base]) == [""]
    fraction = {**base, report.FRACTION: "0.25", report.NOISE: "0.0"}
    noisy = {**base, report.FRACTION: "1.0", report.NOISE: "0.2"}
    assert report.config_labels([fraction, noisy]) == ["fraction=0.25, noise=0.0", "fraction=1.0, noise=0.2"]
    batch = {**base, "optim.batch_size": "128", "optim.batch_size_per_worker": "128"}
    assert report.config_labels([base, batch]) == ["batch=64", "batch=128"]  # per worker: it follows


def test_few_shot_and_label_noise_sections(bare, tmp_path):
    client = bare
    experiment_id = client.create_experiment("report-studies")
    teacher = ("resnet14", _vanilla(client, experiment_id, "resnet14", 95.0, 100, epochs=8))
    start = iter(range(1000, 10000, 10))

    def student(method: str, value: float, seed: int, fraction: float | None = None, noise: float | None = None):
        extra = {**({report.FRACTION: fraction} if fraction is not None else {}),
                 **({report.NOISE: noise} if noise is not None else {})}
        if method == "vanilla":
            return _vanilla(client, experiment_id, "resnet8", value, next(start), seed=seed, **extra)
        return _student(client, experiment_id, method, value, next(start), seed, 4, teacher, **extra)

    # Full data, as older runs log it (no data.train_fraction nor data.label_noise): fraction 1, noise 0.
    full = {m: [student(m, v + s, s) for s in (0, 1)] for m, v in (("vanilla", 70), ("kd", 75), ("semckd", 78))}
    few = [student("kd", 50.0 + s, s, fraction=0.25, noise=0.0) for s in (0, 1)]
    few += [student("kd", 60.0, 0, fraction=0.5), student("semckd", 55.0, 0, fraction=0.25),
            student("vanilla", 40.0, 0, fraction=0.25)]
    noisy = [student("kd", 65.0 + s, s, fraction=1.0, noise=0.2) for s in (0, 1)]
    noisy += [student("semckd", 70.0, 0, noise=0.2), student("semckd", 66.0, 0, noise=0.4)]

    made = report.make_report(client, "report-studies", tmp_path, store="test")
    # The main table: full, clean data only.
    counted = {run_id for c in made.table.cells.values() for run_id in c.run_ids}
    assert counted == {teacher[1], *(r for rs in full.values() for r in rs)}
    assert [s.key for s in made.studies] == [report.FRACTION, report.NOISE]

    fewshot = {(x["row"], x[report.FRACTION]): x for x in _csv(tmp_path / "fewshot.csv")}
    assert set(fewshot) == {(m, f) for m in ("student", "kd", "semckd") for f in ("1", "0.25")} | {("kd", "0.5")}
    assert (fewshot["kd", "0.25"]["n"], fewshot["kd", "0.25"]["seeds"], fewshot["kd", "0.25"]["mean"]) == (
        "2", "0 1", "50.5000")
    assert set(fewshot["kd", "1"]["run_ids"].split()) == set(full["kd"])  # the reference: the older runs
    noise = {(x["row"], x[report.NOISE]): x for x in _csv(tmp_path / "label_noise.csv")}
    assert set(noise) == {("kd", "0"), ("kd", "0.2"), ("semckd", "0"), ("semckd", "0.2"), ("semckd", "0.4")}
    assert noise["kd", "0.2"]["mean"] == "65.5000"

    markdown = (tmp_path / "report.md").read_text()
    section = markdown[markdown.index("## Few-shot"):markdown.index("## Label noise")]
    assert "| Method | fraction 0.25 | fraction 0.5 | fraction 1 |" in section
    assert "| KD | 50.50 ± 0.71 (n=2: 0,1) | 60.00 (n=1: 0) | 75.50 ± 0.71 (n=2: 0,1) |" in section
    assert "| Student (vanilla) | 40.00 (n=1: 0) | – | 70.50 ± 0.71 (n=2: 0,1) |" in section
    assert "![few-shot](fewshot.png)" in section
    section = markdown[markdown.index("## Label noise"):]
    assert "| noise | KD | SemCKD |" in section
    assert "| 0.2 | 65.50 ± 0.71 (n=2: 0,1) | 70.00 (n=1: 0) |" in section
    assert "| 0.4 | – | 66.00 (n=1: 0) |" in section
    assert _png(tmp_path / "fewshot.png") == report.figure_size(1)
    assert _png(tmp_path / "label_noise.png") == report.figure_size(1)
    fig = report.study_figure(made.studies[0])
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Student (vanilla)", "KD", "SemCKD"]
    assert not (made.studies[1].lines[0].row.method == "student")  # no vanilla run with noise: no student line


def test_no_study_section_without_study_runs(bare, tmp_path):
    client = bare
    experiment_id = client.create_experiment("report-no-studies")
    _finished(client, experiment_id, 50.0, 100, params={report.FRACTION: 1.0, report.NOISE: 0.0})
    made = report.make_report(client, "report-no-studies", tmp_path, store="test")
    markdown = (tmp_path / "report.md").read_text()
    assert made.studies == [] and made.transfer is None
    for heading in ("## Few-shot", "## Label noise", "## Transfer", "## Sweeps as Optuna saw them"):
        assert heading not in markdown
    assert not (tmp_path / "fewshot.csv").exists() and not (tmp_path / "transfer.csv").exists()


def test_transfer_section(bare, tmp_path):
    client = bare
    experiment_id = client.create_experiment("report-transfer")
    teacher = ("resnet14", _vanilla(client, experiment_id, "resnet14", 95.0, 100, epochs=8))
    kd = [_student(client, experiment_id, "kd", 75.0 + s, 200 + s, s, 4, teacher) for s in (0, 1)]
    semckd = _student(client, experiment_id, "semckd", 78.0, 300, 0, 4, teacher)

    def transfer(student: str, dataset: str, value: float, start: int, top1: float | None = None) -> str:
        run_id = client.create_run(experiment_id, start_time=start, tags={
            "role": "transfer", "student_run_id": student, "transfer_dataset": dataset}).info.run_id
        client.log_metric(run_id, report.METRIC, value)
        client.log_metric(run_id, "test_top1", value - 1 if top1 is None else top1)
        client.set_terminated(run_id, "FINISHED", end_time=start + 10)
        return run_id

    transfer(kd[0], "stl10", 10.0, 400)  # older: the newer transfer of the same student and dataset counts
    runs = [transfer(kd[0], "stl10", 50.0, 500), transfer(kd[1], "stl10", 52.0, 510),
            transfer(kd[0], "tinyimagenet", 30.0, 520), transfer(semckd, "stl10", 55.0, 530)]
    lost = transfer("e" * 32, "stl10", 40.0, 540)

    made = report.make_report(client, "report-transfer", tmp_path, store="test")
    pair = report.Pair("digits", "resnet14", "resnet8")
    assert set(made.table.cells[report.Row("kd"), pair].run_ids) == set(kd)  # transfer runs are no training runs
    assert {r.run_id for r in made.results} == {teacher[1], *kd, semckd}
    lines = {(x["row"], x["transfer_dataset"]): x for x in _csv(tmp_path / "transfer.csv")}
    assert set(lines) == {("kd", "stl10"), ("kd", "tinyimagenet"), ("semckd", "stl10")}
    kd_stl = lines["kd", "stl10"]
    assert (kd_stl["n"], kd_stl["seeds"], kd_stl["mean"]) == ("2", "0 1", "51.0000")
    assert kd_stl["test_top1_mean"] == "50.0000"
    assert set(kd_stl["run_ids"].split()) == set(runs[:2]) and set(kd_stl["student_run_ids"].split()) == set(kd)
    markdown = (tmp_path / "report.md").read_text()
    section = markdown[markdown.index("## Transfer"):]
    assert "| Student (trained on) | stl10 | tinyimagenet |" in section
    assert "| KD, resnet14->resnet8 (digits) | 51.00 ± 1.41 (n=2: 0,1) | 30.00 (n=1: 0) |" in section
    assert "| SemCKD, resnet14->resnet8 (digits) | 55.00 (n=1: 0) | – |" in section
    assert f"transfer run `{lost}`" in section


def test_optuna_section_shows_a_sweeps_importances_and_figures(bare, tmp_path):
    client = bare
    experiment_id = client.create_experiment("report-optuna")
    _finished(client, experiment_id, 50.0, 100)
    old = client.create_run(experiment_id, run_name="sweep-old", start_time=200, tags={"role": "sweep"}).info.run_id
    new = client.create_run(experiment_id, run_name="sweep-new", start_time=300, tags={"role": "sweep"}).info.run_id
    logged = tmp_path / "logged"
    logged.mkdir()
    with open(logged / "param_importances.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["param", "importance"])
        for param, importance in (("method.options.soft", 0.08), ("method.beta", 0.7),
                                  ("method.options.proj_width", 0.02), ("method.options.factor", 0.2)):
            writer.writerow([param, importance])
    for name in ("param_importances.png", "history.png"):
        matplotlib.image.imsave(logged / name, [[0.0, 1.0], [1.0, 0.0]])
        client.log_artifact(new, str(logged / name), "optuna")
    client.log_artifact(new, str(logged / "param_importances.csv"), "optuna")
    for run_id in (old, new):
        client.set_terminated(run_id, "FINISHED")

    out = tmp_path / "out"
    made = report.make_report(client, "report-optuna", out, store="test")
    markdown = (out / "report.md").read_text()
    section = markdown[markdown.index("## Sweeps as Optuna saw them"):]
    old_part, new_part = section[section.index("### Sweep sweep-old"):], section[section.index("### Sweep sweep-new"):]
    assert "has no Optuna artifacts" in old_part[:old_part.index("### Sweep sweep-new")]
    rows = [line for line in new_part.splitlines() if line.startswith("| `")]
    assert rows == ["| `method.beta` | 0.700 |", "| `method.options.factor` | 0.200 |",
                    "| `method.options.soft` | 0.080 |", "| `method.options.proj_width` | 0.020 |"]
    for name in ("param_importances.png", "history.png", "param_importances.csv"):
        copied = out / f"optuna_sweep-new_{name}"
        assert copied.read_bytes() == (logged / name).read_bytes() and copied in made.files
    assert "![sweep-new: parameter importances](optuna_sweep-new_param_importances.png)" in new_part
    assert "![sweep-new: optimization history](optuna_sweep-new_history.png)" in new_part
    assert not list(out.glob("optuna_sweep-old_*"))


def test_ari_compares_only_cells_that_train_alike_and_the_paper_stands_beside_every_config():
    paper = report.load_paper()
    pair = report.Pair("cifar100", "resnet32x4", "resnet8x4")
    e240, e10 = {"optim.epochs": "240"}, {"optim.epochs": "10"}

    def cell(value: float, params: dict, **extra) -> report.Cell:
        return report.Cell([value], ["r"], ["0"], {**params, **extra}, "")

    cells = {(report.Row("student"), pair): cell(72.0, e240), (report.Row("kd", "epochs=10"), pair): cell(60.0, e10),
             (report.Row("kd", "epochs=240"), pair): cell(74.0, e240), (report.Row("semckd"), pair): cell(76.0, e240)}
    table = report.Table([pair], sorted({r for r, _ in cells}, key=report._row_order), cells, paper)
    (kd,) = [a for a in report.ari_rows(table) if a["method"] == "kd"]
    assert (kd["pairs"], kd["ari_percent"], kd["pairs_left_out"]) == (1, pytest.approx(100.0), "")
    for label in ("epochs=10", "epochs=240"):
        assert report.cell_text(table, report.Row("kd", label), pair).endswith("· paper 74.42 ± 0.05")
    assert report.cell_text(table, "kd", pair) == "– · paper 74.42 ± 0.05"
    # Two SemCKD configs that both train like KD (another beta): no single choice, the pair is left out.
    cells[report.Row("semckd", "beta=50.0"), pair] = cell(75.0, e240, **{"method.beta": "50.0"})
    table = report.Table([pair], sorted({r for r, _ in cells}, key=report._row_order), cells, paper)
    (kd,) = [a for a in report.ari_rows(table) if a["method"] == "kd"]
    assert (kd["pairs"], kd["pairs_left_out"]) == (0, "resnet32x4->resnet8x4 (ambiguous)")
    markdown = report.markdown_table(table, report.ari_rows(table))
    row = "| KD (epochs=10) | 60.00 (n=1: 0) · paper 74.42 ± 0.05 | –, left out: resnet32x4->resnet8x4 (ambiguous)"
    assert row in markdown
