"""What each distillation method is configured with, without torch: the one table of methods.

A method's ``MethodSpec`` subclass here holds everything the config knows about it: its name,
whether it distils from a teacher, its official loss weight ``default_beta``, its ``Options``
dataclass (the ``method.options`` it takes, each checked in ``__post_init__``) and which
per-worker batch sizes its options work with (``check_batch_size``). Its ``nn.Module`` in this
package derives from that spec (``class SemCKD(SemCKDSpec, DistillMethod)``), so both read the same
values, and ``@register_method`` refuses a class whose name has no spec here. The config is
validated against this module alone, which imports no torch.

A new method: its spec here (added to ``METHODS``), its module in this package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from semckd_ray.errors import UserError

__all__ = ["MethodSpec", "METHODS", "method_spec", "list_methods", "make_options"]


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _is_integer(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


class MethodSpec:
    """A method's configuration: subclassed once per method, and by the method's ``nn.Module``."""

    name: ClassVar[str]
    default_beta: ClassVar[float] = 0.0
    uses_teacher: ClassVar[bool] = True

    @dataclass(frozen=True)
    class Options:
        pass

    @classmethod
    def check_batch_size(cls, options: Any, batch_size: int) -> None:
        """Raise a ``UserError`` if the options cannot work at this per-worker batch size."""


class VanillaSpec(MethodSpec):
    """Cross-entropy only, no teacher (also how teachers are trained)."""

    name = "vanilla"
    uses_teacher = False


class KDSpec(MethodSpec):
    """Hinton et al. knowledge distillation: CE + KD with no further term."""

    name = "kd"


class ATSpec(MethodSpec):
    name = "at"
    default_beta = 1000.0  # scripts/run_cifar_distill.sh: --distill attention -b 1000

    @dataclass(frozen=True)
    class Options:
        p: float = 2.0  # exponent of the attention map; the official code fixes p = 2

        def __post_init__(self):
            if not _is_number(self.p) or not self.p > 0:
                raise UserError(f"at option p must be a number > 0, got {self.p!r}")


class FitNetSpec(MethodSpec):
    name = "fitnet"
    default_beta = 100.0  # scripts/run_cifar_distill.sh: --distill hint -b 100

    @dataclass(frozen=True)
    class Options:
        # Index into the full feature list (0 = stem output). RepDistiller's default is 2; note
        # that the SemCKD repo's train_student.py (at 68e4a99) defaults to 1.
        hint_layer: int = 2

        def __post_init__(self):
            layer = self.hint_layer
            if not _is_integer(layer) or layer < 0:
                raise UserError(f"fitnet option hint_layer must be an integer >= 0, got {layer!r}")


class SPSpec(MethodSpec):
    name = "sp"
    default_beta = 3000.0  # scripts/run_cifar_distill.sh: --distill similarity -b 3000


class VIDSpec(MethodSpec):
    name = "vid"
    default_beta = 1.0  # scripts/run_cifar_distill.sh: --distill vid -b 1

    @dataclass(frozen=True)
    class Options:
        init_pred_var: float = 5.0  # initial variance of every teacher channel
        eps: float = 1e-5  # variance floor

        def __post_init__(self):
            if not _is_number(self.eps) or not self.eps > 0:
                raise UserError(f"vid option eps must be a number > 0, got {self.eps!r}")
            if not _is_number(self.init_pred_var) or not self.init_pred_var > self.eps:
                raise UserError(
                    f"vid option init_pred_var must be a number > eps ({self.eps}), "
                    f"got {self.init_pred_var!r}"
                )


class CRDSpec(MethodSpec):
    name = "crd"
    default_beta = 0.8  # scripts/run_cifar_distill.sh: --distill crd -b 0.8

    @dataclass(frozen=True)
    class Options:
        feat_dim: int = 128  # embedding size
        nce_k: int = 16384  # negatives per sample (at most num_train - 1 are used)
        nce_t: float = 0.07  # temperature of the scores
        nce_m: float = 0.5  # momentum of the memory update

        def __post_init__(self):
            for key in ("feat_dim", "nce_k"):
                value = getattr(self, key)
                if not _is_integer(value) or value < 1:
                    raise UserError(f"crd option {key} must be an integer >= 1, got {value!r}")
            if not _is_number(self.nce_t) or not self.nce_t > 0:
                raise UserError(f"crd option nce_t must be a number > 0, got {self.nce_t!r}")
            m = self.nce_m
            if not _is_number(m) or not 0 <= m < 1:
                raise UserError(f"crd option nce_m must be a number in [0, 1), got {m!r}")


class SemCKDSpec(MethodSpec):
    name = "semckd"
    default_beta = 400.0

    @dataclass(frozen=True)
    class Options:
        factor: int = 4  # embedding size d = batch_size // factor (hidden width 2 * d)
        soft: float = 1.0  # attention temperature: softmax(query . key / soft); 1 = SemCKD repo
        proj_width: int = 2  # projection hidden width = proj_width * teacher channels; 2 = official

        def __post_init__(self):
            if not _is_integer(self.factor) or self.factor < 1:
                raise UserError(f"semckd option factor must be an integer >= 1, got {self.factor!r}")
            if not _is_number(self.soft) or not self.soft > 0:
                raise UserError(f"semckd option soft must be a number > 0, got {self.soft!r}")
            if not _is_integer(self.proj_width) or self.proj_width < 1:
                raise UserError(f"semckd option proj_width must be an integer >= 1, got {self.proj_width!r}")

    @classmethod
    def check_batch_size(cls, options: Options, batch_size: int) -> None:
        if batch_size // options.factor < 1:
            raise UserError(
                f"semckd: batch size {batch_size} // factor {options.factor} = 0, so the query/key "
                f"embedding would be empty; use a factor <= {batch_size}"
            )


METHODS: dict[str, type[MethodSpec]] = {
    spec.name: spec for spec in (VanillaSpec, KDSpec, ATSpec, FitNetSpec, SPSpec, VIDSpec, CRDSpec, SemCKDSpec)
}


def list_methods() -> list[str]:
    return sorted(METHODS)


def method_spec(name: str) -> type[MethodSpec]:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(
            f"unknown distillation method {name!r}; valid methods: {', '.join(list_methods())}"
        ) from None


def make_options(name: str, options: dict[str, Any] | None) -> Any:
    """Validate a method's options dict against its ``Options`` dataclass."""
    spec = method_spec(name)
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(spec.Options)}
    unknown = sorted(set(options) - fields)
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise UserError(
            f"unknown option(s) {', '.join(unknown)} for method {name!r}; allowed options: {allowed}"
        )
    return spec.Options(**options)
