"""``tracking.register_model``: the run's student becomes a real MLflow model, which a fresh process loads
with MLflow alone and which a teacher given as ``models:/NAME/VERSION`` loads too.

No Ray and no training: a resnet8 with trained-looking BatchNorm statistics is logged as rank 0 logs
a run's checkpoints (``train_loop._Tracker.final``), into an SQLite store under a temporary folder.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from semckd_ray import trainer
from semckd_ray.config import TeacherConfig, parse_train_config
from semckd_ray.models import create_model
from semckd_ray.spool import spool_dir
from semckd_ray.teacher import load_teacher, teacher_run_id
from semckd_ray.tracking import client
from semckd_ray.train_loop import _SystemMetrics, _Tracker

NAME = "digits-resnet8"
# In a fresh interpreter that cannot import this package: the model needs torch and MLflow only.
LOAD = """
import sys
sys.modules["semckd_ray"] = None
import numpy as np, torch, mlflow.pytorch, mlflow.pyfunc
uri, example, out = sys.argv[1:]
x = torch.from_numpy(np.load(example))
model = mlflow.pytorch.load_model(uri)
with torch.no_grad():
    logits = model(x)
np.save(out, logits.numpy())
pyfunc = mlflow.pyfunc.load_model(uri)
assert np.array_equal(pyfunc.predict(np.load(example)), logits.numpy())
print("shape", tuple(logits.shape))
"""


def trained_student() -> nn.Module:
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=10)
    student.train()
    with torch.no_grad():  # BatchNorm statistics away from their initial 0 and 1: eval mode shows
        for _ in range(3):
            student(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    return student.eval()


def logged_run(root: Path, uri: str, name: str = "model", register: str | None = NAME):
    raw = {"name": name, "data": {"dataset": "digits", "root": str(root / "data")},
           "student": {"model": "resnet8"}, "method": {"name": "vanilla"},
           "optim": {"epochs": 3, "batch_size": 32, "lr": 0.05},
           "tracking": {"uri": uri, "experiment": "registry", "register_model": register,
                        "storage_path": str(root / "storage")}}
    cfg = parse_train_config(raw)
    run_id = trainer.start_run(cfg)
    student = trained_student()
    distiller = SimpleNamespace(student=student, method=nn.Linear(4, 4))  # the method's modules, beside it
    from semckd_ray.train_loop import _weights

    tracker = _Tracker(uri, run_id, None)
    tracker.final(cfg, distiller, _weights(distiller, 2, cfg))  # best at epoch 2 of 3
    tracker.close("FINISHED")
    client(uri).set_terminated(run_id, "FINISHED")
    return cfg, run_id, student


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client(uri).create_experiment("registry", artifact_location=(root / "artifacts").as_uri())
    cfg, run_id, student = logged_run(root, uri)
    return SimpleNamespace(root=root, uri=uri, cfg=cfg, run_id=run_id, student=student,
                           model=trainer.register_model(cfg, run_id))


def test_the_registered_version_is_an_mlflow_model_of_the_students_logits(registered):
    import mlflow.models

    assert registered.model == f"models:/{NAME}/1"
    mlflow_client = client(registered.uri)
    version = mlflow_client.get_model_version(NAME, "1")
    assert version.source.startswith("models:/m-") and version.run_id == registered.run_id
    assert version.tags["checkpoint"] == "checkpoints/best_model.pt"
    run = mlflow_client.get_run(registered.run_id)
    assert version.tags["checkpoint_sha256"] == run.data.tags["checkpoint.best.sha256"]
    assert run.data.tags["registered_model"] == registered.model
    model = mlflow_client.get_logged_model(version.source[len("models:/"):])  # the store links them by source
    assert model.experiment_id == run.info.experiment_id and model.source_run_id == registered.run_id
    assert str(model.status) in ("READY", "LoggedModelStatus.READY")
    assert model.params["student.model"] == "resnet8" and model.params["checkpoint.epoch"] == "2"
    info = mlflow.models.Model.load(_local_model(registered, version.source))  # its MLmodel file
    assert info.model_id == model.model_id and info.run_id == registered.run_id
    assert set(info.flavors) == {"pytorch", "python_function"}
    signature = info.signature.to_dict()
    assert json.loads(signature["inputs"]) == [{"type": "tensor", "tensor-spec": {"dtype": "float32",
                                                                                   "shape": [-1, 3, 32, 32]}}]
    assert json.loads(signature["outputs"]) == [{"type": "tensor", "tensor-spec": {"dtype": "float32",
                                                                                    "shape": [-1, 10]}}]
    assert info.saved_input_example_info is not None
    # The SemCKD modules and the training state stay in the run's checkpoints, out of the model.
    files = {a.path for a in mlflow_client.list_artifacts(registered.run_id, "checkpoints")}
    assert files == {"checkpoints/best_model.pt", "checkpoints/last.pt"}


def _local_model(registered, source: str) -> str:
    from semckd_ray.teacher import download_model

    return download_model(source, registered.uri)


def test_a_fresh_process_loads_it_with_mlflow_alone_and_gets_the_students_logits(registered, tmp_path):
    x = np.random.default_rng(1).standard_normal((5, 3, 32, 32), dtype=np.float32)  # another batch size
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([sys.executable, "-c", LOAD, registered.model, str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"MLFLOW_TRACKING_URI": registered.uri, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "shape (5, 10)" in done.stdout
    with torch.no_grad():
        expected = registered.student(torch.from_numpy(x))[0].numpy()
    assert np.array_equal(np.load(tmp_path / "y.npy"), expected)  # eval mode, the weights as trained


def test_registering_a_run_again_gives_its_version(registered):
    assert trainer.register_model(registered.cfg, registered.run_id) == registered.model
    assert len(client(registered.uri).search_model_versions(f"name='{NAME}'")) == 1


def _same_weights(model: nn.Module, student: nn.Module) -> None:
    got, want = model.state_dict(), student.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_a_teacher_loads_from_the_new_version_from_an_old_one_and_from_a_bare_mlflow_model(registered):
    mlflow_client = client(registered.uri)
    teacher = load_teacher(TeacherConfig(model="resnet8", checkpoint=registered.model), 10, torch.device("cpu"),
                           registered.uri)
    _same_weights(teacher, registered.student)
    assert teacher_run_id(registered.model, registered.uri) == registered.run_id
    # A version registered the way this project did before (the run's checkpoints folder).
    old = mlflow_client.create_model_version(NAME, source=f"runs:/{registered.run_id}/checkpoints",
                                             run_id=registered.run_id)
    _same_weights(load_teacher(TeacherConfig(model="resnet8", checkpoint=f"models:/{NAME}/{old.version}"), 10,
                               torch.device("cpu"), registered.uri), registered.student)
    # A version of the MLflow model alone, no run or checkpoint named: its own (pt2) weights.
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    source = mlflow_client.get_model_version(NAME, "1").source
    mlflow_client.create_registered_model("bare")
    with _use_tracking_uri(registered.uri):  # where MLflow's registry looks the model up
        mlflow_client.create_model_version("bare", source=source)
    _same_weights(load_teacher(TeacherConfig(model="resnet8", checkpoint="models:/bare/1"), 10,
                               torch.device("cpu"), registered.uri), registered.student)


def test_with_mlflow_down_at_the_end_the_registration_waits_for_sync(registered, monkeypatch, caplog, capsys):
    cfg, run_id, _ = logged_run(registered.root, registered.uri, name="later", register="digits-later")
    root = cfg.tracking.storage_path
    spool = Path(spool_dir(root, run_id))
    spool.mkdir(parents=True)  # the run's last calls wait there: MLflow was down when the training ended
    with caplog.at_level(logging.WARNING, logger="semckd_ray.trainer"):
        assert trainer.register_model(cfg, run_id) is None
    assert f"python -m semckd_ray.sync --storage {root}" in caplog.text
    marker = Path(root) / trainer.REGISTER_DIR / f"{run_id}.json"
    assert json.loads(marker.read_text())["name"] == "digits-later"
    assert trainer.register_pending(root, registered.uri) == [(run_id, "digits-later", None)]  # spool still there
    spool.rmdir()  # sync sent it, and then registers the model
    from semckd_ray import sync

    assert sync.main(["--storage", str(root), "--tracking-uri", registered.uri]) == 0
    assert f"run {run_id}: registered as models:/digits-later/1" in capsys.readouterr().out
    assert not marker.exists() and trainer.register_pending(root, registered.uri) == []

    # The server fails while the model is logged: deferred too, and a retry that still fails keeps it.
    cfg, run_id, _ = logged_run(registered.root, registered.uri, name="flaky", register="digits-flaky")

    def down(*args, **kwargs):
        raise ConnectionError("Max retries exceeded")

    def unreachable(uri, timeout_s=10.0):
        raise trainer.UserError(f"MLflow at {uri} is unreachable")

    monkeypatch.setattr(trainer, "log_student_model", down)
    monkeypatch.setattr(trainer.tracking, "check_reachable", unreachable)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="semckd_ray.trainer"):
        assert trainer.register_model(cfg, run_id) is None
        assert trainer.register_pending(root, registered.uri) == [(run_id, "digits-flaky", None)]
    assert "ConnectionError: Max retries exceeded" in caplog.text and "run this again" in caplog.text
    monkeypatch.undo()
    assert trainer.register_pending(root, registered.uri) == [(run_id, "digits-flaky", "models:/digits-flaky/1")]


def test_a_model_the_server_refuses_is_a_warning_not_a_retry(registered, monkeypatch, caplog):
    cfg, run_id, _ = logged_run(registered.root, registered.uri, name="refused", register="digits-refused")

    def refused(*args, **kwargs):
        raise RuntimeError("torch.export cannot trace this model")

    monkeypatch.setattr(trainer, "log_student_model", refused)
    with caplog.at_level(logging.WARNING, logger="semckd_ray.trainer"):
        assert trainer.register_model(cfg, run_id) is None
    assert "not registered as 'digits-refused' (RuntimeError: torch.export cannot trace" in caplog.text
    assert not (Path(cfg.tracking.storage_path) / trainer.REGISTER_DIR / f"{run_id}.json").exists()


def test_a_failed_run_is_not_registered(registered, caplog):
    cfg, run_id, _ = logged_run(registered.root, registered.uri, name="failed", register="digits-failed")
    client(registered.uri).set_terminated(run_id, "FAILED")
    with caplog.at_level(logging.WARNING, logger="semckd_ray.trainer"):
        assert trainer.register_model(cfg, run_id) is None
    assert f"the model of run {run_id} is not registered as 'digits-failed'" in caplog.text
    assert not (Path(cfg.tracking.storage_path) / trainer.REGISTER_DIR / f"{run_id}.json").exists()


# ------------------------------------------------------------------------------------------
# System metrics: MLflow's monitors, sampled by train_loop._SystemMetrics into a training's run


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # MLflow's variable: 10 s by default
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client = client(uri)
    experiment = mlflow_client.create_experiment("system", artifact_location=(tmp_path / "artifacts").as_uri())
    return SimpleNamespace(uri=uri, client=mlflow_client, run_id=mlflow_client.create_run(experiment).info.run_id)


def _system(store, key: str = "system/cpu_utilization_percentage") -> list[int]:
    return [m.step for m in store.client.get_metric_history(store.run_id, key)]


def _sample(store, nodes=("host",), rank=0, seconds: float = 0.6):
    import time

    monitor = _SystemMetrics.start(store.uri, store.run_id, list(nodes), rank)
    time.sleep(seconds)
    monitor.stop()
    assert not monitor._thread.is_alive()
    return monitor


def test_system_metrics_reach_the_run_and_a_restarted_worker_goes_on_after_them(store):
    _sample(store)
    keys = set(store.client.get_run(store.run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage", "system/disk_usage_percentage"} <= keys, keys
    first = _system(store)
    assert len(first) >= 3 and first == list(range(len(first)))
    memory = store.client.get_metric_history(store.run_id, "system/system_memory_usage_megabytes")
    assert all(m.value > 0 for m in memory)
    _sample(store, seconds=0.3)  # the same run again (Ray Train restarted the worker, or --resume)
    steps = _system(store)
    assert steps == list(range(len(steps))) and len(steps) > len(first)


def test_each_machine_is_sampled_once_and_named_on_several_nodes(store):
    assert _SystemMetrics.start(store.uri, store.run_id, ["a/1", "a/1"], 1) is None  # rank 0 samples node a
    _sample(store, nodes=("a/1", "b/2"), rank=1, seconds=0.3)
    assert _system(store, "system/b_2/cpu_utilization_percentage")
    assert not _system(store)


def test_an_outage_costs_one_warning_and_loses_no_sample(store, monkeypatch, caplog):
    import time

    calls = {"n": 0}
    get_run = type(store.client).get_run

    def flaky(self, run_id):
        calls["n"] += 1
        if calls["n"] <= 4:
            raise ConnectionError("Max retries exceeded")
        return get_run(self, run_id)

    monkeypatch.setattr(type(store.client), "get_run", flaky)
    with caplog.at_level(logging.WARNING, logger="semckd_ray.train_loop"):
        monitor = _SystemMetrics.start(store.uri, store.run_id, ["host"], 0)
        while calls["n"] < 7:
            time.sleep(0.05)
        monitor.stop()
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("MLflow is unreachable" in w for w in warnings) == 1, warnings
    assert sum("reachable again" in w for w in warnings) == 1, warnings
    steps = _system(store)
    assert steps == list(range(len(steps))) and len(steps) >= 6  # the samples of the outage too


def test_the_monitor_stops_by_itself_once_the_run_has_ended_and_a_dead_store_never_blocks(store, monkeypatch):
    import time

    monitor = _SystemMetrics.start(store.uri, store.run_id, ["host"], 0)
    store.client.set_terminated(store.run_id, "FAILED")  # the driver closed it: the training failed
    monitor._thread.join(5)
    assert not monitor._thread.is_alive()

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    from servers import free_port

    down = _SystemMetrics.start(f"http://127.0.0.1:{free_port()}", store.run_id, ["host"], 0)
    time.sleep(0.3)
    started = time.monotonic()
    down.stop()
    assert time.monotonic() - started < 6
