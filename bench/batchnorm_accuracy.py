"""Training-mode BatchNorm on the CPU in float32, contiguous against channels_last, both against float64.

    python bench/batchnorm_accuracy.py [--shape 64,128,32,32]

The shape is the largest BatchNorm of SemCKD's heads for resnet32x4 -> resnet8x4 (pair (0, 0): 128
channels of 64 x 32 x 32, so 65,536 values summed per channel). Prints the relative error (norm
of the difference over the norm of the float64 value) of the output, the input gradient and the
weight and bias gradients: the layout's own accuracy, with nothing else in the way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import save_result  # noqa: E402

NAMES = ("output", "grad_input", "grad_weight", "grad_bias")


def run(x64, g64, w64, b64, dtype, memory_format):
    x = x64.to(dtype).contiguous(memory_format=memory_format).detach().clone(memory_format=memory_format)
    x.requires_grad_(True)
    g = g64.to(dtype).contiguous(memory_format=memory_format)
    w = w64.to(dtype).clone().requires_grad_(True)
    b = b64.to(dtype).clone().requires_grad_(True)
    y = F.batch_norm(x, None, None, w, b, training=True)
    y.backward(g)
    return [t.detach().double() for t in (y, x.grad, w.grad, b.grad)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="64,128,32,32")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    gen = torch.Generator().manual_seed(0)
    # activations with a mean away from zero, small upstream gradients: as in a projection head
    x64 = torch.randn(shape, dtype=torch.float64, generator=gen) * 2 + 1.5
    g64 = torch.randn(shape, dtype=torch.float64, generator=gen) * 1e-3 + 1e-4
    w64 = torch.rand(shape[1], dtype=torch.float64, generator=gen) + 0.5
    b64 = torch.randn(shape[1], dtype=torch.float64, generator=gen)
    truth = run(x64, g64, w64, b64, torch.float64, torch.contiguous_format)
    result = {"config": vars(args), "relative_error": {}}
    for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        ours = run(x64, g64, w64, b64, torch.float32, fmt)
        errors = {n: float((a - t).norm() / t.norm()) for n, a, t in zip(NAMES, ours, truth)}
        result["relative_error"][layout] = errors
        print(f"{layout:14s} " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    print(f"  saved {save_result('batchnorm_accuracy', result)}")


if __name__ == "__main__":
    main()
