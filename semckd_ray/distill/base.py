"""The contract every distillation method follows, its registry, and the module that trains with it.

A method is an ``nn.Module`` that owns its trainable parts (projections, embeddings, memories) and
turns the student's and teacher's outputs into named, unweighted loss terms. The training loop never
looks inside a method: it builds it from the registry, hands the optimizer ``Distiller.parameters()``
and logs every term by name. What the config knows of a method (name, teacher, ``default_beta``,
``Options``, ``check_batch_size``) is its spec in the torch-free ``semckd_ray.distill.catalog``,
which the method's class derives from.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semckd_ray.distill.catalog import METHODS, MethodSpec, list_methods, make_options, method_spec

__all__ = [
    "DistillContext",
    "DistillMethod",
    "Distiller",
    "ModelOutput",
    "register_method",
    "create_method",
    "list_methods",
    "get_method_class",
    "make_options",
    "kd_loss",
]

# (logits [B, classes], features as the model returns them: f0, ..., pooled vector)
ModelOutput = tuple[Tensor, list[Tensor]]


@dataclass(frozen=True)
class DistillContext:
    """What a method may need to know to build its modules.

    Feature shapes are per sample (no batch dimension) and cover the model's whole feature list,
    stem output and pooled vector included; each method picks the entries it distils.
    """

    student_shapes: tuple[tuple[int, ...], ...]
    teacher_shapes: tuple[tuple[int, ...], ...]
    batch_size: int  # per-worker batch size the method is built for
    num_classes: int = 100
    num_train: int = 0  # size of the training set (CRD's memory bank)
    train_labels: Tensor | None = None  # labels of the training set by index (CRD's negative sampling)
    device: torch.device | None = None  # where the method runs: CRD allocates its memory bank there (None: CPU)


class DistillMethod(MethodSpec, nn.Module):
    """Base class of a distillation method.

    A registered method derives from its spec in ``semckd_ray.distill.catalog`` first, which sets
    ``name``, ``default_beta``, ``uses_teacher``, the ``Options`` dataclass whose fields are the
    method's configuration and ``check_batch_size``: ``class SemCKD(SemCKDSpec, DistillMethod)``.
    It implements ``forward``, which returns the method's loss terms (unweighted, by name; ``beta``
    multiplies their sum).
    """

    # True when a batch of another size than ``ctx.batch_size`` cannot be processed (SemCKD).
    requires_fixed_batch: ClassVar[bool] = False
    # True when forward needs the dataset indices of the batch (CRD).
    needs_index: ClassVar[bool] = False
    # True when the method keeps its buffers consistent across DDP ranks itself (CRD's memory bank
    # gathers from every rank); the trainer then turns off DDP's broadcast of rank 0's buffers.
    syncs_own_buffers: ClassVar[bool] = False
    # Why this method's training step cannot be captured in a CUDA graph (``scaling.cuda_graphs``), or
    # None when it can; the trainer then runs its steps eagerly and logs this reason once.
    graph_unsafe_reason: ClassVar[str | None] = None

    def __init__(self, ctx: DistillContext, options: Any = None):
        super().__init__()
        self.ctx = ctx
        self.options = options if options is not None else self.Options()

    def forward(
        self,
        out_s: ModelOutput,
        out_t: ModelOutput | None,
        target: Tensor,
        index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, float]:
        """Scalars the method wants logged after a step (e.g. SemCKD's attention); empty by default."""
        return {}


_METHODS: dict[str, type[DistillMethod]] = {}
# Modules of this package that define no method; every other one (but ``_*``) is imported on the
# first ``get_method_class``, which registers its methods.
NOT_METHOD_MODULES = frozenset({"base", "catalog", "official"})


def register_method(cls: type[DistillMethod]) -> type[DistillMethod]:
    """Class decorator: adds a method to the registry under ``cls.name``, its spec's name in the catalog."""
    spec = METHODS.get(cls.name)
    if spec is None or not issubclass(cls, spec):
        where = f"{cls.__module__}.{cls.__qualname__}"
        if spec is not None:
            raise RuntimeError(f"distillation method {cls.name!r} ({where}) does not derive from its spec: "
                               f"class {cls.__name__}({spec.__name__}, DistillMethod)")
        raise RuntimeError(
            f"distillation method {cls.name!r} ({where}) has no spec in semckd_ray.distill.catalog: declare its "
            "name, default_beta, uses_teacher and Options there in a MethodSpec subclass, list it in METHODS, "
            "and derive the method from it, as class SemCKD(SemCKDSpec, DistillMethod)"
        )
    if cls.name in _METHODS:
        raise RuntimeError(f"distillation method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def import_method_modules() -> None:
    """Import every method module of this package, which registers its methods (once; cheap after)."""
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if info.name not in NOT_METHOD_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def get_method_class(name: str) -> type[DistillMethod]:
    """The ``nn.Module`` class of method ``name`` (a ``UserError`` naming the methods if there is none)."""
    method_spec(name)  # an unknown name: the UserError that lists the methods
    if name not in _METHODS:
        import_method_modules()
    try:
        return _METHODS[name]
    except KeyError:
        raise RuntimeError(f"distillation method {name!r} has a spec in semckd_ray.distill.catalog but no "
                           "module of semckd_ray.distill registers a class for it (@register_method)") from None


def create_method(name: str, ctx: DistillContext, options: dict[str, Any] | None = None) -> DistillMethod:
    """Build the method ``name`` for the feature shapes and batch size in ``ctx``."""
    cls = get_method_class(name)
    return cls(ctx, make_options(name, options))


def kd_loss(logits_s: Tensor, logits_t: Tensor, temperature: float) -> Tensor:
    """Hinton KD as the official ``DistillKL``: batch-mean KL(softmax(t/T) || softmax(s/T)) * T^2."""
    log_p_s = F.log_softmax(logits_s / temperature, dim=1)
    p_t = F.softmax(logits_t / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature**2


class Distiller(nn.Module):
    """The student and the method's modules: what the optimizer trains and DDP wraps.

    ``forward`` returns the student's logits and every loss term by name, ``total`` included:
    ``total = gamma * ce + alpha * kd + beta * sum(method terms)``. The teacher's output comes in
    from outside, computed without gradients.
    """

    def __init__(
        self,
        student: nn.Module,
        method: DistillMethod,
        *,
        gamma: float = 1.0,
        alpha: float = 1.0,
        beta: float | None = None,
        kd_temperature: float = 4.0,
    ):
        super().__init__()
        self.student = student
        self.method = method
        self.gamma = gamma
        self.alpha = alpha if method.uses_teacher else 0.0
        self.beta = method.default_beta if beta is None else beta
        self.kd_temperature = kd_temperature

    def forward(
        self,
        x: Tensor,
        target: Tensor,
        teacher_out: ModelOutput | None = None,
        index: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logits_s, feats_s = self.student(x)
        losses: dict[str, Tensor] = {"ce": F.cross_entropy(logits_s, target)}
        total = self.gamma * losses["ce"]
        if self.method.uses_teacher:
            if teacher_out is None:
                raise ValueError(f"method {self.method.name!r} needs the teacher's output")
            if self.alpha:
                losses["kd"] = kd_loss(logits_s, teacher_out[0], self.kd_temperature)
                total = total + self.alpha * losses["kd"]
        terms = self.method((logits_s, feats_s), teacher_out, target, index)
        for term_name, value in terms.items():
            losses[term_name] = value
            total = total + self.beta * value
        losses["total"] = total
        return logits_s, losses
