"""Run as a Ray driver by test_autoscaling: five Tune trials of one worker with a quarter of a GPU each.

Each trial builds its TorchTrainer with the project's own ``scaling_config`` and is let in by the
sweep's own ``ClusterLimiter``; only the worker's function is a stand-in (this machine has no
CUDA, so the real loop cannot run on the GPU Ray believes it gives). Each worker writes when it
ran, where, and which GPU Ray gave it, to ``OUT/<trial id>.json``.

    python gpu_share_trials.py OUT
"""

import json
import os
import sys
import time
from pathlib import Path

import ray
from ray import tune

from semckd_ray.capacity import TrialCapacity, worker_resources
from semckd_ray.config import parse_train_config
from semckd_ray.scheduling import ClusterLimiter
from semckd_ray.trainer import scaling_config
from semckd_ray.tune import TRIAL_DRIVER_MEMORY

OUT = Path(sys.argv[1])
AT_ONCE = 4  # what a GPU holds at a quarter each
WAIT_S = 90  # bounded: a wrong schedule (one at a time) fails the test in 5 x 90 s, it does not hang it
HOLD_S = 4  # after AT_ONCE are in, long enough for a fifth to show up if it could run too

cfg = parse_train_config({
    "name": "share", "data": {"dataset": "digits"}, "method": {"name": "vanilla"},
    "student": {"model": "resnet8"}, "optim": {"epochs": 1, "batch_size": 32},
    "scaling": {"num_workers": 1, "use_gpu": True, "gpus_per_worker": 0.25, "cpus_per_worker": 0.5},
})


def worker(config):
    """Holds its share of the GPU until AT_ONCE workers have started (or WAIT_S passed), then a little longer.

    A barrier, not a fixed sleep: trials start one after another on 2 busy cores, so the first
    could end before the fourth begins however well Ray packs them.
    """
    started = time.time()
    present = OUT / "present"
    present.mkdir(exist_ok=True)
    (present / config["trial"]).touch()
    while len(list(present.iterdir())) < AT_ONCE and time.time() - started < WAIT_S:
        time.sleep(0.5)
    time.sleep(HOLD_S)
    record = {"start": started, "end": time.time(), "node": ray.get_runtime_context().get_node_id(),
              "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    (OUT / f"{config['trial']}.json").write_text(json.dumps(record))


def trial(params):
    from ray.train.torch import TorchConfig, TorchTrainer

    trial_id = tune.get_context().get_trial_id()
    TorchTrainer(worker, train_loop_config={"trial": trial_id}, scaling_config=scaling_config(cfg),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=ray.train.RunConfig(name=f"share-{trial_id}", storage_path=str(OUT / "ray"))).fit()
    tune.report({"done": 1})


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    ray.init(address=os.environ["RAY_ADDRESS"])
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    capacity = TrialCapacity(worker_resources(cfg.scaling), cfg.scaling.num_workers)
    searcher = ClusterLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=0)), capacity)
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY}),  # as the sweep asks
        param_space={"x": tune.uniform(0, 1)},
        tune_config=tune.TuneConfig(metric="done", mode="max", search_alg=searcher, num_samples=5),
        run_config=tune.RunConfig(name="share", storage_path=str(OUT / "tune"), verbose=0),
    )
    results = tuner.fit()
    assert not results.errors, [str(e) for e in results.errors]
