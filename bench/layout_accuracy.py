"""How far float32 SemCKD is from float64, with NCHW and with channels_last maps (CPU).

    python bench/layout_accuracy.py [--vector /work/shared/golden/r32x4_r8x4_div8_b64_f4_fp32.pt]

Runs our module on a golden vector's weights and features in float64 (the yardstick), then in
float32 with the maps as given (NCHW) and in channels_last, and prints each one's worst relative
errors against float64 (loss, student-feature and parameter gradients), next to the golden file's
own (the official code's float32 result). For our two runs it also counts the ReLU elements that
float32 rounding put on the other side of zero than float64 did, and gives the worst error against
float64 taken on the float32 run's branches (``tests/golden.py``, the parity test's yardstick):
the first column is mostly those flips, the second the smooth rounding error of the layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import contextlib  # noqa: E402

import torch  # noqa: E402
from golden import ReluBranches, SameBranches, relative_error  # noqa: E402

from bench.common import save_result  # noqa: E402

DEFAULT_VECTOR = Path(__file__).resolve().parents[2] / "shared" / "golden" / "r32x4_r8x4_div8_b64_f4_fp32.pt"


def worst(values: dict, reference: dict, top: int) -> dict[str, float]:
    """The ``top`` largest relative errors of ``values`` against ``reference``, largest first."""
    errors = sorted(((k, relative_error(v, reference[k])) for k, v in values.items() if v is not None),
                    key=lambda kv: -kv[1])
    return dict(errors[:top])


def listed(errors: dict[str, float]) -> str:
    return ", ".join(f"{k} {e:.1e}" for k, e in errors.items())


def run(gold: dict, dtype: torch.dtype, channels_last: bool, mode=None) -> dict[str, torch.Tensor]:
    from semckd_ray.distill import DistillContext, create_method
    from semckd_ray.distill.official import load_official_semckd_state, official_grad_state

    cfg = gold["config"]
    ctx = DistillContext(
        student_shapes=((3, 32, 32), *[tuple(s[1:]) for s in cfg["s_shapes"]], (1,)),
        teacher_shapes=((3, 32, 32), *[tuple(s[1:]) for s in cfg["t_shapes"]], (1,)),
        batch_size=cfg["bsz"],
    )
    module = create_method("semckd", ctx, {"factor": cfg["factor"], "soft": cfg["soft"]}).to(dtype)
    load_official_semckd_state(module, gold["state_dict"])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    module = module.to(memory_format=memory_format).train()
    feat_s = [f.to(dtype).contiguous(memory_format=memory_format).clone().requires_grad_(True) for f in gold["feat_s"]]
    feat_t = [f.to(dtype).contiguous(memory_format=memory_format) for f in gold["feat_t"]]
    with mode or contextlib.nullcontext():
        out = module.forward_features(feat_s, feat_t)
    out.loss.backward()
    return {"loss": out.loss, **{f"grad_feat_s[{i}]": f.grad for i, f in enumerate(feat_s)},
            **{f"grad:{k}": v for k, v in official_grad_state(module).items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vector", type=Path, default=DEFAULT_VECTOR)
    p.add_argument("--top", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    gold = torch.load(args.vector, map_location="cpu", weights_only=True)
    exact = run(gold, torch.float64, channels_last=False)
    golden = {"loss": gold["loss"], **{f"grad_feat_s[{i}]": g for i, g in enumerate(gold["grad_feat_s"])},
              **{f"grad:{k}": v for k, v in gold["grad_state_dict"].items() if f"grad:{k}" in exact}}
    result = {"vector": str(args.vector), "worst_rel_error_vs_float64": {}, "same_branches": {}}
    print(f"{args.vector.name}: worst relative errors against float64")

    def report(name: str, values: dict) -> None:
        result["worst_rel_error_vs_float64"][name] = errors = worst(values, exact, args.top)
        print(f"  {name:24s} {listed(errors)}")

    report("golden_file_fp32", golden)
    for channels_last in (False, True):
        name = "ours_fp32_channels_last" if channels_last else "ours_fp32_nchw"
        branches = ReluBranches()
        ours = run(gold, torch.float32, channels_last, branches)
        report(name, ours)
        same = SameBranches(branches.masks)
        errors = worst(ours, run(gold, torch.float64, channels_last, same), args.top)
        result["same_branches"][name] = {"relu_flips": same.flips, "worst": errors}
        print(f"    {same.flips} ReLU elements flipped; on float32's branches: {listed(errors)}")
    print(f"  saved {save_result('layout_accuracy', result)}")


if __name__ == "__main__":
    main()
