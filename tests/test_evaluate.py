"""``python -m semckd_ray.evaluate`` on checkpoints of a real (tiny, in-process) training: it gives the run's numbers.

One two-epoch training on ``digits`` logs into an MLflow store in a temporary folder (no Ray); every
test evaluates its checkpoints, from files, ``runs:/`` and ``models:/``, and compares with what the
training reported and logged, exactly.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from semckd_ray.config import parse_train_config
from semckd_ray.data import eval_loader, load_dataset
from semckd_ray.errors import UserError
from semckd_ray.evaluate import main
from semckd_ray.models import create_model, load_checkpoint
from semckd_ray.tracking import client
from semckd_ray.train_loop import BEST_FILE, STATE_FILE, LocalReporter, WorkerEnv, evaluate, run_worker
from semckd_ray.trainer import register_model, start_run
from test_bad_input import assert_user_error, run_command


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-epoch run: its reporter's metrics, local checkpoints and MLflow run."""
    root = tmp_path_factory.mktemp("evaluate")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    raw = {
        "name": "evaluate",
        "data": {"dataset": "digits", "root": str(root / "data")},
        "student": {"model": "resnet8"},
        "method": {"name": "vanilla"},
        "optim": {"epochs": 2, "batch_size": 32, "lr": 0.05},
        "checkpoint": {"every": 1},
        "tracking": {"uri": uri, "experiment": "evaluate", "register_model": "digits-resnet8"},
    }
    cfg = parse_train_config(raw)
    mlflow_client = client(uri)
    mlflow_client.create_experiment("evaluate", artifact_location=(root / "artifacts").as_uri())
    run_id = start_run(cfg)
    reporter = LocalReporter(root / "ckpt")
    final = run_worker(cfg.model_dump(mode="json"), reporter, run_id=run_id, tracking_uri=uri)
    last = root / "ckpt" / "epoch_00002"
    bare = root / "bare.pt"  # the best weights in the official format: no config
    torch.save({"model": torch.load(last / BEST_FILE, weights_only=True)["model"]}, bare)
    return SimpleNamespace(root=root, uri=uri, cfg=cfg, run_id=run_id, final=final, reporter=reporter,
                           last=last, bare=bare, client=mlflow_client, model=register_model(cfg, run_id))


def evaluated(capsys, *argv: str) -> dict:
    """Run the command in-process; its last output line, parsed."""
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1])


def test_state_file_evaluates_as_the_training_did_with_the_config_it_holds(trained, capsys, workdir):
    result = evaluated(capsys, "--checkpoint", str(trained.last / STATE_FILE))
    assert result["top1"] == trained.final["test_top1_last"]  # state.pt holds the last weights
    assert result["top5"] == trained.final["test_top5_last"]
    assert result["split"] == "test" and result["images"] == 360

    cfg = trained.cfg
    splits = load_dataset(cfg.data.dataset, cfg.data.root, val_size=cfg.data.val_size, seed=cfg.data.split_seed)
    model = create_model(cfg.student.model, num_classes=splits.num_classes)
    load_checkpoint(model, trained.last / STATE_FILE)
    direct = evaluate(model, eval_loader(splits, "test", cfg.data.eval_batch_size), WorkerEnv(), amp=False)
    assert {k: result[k] for k in direct} == direct

    # The Ray checkpoint folder (what the training prints) is the same checkpoint.
    assert evaluated(capsys, "--checkpoint", str(trained.last))["top1"] == result["top1"]


def test_best_checkpoint_of_a_run_gives_its_logged_test_top1(trained, capsys, workdir):
    logged = trained.client.get_run(trained.run_id).data.metrics
    result = evaluated(capsys, "--checkpoint", f"runs:/{trained.run_id}", "--set", f"tracking.uri={trained.uri}")
    assert result["top1"] == logged["test_top1_at_best_val"]
    assert result["top5"] == logged["test_top5_at_best_val"]
    assert result["checkpoint"] == f"runs:/{trained.run_id}"
    # A registered version of the run is the same checkpoint.
    assert trained.model == "models:/digits-resnet8/1"
    assert evaluated(capsys, "--checkpoint", trained.model, "--set", f"tracking.uri={trained.uri}") == {
        **result, "checkpoint": trained.model}


