"""How many trials a cluster holds, now and once grown, and what the driver refuses, waits for or warns about."""

import json

import pytest

from semckd_ray import capacity
from semckd_ray.capacity import ClusterGrowth, NodeType, TrialCapacity, trials_that_fit, worker_resources, workers_on
from semckd_ray.config import parse_train_config
from semckd_ray.errors import UserError


def config(**scaling):
    return parse_train_config({"data": {"dataset": "digits"}, "student": {"model": "resnet8"},
                               "method": {"name": "vanilla"}, "optim": {"batch_size": 64}, "scaling": scaling})


def test_a_quarter_gpu_packs_four_workers_on_a_gpu_and_the_cpus_can_limit_it():
    quarter = worker_resources(config(use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=2).scaling)
    assert quarter == {"CPU": 2.0, "GPU": 0.25}
    assert workers_on({"CPU": 16, "GPU": 1}, quarter) == 4
    assert workers_on({"CPU": 6, "GPU": 1}, quarter) == 3  # three workers' CPUs
    assert workers_on({"CPU": 16, "GPU": 8}, quarter) == 8
    tenth = worker_resources(config(use_gpu=True, gpus_per_worker=0.1, cpus_per_worker=0.5).scaling)
    assert workers_on({"CPU": 8, "GPU": 1}, tenth) == 10  # 10 x 0.1 is 1 despite float rounding
    assert worker_resources(config().scaling) == {"CPU": 1.0}  # no GPU asked on CPU
    # Two-worker trials across two nodes of one slot each: one trial, its workers on both.
    assert trials_that_fit([{"CPU": 1}, {"CPU": 1}], {"CPU": 1.0}, 2) == 1
    assert trials_that_fit([{"CPU": 1}, {"CPU": 1}], {"CPU": 1.0}, 4) == 0


def test_the_limit_follows_the_cluster_now_or_as_large_as_it_may_grow():
    per = {"CPU": 1.0}
    two = [{"CPU": 1}, {"CPU": 1}]
    assert TrialCapacity(per, 1).limit(two, ClusterGrowth("fixed")) == 2
    assert TrialCapacity(per, 1).limit(two + [{"CPU": 2}], ClusterGrowth("fixed")) == 4  # a node joined
    assert TrialCapacity(per, 2).limit(two, ClusterGrowth("fixed")) == 1  # two seeds at once per trial
    assert TrialCapacity(per, 1, max_concurrent=1).limit(two, ClusterGrowth("fixed")) == 1
    known = ClusterGrowth("known", (NodeType({"CPU": 4}, 3),))
    assert TrialCapacity(per, 1).limit(two, known) == 14  # 2 now + 3 nodes of 4 it may add
    assert TrialCapacity(per, 1, max_concurrent=5).limit(two, known) == 5
    unknown = ClusterGrowth("unknown")
    assert TrialCapacity(per, 1).limit(two, unknown) == 4  # as many wait as run
    assert TrialCapacity(per, 1).limit([], unknown) == 1  # one waits for the first node
    assert TrialCapacity(per, 1).limit([], ClusterGrowth("fixed")) == 1  # never none


def test_a_fixed_cluster_refuses_what_no_node_holds_an_autoscaling_one_judges_or_warns(capsys):
    from semckd_ray.trainer import check_resources

    cfg = config(cpus_per_worker=4)
    head = [{"NodeID": "a" * 56, "Alive": True, "Resources": {"CPU": 0}}]
    with pytest.raises(UserError, match="the largest node has 0 CPUs"):
        check_resources(cfg, {"CPU": 0}, nodes=head, growth=ClusterGrowth("fixed"))
    # Ray was told the node types: one of 8 CPUs fits a worker, so the run waits for it.
    check_resources(cfg, {"CPU": 0}, nodes=head, growth=ClusterGrowth("known", (NodeType({"CPU": 8}, 2),)))
    with pytest.raises(UserError, match="running or that the autoscaler can add has 2 CPUs"):
        check_resources(cfg, {"CPU": 0}, nodes=head, growth=ClusterGrowth("known", (NodeType({"CPU": 2}, 5),)))
    with pytest.raises(UserError, match="the cluster can grow to 16"):  # 8 workers x 4 CPUs > 2 x 8
        check_resources(config(cpus_per_worker=4, num_workers=8), {"CPU": 0}, nodes=head,
                        growth=ClusterGrowth("known", (NodeType({"CPU": 8}, 2),)))
    capsys.readouterr()
    check_resources(cfg, {"CPU": 0}, nodes=head, growth=ClusterGrowth("unknown"))
    assert "warning: the cluster holds no worker of this run now" in capsys.readouterr().out
    gpu = config(use_gpu=True, gpus_per_worker=0.5)
    with pytest.raises(UserError, match=r"3 GPUs \(scaling.num_workers=1 x scaling.gpus_per_worker=0.5\)"):
        check_resources(gpu, {"CPU": 8, "GPU": 2}, trials_at_once=6)


def test_an_autoscaler_is_told_apart_from_hand_started_nodes_by_its_status(monkeypatch):
    import ray.experimental.internal_kv as kv

    def status(mapping):
        report = {"autoscaler_report": {"node_type_mapping": mapping}}
        monkeypatch.setattr(kv, "_internal_kv_get", lambda key, **_: json.dumps(report).encode())
        return capacity._autoscaler_names_node_types()

    # Ray's read-only view of `ray start` nodes names each after its id.
    assert status({"ab12": "node_ab12", "cd34": "node_cd34"}) is False
    assert status({"ab12": "ray.head.default", "cd34": "ray.worker.gpu"}) is True
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key, **_: None)
    assert capacity._autoscaler_names_node_types() is False
