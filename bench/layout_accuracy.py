"""How far float32 SemCKD is from float64, with NCHW and with channels_last maps (CPU).

    python bench/layout_accuracy.py [--vector /work/shared/golden/r32x4_r8x4_div8_b64_f4_fp32.pt]

Runs our module on a golden vector's weights and features in float64 (the yardstick), then in
float32 with the maps as given (NCHW, what the parity test pins) and in channels_last, and prints
each one's worst relative errors against float64 (loss, student-feature and parameter gradients),
next to the golden file's own (the official code's float32 result). Why it matters: the module
keeps the maps' layout rather than switching to the faster channels_last itself, because the
float32 golden vector pins NCHW's rounding; this shows which of the two is the more accurate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import save_result  # noqa: E402

DEFAULT_VECTOR = Path(__file__).resolve().parents[2] / "shared" / "golden" / "r32x4_r8x4_div8_b64_f4_fp32.pt"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def run(gold: dict, dtype: torch.dtype, channels_last: bool) -> dict[str, torch.Tensor]:
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
    rows = {"golden_file_fp32": golden, "ours_fp32_nchw": run(gold, torch.float32, False),
            "ours_fp32_channels_last": run(gold, torch.float32, True)}
    result = {"vector": str(args.vector), "worst_rel_error_vs_float64": {}}
    print(f"{args.vector.name}: worst relative errors against float64")
    for name, values in rows.items():
        errors = sorted(((k, rel(v, exact[k])) for k, v in values.items() if v is not None), key=lambda kv: -kv[1])
        result["worst_rel_error_vs_float64"][name] = dict(errors[: args.top])
        print(f"  {name:24s} " + ", ".join(f"{k} {e:.1e}" for k, e in errors[: args.top]))
    print(f"  saved {save_result('layout_accuracy', result)}")


if __name__ == "__main__":
    main()
