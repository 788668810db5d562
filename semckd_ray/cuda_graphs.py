"""The whole training step captured in a CUDA graph and replayed for every batch (``scaling.cuda_graphs``).

At the paper's batch of 64 a SemCKD step on a GPU is bound by kernel launches, not by arithmetic: a few
hundred small kernels per direction, each launched from Python (bench/README.md, the H200 table). A CUDA
graph launches all of them at once. ``GraphedStep`` follows PyTorch's whole-network capture recipe (the
CUDA Graphs notes, "Whole-network capture"):

1. Warm-up. The first ``WARMUP_STEPS`` steps at the captured batch shape run eagerly on a side stream. They
   are ordinary training steps on real batches, counted and logged as any other; they create what cannot
   be created inside a capture: SGD's momentum buffers (made on its first step), cuDNN's autotuned
   algorithms, cuBLAS workspaces. The last of them runs with CUDA's sync debug mode on, so that a method
   that makes the CPU wait for the GPU (``.item()``, ``bool(tensor)``, control flow on a tensor's value)
   is found there, before any capture, and the step still completes normally.
2. Capture. ``zero_grad(set_to_none=True)``, so that backward allocates the gradients from the graph's
   private memory pool, then one whole ``train_step`` -- teacher forward, distiller forward, loss terms,
   backward, SGD step -- on static input tensors is recorded (not run). The batch it was recorded on is
   then trained by the first replay.
3. Replay. Each batch is copied into the static inputs and the graph replayed. The logits and loss terms
   returned are the static tensors the capture produced, overwritten by every replay: read them (as
   ``_train_epoch`` does, on the same stream) before the next step.

Parameters, BatchNorm statistics, method buffers and momentum buffers are updated in place by the
replays, so evaluation, checkpoints and resuming see them exactly as after eager steps.

The learning rate is baked into the graph, and a change re-captures it. SGD's foreach and for-loop paths
(torch 2.14 ``torch/optim/sgd.py``) apply it as ``alpha=-lr``, which turns a Tensor lr into a Python
number with ``.item()`` (``aten._local_scalar_dense``): a device-to-host copy that a capture refuses on
a CUDA tensor, and a constant frozen at capture time on a CPU one. Only the fused kernel reads a Tensor lr
on the device, and switching the trainer's optimizer to it would change the eager path's arithmetic. The
trainer changes the lr at most once per epoch (at the decay milestones, and in each warm-up epoch), and a
capture costs about one eager step's launches plus the graph's instantiation, so re-capturing is the
simpler exact choice: any change of a parameter group's hyper-parameters is noticed before the next
replay, and the next full batch is captured again (no new warm-up: the state it creates exists).

A batch of another shape than the captured one (the last partial batch of a method without
``requires_fixed_batch``) runs eagerly with the same math; it is never replayed at the wrong shape.
Where the step cannot be captured -- no CUDA device, a method that declares ``graph_unsafe_reason``
(CRD), a CPU-GPU sync found during warm-up, or a capture that raises -- one warning names the method and
the reason, and every later step of the run is eager.

Resuming: the graph is captured lazily, on the first steps a run takes, so after ``run_worker`` has
restored the weights, the optimizer state and the RNG states. A resumed run warms up and captures
again; a step that is graphed draws no random numbers (the one method that does, CRD, runs eagerly), so
the RNG streams a checkpoint saves advance as in the eager run. Should the optimizer's state be replaced
after capture (``optimizer.load_state_dict``), the replaced momentum buffers are noticed and the step
captured again.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from semckd_ray.train_loop import train_step

__all__ = ["GraphedStep", "WARMUP_STEPS"]

log = logging.getLogger(__name__)

# PyTorch's recipe warms up for 3 iterations (11 under DDP, which this trainer never graphs).
WARMUP_STEPS = 3

# The text of the warning CUDA's sync debug mode gives (c10/cuda/CUDAFunctions.cpp).
_SYNC_WARNING = "synchronizing CUDA operation"

StepOutput = tuple[Tensor, dict[str, Tensor]]


def _signature(*tensors: Tensor | None) -> tuple:
    """What a replay bakes in about its inputs: each one's shape, strides (memory format), dtype and device."""
    return tuple(None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


def _root_cause(exc: BaseException) -> BaseException:
    """The first error of a chain: a failed capture reports the op that broke it, then capture_end's own error."""
    seen = {id(exc)}
    while exc.__context__ is not None and id(exc.__context__) not in seen:
        exc = exc.__context__
        seen.add(id(exc))
    return exc


class GraphedStep:
    """``train_step`` for a fixed batch shape, captured once in a CUDA graph and replayed (see the module doc).

    Called as ``step(x, y, index)`` in place of ``train_step(model, teacher, optimizer, x, y, index,
    device, amp)``, with the same result. ``batch_size``: the per-worker batch the graph is captured for
    (None: the first batch's). ``method``: the distillation method, for its name and its
    ``graph_unsafe_reason``. ``stats`` counts the steps by how they ran; ``fallback_reason`` is set once
    the run has gone eager for good.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module | None, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp: bool, *, method: nn.Module, batch_size: int | None = None):
        self.model = model
        self.teacher = teacher
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.amp = amp
        self.method_name = getattr(method, "name", type(method).__name__)
        self.batch_size = batch_size
        self.stats = {"warmup": 0, "captures": 0, "replays": 0, "eager": 0}
        self.fallback_reason: str | None = None
        self._capture_signature: tuple | None = None
        self._static_inputs: tuple[Tensor, Tensor, Tensor | None] | None = None
        self._graph: Any = None
        self._outputs: StepOutput | None = None
        self._captured_groups: tuple | None = None
        self._captured_buffer: Tensor | None = None
        self._side_stream: Any = None
        reason = self._unsupported_reason(method)
        if reason is not None:
            self._fall_back(reason)

    # ---- the step

    def __call__(self, x: Tensor, y: Tensor, index: Tensor | None = None) -> StepOutput:
        if self.fallback_reason is not None:
            return self._eager(x, y, index)
        signature = _signature(x, y, index)
        if self._capture_signature is None and (self.batch_size is None or x.shape[0] == self.batch_size):
            self._capture_signature = signature
        if signature != self._capture_signature:
            return self._eager(x, y, index)  # another shape (the last partial batch): same math, no replay
        if self.stats["warmup"] < WARMUP_STEPS:
            return self._warm_up(x, y, index)
        if self._graph is None or not self._graph_is_current():
            return self._capture_and_replay(x, y, index)
        self._copy_in(x, y, index)
        return self._replay()

    def reset(self) -> None:
        """Drop the graph: the next step at the captured shape captures again."""
        self._graph, self._outputs = None, None

    # ---- the three ways a step runs

    def _eager(self, x: Tensor, y: Tensor, index: Tensor | None) -> StepOutput:
        self.stats["eager"] += 1
        return train_step(self.model, self.teacher, self.optimizer, x, y, index, self.device, self.amp)

    def _warm_up(self, x: Tensor, y: Tensor, index: Tensor | None) -> StepOutput:
        self.stats["warmup"] += 1
        last = self.stats["warmup"] == WARMUP_STEPS
        with self._watch_syncs(enabled=last) as syncs:
            out = self._run_warmup(
                lambda: train_step(self.model, self.teacher, self.optimizer, x, y, index, self.device, self.amp))
        if syncs:
            self._fall_back(
                f"its step makes the CPU wait for the GPU ({len(syncs)} synchronizing CUDA operation(s), the "
                f"first at {syncs[0]}: .item(), bool(tensor) or control flow on a tensor's value), which a "
                "CUDA graph cannot replay")
        return out

    def _capture_and_replay(self, x: Tensor, y: Tensor, index: Tensor | None) -> StepOutput:
        if self._static_inputs is None:
            # Allocated outside the graph's pool and kept for the whole run; clone keeps the memory format.
            self._static_inputs = (x.clone(), y.clone(), None if index is None else index.clone())
        else:
            self._copy_in(x, y, index)
        self.reset()
        before = self._momentum_buffers()
        # The recipe's zero_grad before capture: backward then allocates the gradients inside the graph's
        # pool, and every replay writes them there (train_step's own zero_grad is then a no-op).
        self.optimizer.zero_grad(set_to_none=True)
        sx, sy, sindex = self._static_inputs
        try:
            graph, outputs = self._capture(
                lambda: train_step(self.model, self.teacher, self.optimizer, sx, sy, sindex, self.device, self.amp))
        except Exception as exc:  # the method does something a capture refuses: train this batch eagerly
            cause = _root_cause(exc)
            self.optimizer.zero_grad(set_to_none=True)  # no gradient of the failed capture's pool survives
            self._fall_back(f"capturing its step raised {type(cause).__name__}: {str(cause).strip().splitlines()[0]}")
            return self._eager(x, y, index)
        after = self._momentum_buffers()
        if any(a is not b for a, b in zip(before, after)):
            # A buffer made inside the capture would be made afresh by every replay: momentum lost.
            self.optimizer.zero_grad(set_to_none=True)
            self._fall_back("SGD created a momentum buffer inside the capture (a parameter without a "
                            "gradient during the warm-up steps got one there)")
            return self._eager(x, y, index)
        self._graph, self._outputs = graph, outputs
        self._captured_groups = self._group_settings()
        self._captured_buffer = next((b for b in after if b is not None), None)
        self.stats["captures"] += 1
        log.info("scaling.cuda_graphs: captured the training step of method %r at batch shape %s "
                 "(capture %d, after %d warm-up steps, lr %s)", self.method_name, tuple(x.shape),
                 self.stats["captures"], self.stats["warmup"], [g["lr"] for g in self.optimizer.param_groups])
        return self._replay()  # the static inputs hold this batch

    def _replay(self) -> StepOutput:
        self.stats["replays"] += 1
        self._graph.replay()
        logits, losses = self._outputs
        return logits, dict(losses)  # the static tensors; a fresh dict, so a caller cannot edit ours

    # ---- bookkeeping

    def _copy_in(self, x: Tensor, y: Tensor, index: Tensor | None) -> None:
        sx, sy, sindex = self._static_inputs
        sx.copy_(x)
        sy.copy_(y)
        if sindex is not None:
            sindex.copy_(index)

    def _group_settings(self) -> tuple:
        """Every parameter group's hyper-parameters (lr, momentum, weight decay, ...): the graph bakes them in."""
        return tuple(tuple((k, v) for k, v in g.items() if k != "params") + (len(g["params"]),)
                     for g in self.optimizer.param_groups)

    def _momentum_buffers(self) -> list[Tensor | None]:
        return [self.optimizer.state.get(p, {}).get("momentum_buffer")
                for g in self.optimizer.param_groups for p in g["params"]]

    def _graph_is_current(self) -> bool:
        """False once the lr (or another group setting) changed, or the optimizer's state was replaced."""
        if self._group_settings() != self._captured_groups:
            return False
        if self._captured_buffer is None:
            return True
        first = next((b for b in self._momentum_buffers() if b is not None), None)
        return first is self._captured_buffer

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        self.reset()
        log.warning("scaling.cuda_graphs: the training step of method %r is not captured in a CUDA graph: %s. "
                    "Every step of this run runs eagerly instead (the same math, without the graph's speed-up).",
                    self.method_name, reason)

    # ---- what needs CUDA (tests stand in for these on a CPU)

    def _unsupported_reason(self, method: nn.Module) -> str | None:
        if self.device.type != "cuda":
            return f"the model is on {self.device}, and CUDA graphs replay CUDA work only"
        if not torch.cuda.is_available():
            return "this process sees no CUDA device"
        return getattr(method, "graph_unsafe_reason", None)

    def _run_warmup(self, fn: Callable[[], StepOutput]) -> StepOutput:
        """``fn()`` on a side stream, as the recipe warms up; its outputs are then safe to use on the current one."""
        current = torch.cuda.current_stream(self.device)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        self._side_stream.wait_stream(current)  # the batch was made on the current stream
        with torch.cuda.stream(self._side_stream):
            logits, losses = fn()
        current.wait_stream(self._side_stream)
        for t in (logits, *losses.values()):
            t.record_stream(current)  # the caller reads them there: not to be reused before it has
        return logits, losses

    @contextlib.contextmanager
    def _watch_syncs(self, enabled: bool) -> Iterator[list[str]]:
        """Yields a list that, after the block, holds where the block made the CPU wait for the GPU."""
        found: list[str] = []
        if not enabled:
            yield found
            return
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield found
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        for w in caught:
            if _SYNC_WARNING in str(w.message):
                found.append(f"{w.filename}:{w.lineno}")
            else:  # not ours to swallow
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def _capture(self, fn: Callable[[], StepOutput]) -> tuple[Any, StepOutput]:
        """Record ``fn()`` into a new CUDA graph (nothing runs); returns the graph and ``fn``'s static outputs."""
        stream = torch.cuda.current_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            # Autocast (scaling.bf16) is entered and left inside the captured function, so its cast cache
            # lives and dies within the capture.
            with torch.cuda.graph(graph):
                outputs = fn()
        except Exception:
            # A failed capture_end can leave its capture stream current; later eager steps belong on ours.
            torch.cuda.set_stream(stream)
            torch.cuda.synchronize(self.device)
            raise
        return graph, outputs
