"""The graphed training step (scaling.cuda_graphs): its bookkeeping on the CPU, the real capture on a GPU.

On a CPU a ``GraphedStep`` must fall back to eager steps with one warning and change nothing. Its
bookkeeping -- warm-up, when to capture, static inputs and outputs, eager steps for other shapes,
re-capture on an lr change, falling back when a capture fails or a method reads GPU values -- is
checked on the CPU through ``RecordingStep``, which stands in for the CUDA parts: its "capture" records
the step without changing any state, and its "replay" runs the step on whatever the static inputs hold,
with the optimizer settings of capture time, and writes into the outputs the capture returned, as a CUDA
graph does. Every such run must match eager ``train_step`` exactly. The tests marked ``needs_cuda``
check the real capture.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from semckd_ray.cuda_graphs import WARMUP_STEPS, GraphedStep
from semckd_ray.distill import DistillContext, DistillMethod, Distiller, create_method
from semckd_ray.models import create_model
from semckd_ray.teacher import FrozenTeacher
from semckd_ray.train_loop import WorkerEnv, _train_epoch, feature_shapes, train_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

NUM_CLASSES = 10
NUM_TRAIN = 200


@dataclass
class Setup:
    model: Distiller
    teacher: FrozenTeacher
    optimizer: torch.optim.SGD
    method: DistillMethod
    device: torch.device


def build(method: str = "kd", batch: int = 8, device: str = "cpu", student: str = "resnet8",
          teacher: str = "resnet14", options: dict | None = None, method_module: DistillMethod | None = None,
          seed: int = 0, lr: float = 0.05) -> Setup:
    """Student, frozen teacher, method and SGD as the trainer builds them; the same weights for one seed."""
    device = torch.device(device)
    torch.manual_seed(seed)
    student_model = create_model(student, num_classes=NUM_CLASSES).to(device)
    teacher_model = FrozenTeacher(create_model(teacher, num_classes=NUM_CLASSES).to(device),
                                  torch.contiguous_format)
    ctx = DistillContext(
        student_shapes=feature_shapes(student_model, device),
        teacher_shapes=feature_shapes(teacher_model, device),
        batch_size=batch,
        num_classes=NUM_CLASSES,
        num_train=NUM_TRAIN,
        train_labels=torch.arange(NUM_TRAIN) % NUM_CLASSES,
    )
    m = method_module if method_module is not None else create_method(method, ctx, options)
    m = m.to(device)
    model = Distiller(student_model, m, beta=10.0 if method == "semckd" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    torch.manual_seed(seed + 1)  # the step's own random stream (CRD's negatives)
    return Setup(model, teacher_model, optimizer, m, device)


def batches(sizes, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, 3, 32, 32, generator=gen)
        y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        index = torch.randperm(NUM_TRAIN, generator=gen)[:n]
        out.append((x.to(device), y.to(device), index.to(device)))
    return out


def run(setup: Setup, data, step=None, lr_at: dict[int, float] | None = None):
    """Train on ``data`` (with ``step``, or eager ``train_step``); returns every step's loss terms."""
    needs_index = setup.method.needs_index
    history = []
    for k, (x, y, index) in enumerate(data):
        if lr_at and k in lr_at:
            for group in setup.optimizer.param_groups:
                group["lr"] = lr_at[k]
        index = index if needs_index else None
        if step is None:
            _, losses = train_step(setup.model, setup.teacher, setup.optimizer, x, y, index, setup.device, False)
        else:
            _, losses = step(x, y, index)
        history.append({name: value.detach().clone() for name, value in losses.items()})
    return history


def state(setup: Setup) -> dict[str, torch.Tensor]:
    """Weights, buffers and momentum buffers."""
    out = {f"model.{k}": v.detach().clone() for k, v in setup.model.state_dict().items()}
    for i, p in enumerate(setup.model.parameters()):
        buf = setup.optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[f"momentum.{i}"] = buf.clone()
    return out


