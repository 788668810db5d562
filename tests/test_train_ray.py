"""Training on Ray Train: a teacher with two gloo workers, then a SemCKD student that names it."""

import pytest

from semckd_ray.config import parse_train_config
from semckd_ray.tracking import client

pytestmark = pytest.mark.slow


def test_teacher_then_semckd_student_on_two_workers(ray_cluster, workdir):
    common = {
        "data": {"dataset": "digits", "root": str(workdir / "data")},
        "optim": {"epochs": 2, "batch_size": 32, "lr": 0.05},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "checkpoint": {"every": 1},
        "tracking": {"experiment": "ray-train-test"},
    }
    from semckd_ray.trainer import train

    teacher_tracking = {**common["tracking"], "register_model": "digits-resnet14"}
    teacher = train(parse_train_config({**common, "name": "t", "student": {"model": "resnet14"},
                                        "method": {"name": "vanilla"}, "tracking": teacher_tracking}))
    assert teacher.registered_model == "models:/digits-resnet14/1"
    student = train(parse_train_config({
        **common, "name": "s", "student": {"model": "resnet8"},
        "teacher": {"model": "resnet14", "checkpoint": "models:/digits-resnet14/1"},
        "method": {"name": "semckd", "beta": 20},
    }))

    mlflow = client(teacher.tracking_uri)
    for result, role in ((teacher, "teacher"), (student, "student")):
        run = mlflow.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["role"] == role
        assert run.data.tags["world_size"] == "2"
        assert run.data.tags["git_commit"]
        assert [m.step for m in mlflow.get_metric_history(result.run_id, "val_top1")] == [1, 2]
        assert [m.step for m in mlflow.get_metric_history(result.run_id, "train_ce")] == [1, 2]
        artifacts = {a.path for a in mlflow.list_artifacts(result.run_id, "checkpoints")}
        assert {"checkpoints/best_model.pt", "checkpoints/last.pt"} <= artifacts
        assert len(run.data.tags["checkpoint.best.sha256"]) == 64
        assert run.data.params["scaling.num_workers"] == "2"
        assert "config.yaml" in {a.path for a in mlflow.list_artifacts(result.run_id)}

    student_run = mlflow.get_run(student.run_id)  # it names its teacher's run, found by the registered name
    assert student_run.data.tags["teacher_run_id"] == teacher.run_id
    assert student_run.data.params["teacher.checkpoint"] == "models:/digits-resnet14/1"
    assert "train_semckd" in student_run.data.metrics and "train_kd" in student_run.data.metrics