def test_val_split_is_the_runs_own_and_gives_the_best_epochs_val_top1(trained, capsys, workdir):
    best_epoch = int(trained.final["best_epoch"])
    history = {m.step: m.value for m in trained.client.get_metric_history(trained.run_id, "val_top1")}
    result = evaluated(capsys, "--checkpoint", f"runs:/{trained.run_id}", "--split", "val",
                       "--set", f"tracking.uri={trained.uri}")
    assert result["split"] == "val" and result["images"] == 144
    assert result["top1"] == history[best_epoch]
    assert result["top1"] != trained.final["test_top1_at_best_val"]


def test_checkpoint_without_config_takes_the_runs_config_yaml(trained, capsys, workdir, monkeypatch):
    trained.client.log_artifact(trained.run_id, str(trained.bare), "extra")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.uri)  # the store from the environment
    result = evaluated(capsys, "--checkpoint", f"runs:/{trained.run_id}/extra/bare.pt")
    assert result["top1"] == trained.final["test_top1_at_best_val"]


def test_checkpoint_config_is_used_where_the_run_has_no_config_yaml(trained, capsys, workdir):
    experiment = trained.client.get_experiment_by_name("evaluate").experiment_id
    run_id = trained.client.create_run(experiment).info.run_id  # logged by hand: no config.yaml
    trained.client.log_artifact(run_id, str(trained.last / STATE_FILE))
    trained.client.log_artifact(run_id, str(trained.bare))
    with_config = evaluated(capsys, "--checkpoint", f"runs:/{run_id}/{STATE_FILE}",
                            "--set", f"tracking.uri={trained.uri}")
    assert with_config["top1"] == trained.final["test_top1_last"]
    with pytest.raises(UserError, match=f"run {run_id} holds the training config .*--config FILE"):
        main(["--checkpoint", f"runs:/{run_id}/bare.pt", "--set", f"tracking.uri={trained.uri}"])


def test_config_file_gives_the_config_of_an_official_checkpoint(trained, capsys, workdir):
    config = workdir / "run.yaml"
    config.write_text(yaml.safe_dump(trained.cfg.model_dump(mode="json")))
    result = evaluated(capsys, "--checkpoint", str(trained.bare), "--config", str(config))
    assert result["top1"] == trained.final["test_top1_at_best_val"]
    with pytest.raises(UserError, match="holds no training config.*--config FILE"):
        main(["--checkpoint", str(trained.bare)])


def _bad_cases(trained, folder: Path) -> dict[str, tuple[list[str], str]]:
    garbage = folder / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    state = str(trained.last / STATE_FILE)
    uri = f"tracking.uri={trained.uri}"
    return {
        "missing file": (["--checkpoint", str(folder / "nope.pt")], "does not exist"),
        "unreadable file": (["--checkpoint", str(garbage)], "could not be read"),
        "unknown run": (["--checkpoint", "runs:/0123456789abcdef", "--set", uri],
                        "--checkpoint 'runs:/0123456789abcdef': no such MLflow run"),
        "another model": (["--checkpoint", state, "--set", "student.model=resnet14"], "does not fit the model"),
        "empty val split": (["--checkpoint", state, "--split", "val", "--set", "data.val_size=0"],
                            "val split of digits is empty"),
        "unknown key": (["--checkpoint", state, "--set", "data.nope=1"], "data.nope: unknown key"),
    }


@pytest.mark.parametrize("case", ["missing file", "unreadable file", "unknown run", "another model",
                                  "empty val split", "unknown key"])
def test_bad_input_is_a_user_error(trained, workdir, case):
    argv, needle = _bad_cases(trained, workdir)[case]
    with pytest.raises(UserError) as caught:
        main(argv)
    assert needle in str(caught.value)


def test_unknown_split_is_refused(trained, workdir, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--checkpoint", str(trained.last / STATE_FILE), "--split", "train"])
    assert caught.value.code == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err


def test_command_line_exits_2_with_one_error_paragraph(trained, workdir):
    cases = {"missing file": _bad_cases(trained, workdir)["missing file"],
             "unknown split": (["--checkpoint", "x.pt", "--split", "train"], "invalid choice: 'train'")}
    with ThreadPoolExecutor(len(cases)) as pool:
        results = {name: pool.submit(run_command, "semckd_ray.evaluate", argv, workdir)
                   for name, (argv, _) in cases.items()}
    for name, (_, needle) in cases.items():
        assert_user_error(results[name].result(), needle)