def assert_same(a, b):
    """Bit-identical loss histories or states."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
        return
    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), k
        for name in x:
            assert torch.equal(x[name], y[name]), f"step {k}, {name}: {x[name]} vs {y[name]}"


def warnings_of(caplog):
    return [r for r in caplog.records if r.name == "semckd_ray.cuda_graphs" and r.levelno == logging.WARNING]


# ---- a CPU stand-in for the CUDA parts


class RecordedGraph:
    """What ``torch.cuda.CUDAGraph`` does with a step, on the CPU.

    Capturing runs ``fn`` once to obtain its outputs and then puts every tensor of the training state
    (and the RNG) back, so the capture changes nothing, as a real capture runs nothing. A replay runs
    ``fn`` with the parameter groups' settings of capture time (a graph bakes the lr in) and writes the
    results into the tensors the capture returned.
    """

    def __init__(self, fn, setup: Setup):
        self.fn, self.setup = fn, setup
        tensors = list(setup.model.parameters()) + list(setup.model.buffers()) + [
            s["momentum_buffer"] for s in setup.optimizer.state.values() if "momentum_buffer" in s]
        saved = [t.detach().clone() for t in tensors]
        rng = torch.get_rng_state()
        logits, losses = fn()
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
        torch.set_rng_state(rng)
        self.outputs = (logits.detach(), {k: v.detach() for k, v in losses.items()})
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in setup.optimizer.param_groups]
        self.replays = 0

    def replay(self):
        self.replays += 1
        groups = self.setup.optimizer.param_groups
        now = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        for g, baked in zip(groups, self.groups):
            g.update(baked)
        try:
            logits, losses = self.fn()
        finally:
            for g, current in zip(groups, now):
                g.update(current)
        with torch.no_grad():
            self.outputs[0].copy_(logits)
            for name, value in losses.items():
                self.outputs[1][name].copy_(value)


class ReadsOnCpu(TorchDispatchMode):
    """Records every op that hands a tensor's value to Python (``.item()``, ``bool(t)``): a sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


class RecordingStep(GraphedStep):
    """``GraphedStep`` with its CUDA parts replaced: ``RecordedGraph`` for the capture, and host reads of
    tensor values (``ReadsOnCpu``) standing in for CUDA's sync debug mode."""

    def __init__(self, setup: Setup, capture_error: Exception | None = None, **kwargs):
        self.setup = setup
        self.capture_error = capture_error
        self.graphs: list[RecordedGraph] = []
        super().__init__(setup.model, setup.teacher, setup.optimizer, setup.device, False, method=setup.method,
                         **kwargs)

    def _unsupported_reason(self, method):
        return getattr(method, "graph_unsafe_reason", None)  # the device check is what this class replaces

    def _run_warmup(self, fn):
        return fn()

    @contextlib.contextmanager
    def _watch_syncs(self, enabled):
        found = []
        if not enabled:
            yield found
            return
        with ReadsOnCpu() as mode:
            yield found
        found.extend(["a host read"] * mode.reads)

    def _capture(self, fn):
        if self.capture_error is not None:
            raise self.capture_error
        graph = RecordedGraph(fn, self.setup)
        self.graphs.append(graph)
        return graph, graph.outputs


class ReadsItsLoss(DistillMethod):
    """KD plus a term whose weight depends on a tensor's value read on the CPU: what a graph cannot replay."""

    name = "reads_its_loss"
    default_beta = 1.0

    def forward(self, out_s, out_t, target, index=None):
        scale = 1.0 if out_s[0].mean().item() > 0 else 0.5  # noqa: PLR2004 -- a host read and a branch on it
        return {"extra": scale * out_s[0].pow(2).mean()}


# ---- CPU: the fallback and the bookkeeping


