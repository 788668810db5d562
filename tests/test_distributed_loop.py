"""The per-worker loop at world size 2 (two gloo processes, no Ray): what changes with N and what must not.

A CRD student on digits, because CRD is the method that keeps its own buffers (its memory bank)
and draws random negatives every step. Each rank records, from inside the loop, the random state
its first CRD step starts from, its memory bank at the end, and the student's weights and BatchNorm
statistics at every evaluation. About a minute on 2 cores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semckd_ray.config import parse_train_config
from semckd_ray.models import create_model

WORLD = 2
GLOBAL_BATCH = 32
DIGITS_TRAIN = 1293  # digits: 1437 training images, 144 of them held out for validation
STEPS = math.ceil(DIGITS_TRAIN / GLOBAL_BATCH)


def _config(tmp_path, num_workers: int) -> dict:
    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        torch.manual_seed(1)
        torch.save({"model": create_model("resnet8", num_classes=10).state_dict()}, teacher)
    return parse_train_config({
        "name": "ddp",
        "data": {"dataset": "digits", "root": str(tmp_path / "data")},
        "teacher": {"model": "resnet8", "checkpoint": str(teacher)},
        "student": {"model": "resnet8"},
        "method": {"name": "crd", "options": {"nce_k": 64}},
        "optim": {"epochs": 2, "batch_size": GLOBAL_BATCH, "lr": 0.05},
        "scaling": {"num_workers": num_workers},
        "checkpoint": {"every": 1},
    }).model_dump(mode="json")


def _rank_main(rank: int, cfg: dict, init_file: str, out_dir: str) -> None:
    import semckd_ray.train_loop as loop
    from semckd_ray.distill.crd import CRD

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    record: dict = {"evaluated": []}
    crd_forward, evaluate = CRD.forward, loop.evaluate

    def recording_forward(self, *args, **kwargs):
        if "rng" not in record:
            record["rng"] = torch.get_rng_state()
        record["crd"] = self
        return crd_forward(self, *args, **kwargs)

    def recording_evaluate(model, *args, **kwargs):
        record["evaluated"].append({k: v.clone() for k, v in model.state_dict().items()})
        return evaluate(model, *args, **kwargs)

    CRD.forward, loop.evaluate = recording_forward, recording_evaluate
    try:
        final = loop.run_worker(cfg, loop.LocalReporter(f"{out_dir}/ckpt{rank}", resume=False))
        torch.save({"rng": record["rng"], "memory_s": record["crd"].memory_s, "memory_t": record["crd"].memory_t,
                    "evaluated": record["evaluated"], "final": final}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_main, args=(_config(tmp_path, WORLD), str(tmp_path / "init"), str(tmp_path)),
             nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_each_rank_draws_its_own_negatives_and_the_memory_bank_stays_identical(ranks):
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])
    for key in ("memory_s", "memory_t"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key


def test_every_rank_evaluates_the_same_model_with_rank_0s_batchnorm_statistics(ranks):
    evaluations = [r["evaluated"] for r in ranks]
    assert len(evaluations[0]) == len(evaluations[1]) >= 2  # val every epoch, test at best and last
    for state_0, state_1 in zip(*evaluations):
        assert state_0.keys() == state_1.keys()
        for key in state_0:
            assert torch.equal(state_0[key], state_1[key]), key
    assert any("running_mean" in key for key in evaluations[0][0])


def test_an_epoch_takes_the_steps_of_the_global_batch_at_any_world_size(ranks):
    # ceil(N / 32) steps of the global batch, 16 images per worker per step.
    assert ranks[0]["final"]["train_steps"] == ranks[1]["final"]["train_steps"] == STEPS
    assert ranks[0]["final"]["train_top1"] == ranks[1]["final"]["train_top1"]  # summed over ranks
    assert math.isfinite(ranks[0]["final"]["test_top1_at_best_val"])


def test_the_same_config_at_world_size_1_takes_as_many_steps(tmp_path):
    from semckd_ray.train_loop import LocalReporter, run_worker

    cfg = _config(tmp_path, 1)
    cfg["optim"]["epochs"] = 1
    final = run_worker(cfg, LocalReporter(tmp_path / "ckpt"))
    assert final["train_steps"] == STEPS


# --- the dataset, prepared once per node ---------------------------------------------------------


def _prepare_main(rank: int, init_file: str, out_dir: str, local_ranks: list[int], failing: int | None) -> None:
    import os
    import time

    import semckd_ray.data as data
    from semckd_ray.errors import UserError
    from semckd_ray.train_loop import WorkerEnv, _prepare_data

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    calls = []

    def prepare(name, root, download):
        time.sleep(1.0)  # a download that takes a while: the other ranks must wait for it
        calls.append((name, root, download, time.monotonic()))
        if rank == failing:
            raise UserError(f"downloading CIFAR-100 failed on rank {rank}")

    data.prepare_dataset = prepare
    os.environ["LOCAL_RANK"] = str(local_ranks[rank])
    cfg = parse_train_config({"data": {"dataset": "cifar100", "root": f"{out_dir}/data", "download": True},
                              "student": {"model": "resnet8"}, "method": {"name": "vanilla"}})
    error = None
    try:
        _prepare_data(cfg, WorkerEnv(rank=rank, world_size=WORLD, local_rank=local_ranks[rank]))
    except UserError as exc:
        error = str(exc)
    torch.save({"calls": calls, "done": time.monotonic(), "error": error}, f"{out_dir}/prepare{rank}.pt")
    dist.destroy_process_group()


def _prepare(tmp_path, local_ranks: list[int], failing: int | None = None) -> list[dict]:
    mp.spawn(_prepare_main, args=(str(tmp_path / "init"), str(tmp_path), local_ranks, failing), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"prepare{r}.pt", weights_only=True) for r in range(WORLD)]


def test_one_node_downloads_once_and_its_other_ranks_wait_for_it(tmp_path):
    ranks = _prepare(tmp_path, local_ranks=[0, 1])  # both workers on one node
    assert [len(r["calls"]) for r in ranks] == [1, 0]
    assert ranks[0]["calls"][0][:3] == ("cifar100", str(tmp_path / "data"), True)
    assert ranks[1]["done"] >= ranks[0]["calls"][0][3]  # rank 1 went on only after the download
    assert ranks[0]["error"] is ranks[1]["error"] is None


def test_each_node_downloads_and_a_failure_on_one_stops_every_rank(tmp_path):
    ranks = _prepare(tmp_path, local_ranks=[0, 0], failing=1)  # two nodes, the second one offline
    assert [len(r["calls"]) for r in ranks] == [1, 1]
    assert "failed on rank 1" in ranks[1]["error"]
    assert "another node" in ranks[0]["error"] and "failed on rank 1" in ranks[0]["error"]
