"""Every registered method trains a real student: finite losses that fall on one fixed batch.

The pair is small (resnet20 teacher, resnet8 student, 10 classes, batch 8) so that all methods,
including any added later, run in seconds. The teacher's output is computed once, without
gradients, as the trainer does.

The batch's samples all share one class. For CRD this keeps them out of each other's negatives:
randomly initialised networks embed all these images almost alike (cosine ~0.99), so once the
first momentum update has written the batch into the memory bank, another class's sample of the
same batch is a negative as close as the positive, and whether the sampler happens to draw it
swamps any ten-step trend. In real training such a sample is one of 50000.
"""

from __future__ import annotations

import math

import pytest
import torch

from semckd_ray.distill import DistillContext, Distiller, create_method, get_method_class, list_methods
from semckd_ray.models import create_model

BATCH, CLASSES, NUM_TRAIN, STEPS = 8, 10, 64, 10


def _shapes(model) -> tuple[tuple[int, ...], ...]:
    return tuple(info.shape for info in model.feature_info)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    train_labels = torch.randint(0, CLASSES, (NUM_TRAIN,), generator=gen)
    index = torch.arange(BATCH)
    train_labels[index] = 3
    torch.manual_seed(0)
    teacher = create_model("resnet20", num_classes=CLASSES).eval()
    with torch.no_grad():
        teacher_out = teacher(x)
    return x, train_labels[index], index, train_labels, teacher, teacher_out


@pytest.mark.parametrize("name", list_methods())
def test_method_loss_is_finite_and_falls_on_a_fixed_batch(name, batch):
    x, y, index, train_labels, teacher, teacher_out = batch
    torch.manual_seed(1)
    student = create_model("resnet8", num_classes=CLASSES)
    ctx = DistillContext(
        student_shapes=_shapes(student),
        teacher_shapes=_shapes(teacher),
        batch_size=BATCH,
        num_classes=CLASSES,
        num_train=NUM_TRAIN,
        train_labels=train_labels,
    )
    method = create_method(name, ctx)
    distiller = Distiller(student, method).train()
    uses_teacher = get_method_class(name).uses_teacher
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.01, momentum=0.9)

    history = []
    for step in range(STEPS + 1):
        _, losses = distiller(x, y, teacher_out if uses_teacher else None, index)
        assert all(math.isfinite(v.item()) for v in losses.values()), losses
        history.append({k: v.item() for k, v in losses.items()})
        if step < STEPS:
            optimizer.zero_grad()
            losses["total"].backward()
            optimizer.step()

    first, last = history[0], history[-1]
    own_terms = sorted(set(first) - {"ce", "kd", "total"})
    for term in ("total", *own_terms):
        assert last[term] < first[term], f"{name}: {term} went from {first[term]:.4g} to {last[term]:.4g}"