def test_on_a_cpu_it_warns_once_and_steps_exactly_as_eager(caplog):
    data = batches([8] * 5)
    eager = build("semckd")
    expected = run(eager, data)
    graphed = build("semckd")
    with caplog.at_level(logging.INFO, logger="semckd_ray.cuda_graphs"):
        step = GraphedStep(graphed.model, graphed.teacher, graphed.optimizer, graphed.device, False,
                           method=graphed.method, batch_size=8)
        got = run(graphed, data, step)
    records = warnings_of(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "'semckd'" in message and "cpu" in message and "eagerly" in message
    assert step.fallback_reason is not None
    assert step.stats == {"warmup": 0, "captures": 0, "replays": 0, "eager": 5}
    assert_same(got, expected)
    assert_same(state(graphed), state(eager))


def test_replays_match_eager_across_partial_batches_and_an_lr_change(caplog):
    # A partial batch first (never captured at that shape), warm-up, capture, replays, the epoch's partial
    # last batch (eager), a new lr (re-captured), and another partial batch.
    sizes = [5] + [8] * 6 + [5] + [8] * 4 + [5]
    lr_change = {8: 0.005}
    data = batches(sizes)
    eager = build("kd")
    expected = run(eager, data, lr_at=lr_change)
    graphed = build("kd")
    step = RecordingStep(graphed, batch_size=8)
    with caplog.at_level(logging.INFO, logger="semckd_ray.cuda_graphs"):
        got = run(graphed, data, step, lr_at=lr_change)
    assert not warnings_of(caplog)
    assert step.fallback_reason is None
    assert step.stats == {"warmup": WARMUP_STEPS, "captures": 2, "replays": 10 - WARMUP_STEPS, "eager": 3}
    assert [g.replays for g in step.graphs] == [6 - WARMUP_STEPS, 4]
    assert [g.groups[0]["lr"] for g in step.graphs] == [0.05, 0.005]
    assert_same(got, expected)
    assert_same(state(graphed), state(eager))


def test_without_a_recapture_the_old_lr_would_be_replayed():
    # The stand-in really bakes the lr in: had the step not re-captured, the weights would differ.
    data = batches([8] * 6)
    eager = build("kd")
    run(eager, data, lr_at={5: 0.005})
    graphed = build("kd")
    step = RecordingStep(graphed, batch_size=8)
    step._graph_is_current = lambda: True  # never notices the change
    run(graphed, data, step, lr_at={5: 0.005})
    assert step.stats["captures"] == 1
    weights = [k for k in state(eager) if k.startswith("model.student") and k.endswith("weight")]
    assert any(not torch.equal(state(eager)[k], state(graphed)[k]) for k in weights)


def test_semckd_replays_match_eager():
    data = batches([8] * 6)
    eager = build("semckd")
    expected = run(eager, data)
    graphed = build("semckd")
    step = RecordingStep(graphed, batch_size=8)
    got = run(graphed, data, step)
    assert step.stats == {"warmup": WARMUP_STEPS, "captures": 1, "replays": 6 - WARMUP_STEPS, "eager": 0}
    assert_same(got, expected)
    assert_same(state(graphed), state(eager))


def test_replayed_outputs_are_read_by_the_epoch_loop_as_eager_ones():
    # _train_epoch with the graphed step gives the eager epoch's metrics exactly.
    data = batches([8] * 6 + [3])
    env = WorkerEnv()
    eager = build("kd")
    expected = _train_epoch(eager.model, eager.teacher, data, eager.optimizer, env, False, False)
    graphed = build("kd")
    step = RecordingStep(graphed, batch_size=8)
    got = _train_epoch(graphed.model, graphed.teacher, data, graphed.optimizer, env, False, False, graphed=step)
    assert step.stats["replays"] == 6 - WARMUP_STEPS and step.stats["eager"] == 1
    assert got == expected
    assert_same(state(graphed), state(eager))


def test_a_failed_capture_warns_once_and_the_run_goes_on_eagerly(caplog):
    try:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    except RuntimeError:
        try:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        except RuntimeError as second:
            error = second
    data = batches([8] * 7)
    eager = build("kd")
    expected = run(eager, data)
    graphed = build("kd")
    step = RecordingStep(graphed, capture_error=error, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="semckd_ray.cuda_graphs"):
        got = run(graphed, data, step)
    records = warnings_of(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "'kd'" in message and "operation not permitted when stream is capturing" in message
    # The batch whose capture failed was trained eagerly, and so was every later one.
    assert step.stats == {"warmup": WARMUP_STEPS, "captures": 0, "replays": 0, "eager": 7 - WARMUP_STEPS}
    assert_same(got, expected)
    assert_same(state(graphed), state(eager))


def test_a_method_that_reads_gpu_values_is_found_during_warm_up(caplog):
    data = batches([8] * 6)
    ctx = build("kd").method.ctx
    eager, graphed = (build("kd", method_module=ReadsItsLoss(ctx)) for _ in range(2))
    expected = run(eager, data)
    step = RecordingStep(graphed, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="semckd_ray.cuda_graphs"):
        got = run(graphed, data, step)
    records = warnings_of(caplog)
    assert len(records) == 1
    assert "'reads_its_loss'" in records[0].getMessage() and "CPU wait for the GPU" in records[0].getMessage()
    # The warm-up step that found it completed normally; no capture was tried.
    assert step.stats == {"warmup": WARMUP_STEPS, "captures": 0, "replays": 0, "eager": 6 - WARMUP_STEPS}
    assert_same(got, expected)
    assert_same(state(graphed), state(eager))


def test_crd_is_never_captured_and_says_why(caplog):
    options = {"nce_k": 32, "feat_dim": 16}
    data = batches([8] * 5)
    eager = build("crd", options=options)
    expected = run(eager, data)
    graphed = build("crd", options=options)
    with caplog.at_level(logging.WARNING, logger="semckd_ray.cuda_graphs"):
        step = RecordingStep(graphed, batch_size=8)
        got = run(graphed, data, step)
    records = warnings_of(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "'crd'" in message and "reads GPU values on the CPU" in message
    assert step.stats == {"warmup": 0, "captures": 0, "replays": 0, "eager": 5}
    assert_same(got, expected)
    assert_same(state(graphed), state(eager))


def test_replaced_optimizer_state_is_captured_again():
    # A restore (optimizer.load_state_dict) after capture replaces the momentum buffers the graph holds.
    data = batches([8] * 8)
    eager = build("kd")
    graphed = build("kd")
    step = RecordingStep(graphed, batch_size=8)
    for setup, stepper in ((eager, None), (graphed, step)):
        run(setup, data[:5], stepper)
        saved = copy.deepcopy(setup.optimizer.state_dict())
        setup.optimizer.load_state_dict(saved)
        run(setup, data[5:], stepper)
    assert step.stats["captures"] == 2
    assert_same(state(graphed), state(eager))


# ---- GPU: the real capture


@pytest.fixture
def deterministic_cudnn():
    """The same cuDNN kernels in the eager and the graphed run, and the global settings restored after."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@needs_cuda
@pytest.mark.parametrize("method", ["semckd", "kd"])
def test_hundreds_of_graphed_steps_match_eager_on_a_gpu(method, deterministic_cudnn):
    # resnet32x4 -> resnet8x4 at batch 64, 300 steps, the lr divided by 10 after 150 (a re-capture); kd
    # also gets a partial batch every 50 steps (eager). Same kernels in both runs (deterministic cuDNN),
    # so the losses agree to float32 rounding, accumulated over the steps.
    sizes = [64] * 300 if method == "semckd" else [48 if k % 50 == 49 else 64 for k in range(300)]
    pool = batches(sizes[:50], device="cuda")
    data = [pool[k % 50] for k in range(300)]
    lr_change = {150: 0.001}
    kwargs = dict(batch=64, device="cuda", student="resnet8x4", teacher="resnet32x4", lr=0.01)
    eager = build(method, **kwargs)
    expected = run(eager, data, lr_at=lr_change)
    graphed = build(method, **kwargs)
    step = GraphedStep(graphed.model, graphed.teacher, graphed.optimizer, graphed.device, False,
                       method=graphed.method, batch_size=64)
    got = run(graphed, data, step, lr_at=lr_change)
    assert step.fallback_reason is None
    assert step.stats["captures"] == 2
    partial = sum(n != 64 for n in sizes)
    assert step.stats["eager"] == partial
    assert step.stats["replays"] == 300 - WARMUP_STEPS - partial
    for k, (a, b) in enumerate(zip(got, expected)):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=f"step {k}, {name}")
    final = state(graphed)
    for key, value in state(eager).items():
        torch.testing.assert_close(final[key], value, rtol=1e-3, atol=1e-5, msg=key)


@needs_cuda
def test_a_method_that_syncs_falls_back_on_a_gpu(caplog, deterministic_cudnn):
    data = batches([8] * 6, device="cuda")
    ctx = build("kd", device="cuda").method.ctx
    eager = build("kd", device="cuda", method_module=ReadsItsLoss(ctx))
    expected = run(eager, data)
    graphed = build("kd", device="cuda", method_module=ReadsItsLoss(ctx))
    step = GraphedStep(graphed.model, graphed.teacher, graphed.optimizer, graphed.device, False,
                       method=graphed.method, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="semckd_ray.cuda_graphs"):
        got = run(graphed, data, step)
    records = warnings_of(caplog)
    assert len(records) == 1 and "'reads_its_loss'" in records[0].getMessage()
    assert step.stats["captures"] == 0 and step.stats["replays"] == 0
    assert_same(got, expected)


@needs_cuda
def test_crd_falls_back_on_a_gpu(caplog, deterministic_cudnn):
    options = {"nce_k": 32, "feat_dim": 16}
    data = batches([8] * 5, device="cuda")
    eager = build("crd", device="cuda", options=options)
    expected = run(eager, data)
    graphed = build("crd", device="cuda", options=options)
    with caplog.at_level(logging.WARNING, logger="semckd_ray.cuda_graphs"):
        step = GraphedStep(graphed.model, graphed.teacher, graphed.optimizer, graphed.device, False,
                           method=graphed.method, batch_size=8)
        got = run(graphed, data, step)
    records = warnings_of(caplog)
    assert len(records) == 1 and "'crd'" in records[0].getMessage()
    assert step.stats["eager"] == 5
    assert_same(got, expected)


@needs_cuda
def test_run_worker_with_cuda_graphs_trains_as_eager_on_a_gpu(tmp_path, caplog):
    from semckd_ray.config import parse_train_config
    from semckd_ray.train_loop import LocalReporter, run_worker

    teacher_path = tmp_path / "teacher.pt"
    torch.manual_seed(1)
    torch.save({"model": create_model("resnet14", num_classes=10).state_dict()}, teacher_path)

    def config(graphs: bool):
        return parse_train_config({
            "name": "graphs",
            "data": {"dataset": "digits", "root": str(tmp_path / "data")},
            "student": {"model": "resnet8"},
            "teacher": {"model": "resnet14", "checkpoint": str(teacher_path)},
            "method": {"name": "semckd", "beta": 10},
            "optim": {"epochs": 2, "batch_size": 32, "lr": 0.01, "lr_decay_epochs": [1]},
            "scaling": {"use_gpu": True, "cuda_graphs": graphs},
        }).model_dump(mode="json")

    eager = LocalReporter(tmp_path / "eager")
    run_worker(config(False), eager)
    graphed = LocalReporter(tmp_path / "graphed")
    with caplog.at_level(logging.INFO, logger="semckd_ray.cuda_graphs"):
        run_worker(config(True), graphed)
    captures = [r for r in caplog.records if r.name == "semckd_ray.cuda_graphs" and "captured" in r.getMessage()]
    assert len(captures) == 2  # epoch 1, and again for epoch 2's lr
    assert not warnings_of(caplog)
    for a, b in zip(graphed.metrics, eager.metrics):
        assert a["train_steps"] == b["train_steps"]
        # cudnn.benchmark may pick other algorithms in the two runs: float32 rounding apart, not bits.
        assert a["train_total"] == pytest.approx(b["train_total"], rel=1e-3)
        assert a["val_top1"] == pytest.approx(b["val_top1"], abs=2.0)
