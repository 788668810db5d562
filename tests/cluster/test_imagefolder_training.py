"""ImageNet's pair on a streamed class-per-folder tree: SemCKD from torchvision's ResNet-34 into ResNet-18
through ``python -m semckd_ray.train``, two workers on the two nodes of the session's Ray cluster.

The tree is ImageNet's layout at a toy size (10 classes, 16 + 4 JPEGs each, 64-96 px, one of them
corrupt), decoded by Ray Data at 32 px. The two workers take a CPU of each node, so a third node of one
CPU joins for the module: Ray Data's decoding runs there, as on a GPU cluster it runs on the CPUs the
workers leave free (a training whose workers hold every CPU would wait for them). The teacher is a torchvision-format weight file (a plain state
dict, as ``resnet34-b627a593.pth`` is). What is checked: the run finishes on two nodes; the data's
sizes and every epoch's steps follow from the listing and Ray Data's equal split; the corrupt file is
counted and named, not fatal; the teacher's logits are torchvision's. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from semckd_ray.tracking import client

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jpeg_tree import write_jpeg_tree  # noqa: E402
from servers import start_ray_worker_node, stop_marked, wait_until  # noqa: E402

pytestmark = pytest.mark.slow

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 16, 4
CORRUPT = 1  # one more file in train/, a corrupt JPEG
# Held out of train/ (by split seed 0; the corrupt file stays in train/): 144 files left to train on,
# 72 per worker, 9 full batches of 8: every file, the corrupt one too, reaches a batch every epoch.
VAL_SIZE = 17
GLOBAL_BATCH, WORKERS, EPOCHS = 16, 2, 2
CLI_TIMEOUT_S = 900


def _cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "semckd_ray.train", *args], cwd=cwd, env=dict(os.environ),
                            capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    if check:
        assert result.returncode == 0, f"exited {result.returncode}:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    return result


def _config(work: Path, root: Path, uri: str, teacher_file: Path) -> dict:
    return {
        "name": "imagenet-toy",
        "data": {"dataset": "imagefolder", "root": str(root), "image_size": 32, "eval_resize": 36,
                 "val_size": VAL_SIZE, "eval_batch_size": 32, "decode_cpus": 1},
        "teacher": {"model": "ResNet34", "checkpoint": str(teacher_file)},
        "student": {"model": "ResNet18"},
        "method": {"name": "semckd", "beta": 50},
        "optim": {"epochs": EPOCHS, "batch_size": GLOBAL_BATCH, "lr": 0.01, "weight_decay": 1e-4,
                  "lr_decay_epochs": [1]},
        "scaling": {"num_workers": WORKERS, "cpus_per_worker": 1},
        "checkpoint": {"every": 1},
        "tracking": {"experiment": "imagefolder", "uri": uri, "storage_path": str(work / "storage")},
    }


@pytest.fixture(scope="module")
def decode_node(ray_cluster):
    """A third node of one CPU for the module, with a marker of its own: stopping it leaves the session's two."""
    import ray

    def alive() -> int:
        return sum(n["Alive"] for n in ray.nodes())

    before = alive()
    node_root = Path(tempfile.mkdtemp(prefix="srd", dir="/tmp"))  # short: Ray's Unix socket paths
    try:
        start_ray_worker_node(ray_cluster, node_root, num_cpus=1, marker=str(node_root))
        wait_until(lambda: alive() == before + 1, 120, "the decoding node")
        yield
    finally:
        stop_marked(str(node_root))
        wait_until(lambda: alive() == before, 120, "the decoding node to leave")
        shutil.rmtree(node_root, ignore_errors=True)


@pytest.fixture(scope="module")
def streamed(ray_cluster, decode_node, mlflow_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("imagefolder")
    root = write_jpeg_tree(work / "tree", classes=CLASSES, train_per_class=TRAIN_PER_CLASS,
                           val_per_class=VAL_PER_CLASS, sizes=(64, 96), corrupt=CORRUPT)
    torch.manual_seed(0)
    teacher = torchvision.models.resnet34(num_classes=CLASSES)
    teacher_file = work / "resnet34-toy.pth"
    torch.save(teacher.state_dict(), teacher_file)  # torchvision's format: a bare state dict
    config = work / "student.yaml"
    config.write_text(yaml.safe_dump(_config(work, root, mlflow_server.url, teacher_file)))
    output = _cli("--config", str(config), cwd=work).stdout
    run_id = next(line.split()[1] for line in output.splitlines() if line.startswith("run "))
    return {"run": client(mlflow_server.url).get_run(run_id), "output": output, "work": work, "root": root,
            "uri": mlflow_server.url, "teacher": teacher, "teacher_file": teacher_file}


def test_semckd_resnet34_to_resnet18_streams_on_two_nodes(streamed):
    run = streamed["run"]
    assert run.info.status == "FINISHED", run.data.tags.get("failure_reason")
    nodes = run.data.tags["worker_nodes"].split(",")
    assert len(nodes) == WORKERS and len(set(nodes)) == WORKERS, nodes
    m = run.data.metrics
    train_images = CLASSES * TRAIN_PER_CLASS + CORRUPT - VAL_SIZE
    assert m["data_train_images"] == train_images
    assert m["data_val_images"] == VAL_SIZE and m["data_test_images"] == CLASSES * VAL_PER_CLASS
    assert m["data_classes"] == CLASSES
    # Ray Data's equal split: 72 images per worker, full batches of 8.
    assert m["train_steps"] == train_images // WORKERS // (GLOBAL_BATCH // WORKERS)
    assert 0 <= m["test_top1_last"] <= 100 and 0 <= m["val_top1"] <= 100
    history = client(streamed["uri"]).get_metric_history(run.info.run_id, "train_total")
    assert sorted(h.step for h in history) == list(range(1, EPOCHS + 1))  # each epoch logged once
    assert run.data.params["data.image_size"] == "32"


def test_a_corrupt_jpeg_is_counted_and_named_not_fatal(streamed):
    corrupt = [p for p in (streamed["root"] / "train").rglob("*") if "corrupt" in p.name]
    assert len(corrupt) == CORRUPT
    history = client(streamed["uri"]).get_metric_history(streamed["run"].info.run_id, "train_skipped_images")
    assert {h.step: h.value for h in history} == {epoch: 1.0 for epoch in range(1, EPOCHS + 1)}
    assert f"1 image(s) could not be decoded and were replaced by others of their batch: {corrupt[0]}" \
        in streamed["output"]


def test_the_torchvision_teacher_file_gives_torchvisions_logits(streamed):
    from semckd_ray.config import TeacherConfig
    from semckd_ray.teacher import load_teacher

    ours = load_teacher(TeacherConfig(model="ResNet34", checkpoint=str(streamed["teacher_file"])), CLASSES,
                        torch.device("cpu")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], streamed["teacher"].eval()(x), rtol=0, atol=0)


def test_an_empty_folder_is_refused_before_training_with_the_layout(streamed, tmp_path):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    raw = _config(streamed["work"], empty, streamed["uri"], streamed["teacher_file"])
    config = tmp_path / "empty.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = _cli("--config", str(config), cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "train/<class>" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
