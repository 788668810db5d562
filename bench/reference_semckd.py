"""The official SemCKD code's algorithm, re-implemented as written: the "official code" baseline of every ratio.

Written from SEMCKD_SPEC sections 2-6 (github.com/DefangChen/SemCKD at ebe5db1): ``SelfA``,
``AAEmbed``, ``MLPEmbed``, ``Normalize`` (``models/util.py``), ``SemCKDLoss``
(``distiller_zoo/SemCKD.py``), ``DistillKL`` (``distiller_zoo/KD.py``) and one iteration of
``helper/loops.py::train_distill``. Its inefficiencies are kept on purpose -- queries and keys
concatenated one layer at a time, teacher maps re-pooled for every student layer, ``ind_loss``
allocated with ``torch.zeros(B, S, T)`` and filled pair by pair, float32, no autocast, no
channels_last -- because they are what the official code costs. The only departures are the CPU
ones of SPEC 11.4-11.6: ``ind_loss`` is allocated on the attention's device (and dtype, so that
float64 golden vectors keep float64), and ``accuracy`` uses ``reshape``.

Run it to check the re-implementation (it is only a valid baseline if it computes the same thing):
    python bench/reference_semckd.py
compares it with the golden vectors of the authors' code and with ``semckd_ray``'s module on the
same weights (loaded through ``semckd_ray.distill.official``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

__all__ = ["SelfA", "AAEmbed", "MLPEmbed", "Normalize", "SemCKDLoss", "DistillKL", "official_iteration"]


class Normalize(nn.Module):
    def __init__(self, power=2):
        super().__init__()
        self.power = power

    def forward(self, x):
        norm = x.pow(self.power).sum(1, keepdim=True).pow(1.0 / self.power)
        return x.div(norm)


class MLPEmbed(nn.Module):
    def __init__(self, dim_in=1024, dim_out=128):
        super().__init__()
        self.linear1 = nn.Linear(dim_in, 2 * dim_out)
        self.relu = nn.ReLU(inplace=True)
        self.linear2 = nn.Linear(2 * dim_out, dim_out)
        self.l2norm = Normalize(2)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        x = self.relu(self.linear1(x))
        return self.l2norm(self.linear2(x))


class AAEmbed(nn.Module):
    def __init__(self, num_input_channels=1024, num_target_channels=128):
        super().__init__()
        self.num_mid_channel = 2 * num_target_channels

        def conv1x1(in_channels, out_channels, stride=1):
            return nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, stride=stride, bias=False)

        def conv3x3(in_channels, out_channels, stride=1):
            return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, stride=stride, bias=False)

        self.regressor = nn.Sequential(
            conv1x1(num_input_channels, self.num_mid_channel),
            nn.BatchNorm2d(self.num_mid_channel),
            nn.ReLU(inplace=True),
            conv3x3(self.num_mid_channel, self.num_mid_channel),
            nn.BatchNorm2d(self.num_mid_channel),
            nn.ReLU(inplace=True),
            conv1x1(self.num_mid_channel, num_target_channels),
        )

    def forward(self, x):
        return self.regressor(x)


class SelfA(nn.Module):
    """Cross-layer self attention, as ``models/util.py:L55-119``."""

    def __init__(self, s_len, t_len, input_channel, s_n, s_t, factor=4):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        for i in range(t_len):
            setattr(self, "key_weight" + str(i), MLPEmbed(input_channel, input_channel // factor))
        for i in range(s_len):
            setattr(self, "query_weight" + str(i), MLPEmbed(input_channel, input_channel // factor))
        for i in range(s_len):
            for j in range(t_len):
                setattr(self, "regressor" + str(i) + str(j), AAEmbed(s_n[i], s_t[j]))

    def forward(self, feat_s, feat_t):
        sim_t = list(range(len(feat_t)))
        sim_s = list(range(len(feat_s)))
        bsz = feat_s[0].shape[0]
        for i in range(len(feat_t)):
            sim_temp = feat_t[i].reshape(bsz, -1)
            sim_t[i] = torch.matmul(sim_temp, sim_temp.t())
        for i in range(len(feat_s)):
            sim_temp = feat_s[i].reshape(bsz, -1)
            sim_s[i] = torch.matmul(sim_temp, sim_temp.t())

        proj_key = self.key_weight0(sim_t[0])
        proj_key = proj_key[:, :, None]
        for i in range(1, len(sim_t)):
            temp_proj_key = getattr(self, "key_weight" + str(i))(sim_t[i])
            proj_key = torch.cat([proj_key, temp_proj_key[:, :, None]], 2)

        proj_query = self.query_weight0(sim_s[0])
        proj_query = proj_query[:, None, :]
        for i in range(1, len(sim_s)):
            temp_proj_query = getattr(self, "query_weight" + str(i))(sim_s[i])
            proj_query = torch.cat([proj_query, temp_proj_query[:, None, :]], 1)

        energy = torch.bmm(proj_query, proj_key)
        attention = F.softmax(energy, dim=-1)

        proj_value_stu = []
        value_tea = []
        for i in range(len(sim_s)):
            proj_value_stu.append([])
            value_tea.append([])
            for j in range(len(sim_t)):
                s_H, t_H = feat_s[i].shape[2], feat_t[j].shape[2]
                if s_H > t_H:
                    source = F.adaptive_avg_pool2d(feat_s[i], (t_H, t_H))
                    proj_value_stu[i].append(getattr(self, "regressor" + str(i) + str(j))(source))
                    value_tea[i].append(feat_t[j])
                elif s_H < t_H or s_H == t_H:
                    target = F.adaptive_avg_pool2d(feat_t[j], (s_H, s_H))
                    proj_value_stu[i].append(getattr(self, "regressor" + str(i) + str(j))(feat_s[i]))
                    value_tea[i].append(target)
        return proj_value_stu, value_tea, attention


class SemCKDLoss(nn.Module):
    """``distiller_zoo/SemCKD.py:L8-23``; ``ind_loss`` on the attention's device (the original: ``.cuda()``)."""

    def __init__(self):
        super().__init__()
        self.crit = nn.MSELoss(reduction="none")

    def forward(self, s_value, f_target, weight):
        bsz, num_stu, num_tea = weight.shape
        ind_loss = torch.zeros(bsz, num_stu, num_tea, dtype=weight.dtype, device=weight.device)
        for i in range(num_stu):
            for j in range(num_tea):
                ind_loss[:, i, j] = self.crit(s_value[i][j], f_target[i][j]).reshape(bsz, -1).mean(-1)
        return (weight * ind_loss).sum() / (1.0 * bsz * num_stu)


class DistillKL(nn.Module):
    """``distiller_zoo/KD.py``: KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean."""

    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, y_s, y_t):
        p_s = F.log_softmax(y_s / self.T, dim=1)
        p_t = F.softmax(y_t / self.T, dim=1)
        return F.kl_div(p_s, p_t, reduction="batchmean") * (self.T**2)


def accuracy(output, target, topk=(1,)):
    """``helper/util.py`` accuracy, with ``reshape`` for ``view`` (SPEC 11.5)."""
    with torch.no_grad():
        maxk = max(topk)
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        res = []
        for k in topk:
            correct_k = correct[:k].reshape(-1).float().sum(0, keepdim=True)
            res.append(correct_k.mul_(100.0 / batch_size))
        return res


def official_iteration(model_s, model_t, self_attention, optimizer, x, target, *,
                       gamma=1.0, alpha=1.0, beta=400.0, kd_T=4.0):
    """The body of ``train_distill``'s batch loop (``helper/loops.py:L119-194``) for ``semckd`` (or KD
    when ``self_attention`` is None); models return ``(logits, feats)`` as ours do. Returns the loss value."""
    criterion_cls = nn.CrossEntropyLoss()
    criterion_div = DistillKL(kd_T)
    criterion_kd = SemCKDLoss()

    logit_s, feat_s = model_s(x)
    with torch.no_grad():
        logit_t, feat_t = model_t(x)
        feat_t = [f.detach() for f in feat_t]

    loss_cls = criterion_cls(logit_s, target)
    loss_div = criterion_div(logit_s, logit_t)
    if self_attention is not None:
        s_value, f_target, weight = self_attention(feat_s[1:-1], feat_t[1:-1])
        loss_kd = criterion_kd(s_value, f_target, weight)
    else:
        loss_kd = 0
    loss = gamma * loss_cls + alpha * loss_div + beta * loss_kd

    acc1, acc5 = accuracy(logit_s, target, topk=(1, 5))
    loss_value = loss.item()

    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss_value


def self_attention_like(module) -> SelfA:
    """A ``SelfA`` holding exactly the weights of ``semckd_ray``'s SemCKD ``module`` (via the official names)."""
    from semckd_ray.distill.official import to_official_state

    s_n = [emb[0].in_channels for emb in (row[0] for row in module.proj)]
    t_n = [p[6].out_channels for p in module.proj[0]]
    batch = module.batch_size
    factor = batch // module.query_embed[0].linear2.out_features
    ref = SelfA(len(s_n), len(t_n), batch, s_n, t_n, factor=factor)
    ref.load_state_dict(to_official_state(module), strict=True)
    return ref.to(next(module.parameters()).device)


# ------------------------------------------------------------------------------------------------
# Verification


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def verify_golden(golden_dir: Path) -> list[tuple[str, float]]:
    """Loss and student-feature gradients of the reference on every SemCKD-repo golden vector."""
    out = []
    for path in sorted(golden_dir.glob("*.pt")):
        gold = torch.load(path, map_location="cpu", weights_only=True)
        if "state_dict" not in gold or gold["config"]["impl"] != "semckd_repo":
            continue
        cfg = gold["config"]
        dtype = getattr(torch, cfg["dtype"])
        ref = SelfA(len(cfg["s_n"]), len(cfg["t_n"]), cfg["bsz"], cfg["s_n"], cfg["t_n"], cfg["factor"]).to(dtype)
        ref.load_state_dict(gold["state_dict"], strict=True)
        feat_s = [f.clone().requires_grad_(True) for f in gold["feat_s"]]
        loss = SemCKDLoss()(*ref(feat_s, [f.clone() for f in gold["feat_t"]]))
        loss.backward()
        err = max([_rel(loss, gold["loss"])] + [_rel(f.grad, g) for f, g in zip(feat_s, gold["grad_feat_s"])])
        out.append((path.stem, err))
    return out


def verify_against_ours(teacher: str, student: str, batch: int, seed: int = 0) -> dict[str, float]:
    """Our SemCKD and the reference on the same weights and features: relative differences."""
    from semckd_ray.distill import DistillContext, create_method
    from semckd_ray.models import create_model
    from semckd_ray.train_loop import feature_shapes

    torch.manual_seed(seed)
    t_model, s_model = create_model(teacher, num_classes=100), create_model(student, num_classes=100)
    ctx = DistillContext(feature_shapes(s_model, torch.device("cpu")), feature_shapes(t_model, torch.device("cpu")), batch)
    ours = create_method("semckd", ctx).train()
    ref = self_attention_like(ours).train()
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        feat_t = t_model.eval()(x)[1][1:-1]
    feat_s = s_model.train()(x)[1][1:-1]
    leaves_ours = [f.detach().clone().requires_grad_(True) for f in feat_s]
    leaves_ref = [f.detach().clone().requires_grad_(True) for f in feat_s]
    loss_ours = ours.forward_features(leaves_ours, feat_t).loss
    loss_ref = SemCKDLoss()(*ref(leaves_ref, feat_t))
    loss_ours.backward()
    loss_ref.backward()
    grads = [_rel(a.grad, b.grad) for a, b in zip(leaves_ours, leaves_ref)]
    return {"loss_ours": loss_ours.item(), "loss_reference": loss_ref.item(),
            "loss_rel_diff": _rel(loss_ours, loss_ref), "grad_feat_s_max_rel_diff": max(grads)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "golden")
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ok = True
    golden = verify_golden(args.golden_dir)
    for name, err in golden:
        tol = 1e-9 if name.endswith("fp64") else 1e-5
        ok &= err <= tol
        print(f"golden {name}: reference vs authors' code, max relative error {err:.2e} (tolerance {tol:g})")
    if not golden:
        print(f"no SemCKD-repo golden vectors in {args.golden_dir}")
    diff = verify_against_ours(args.teacher, args.student, args.batch)
    ok &= diff["loss_rel_diff"] <= 1e-5 and diff["grad_feat_s_max_rel_diff"] <= 1e-4
    print(f"{args.teacher}->{args.student} B={args.batch} fp32, same weights: ours {diff['loss_ours']:.7g}, "
          f"reference {diff['loss_reference']:.7g}, loss rel diff {diff['loss_rel_diff']:.2e}, "
          f"student-feature grad max rel diff {diff['grad_feat_s_max_rel_diff']:.2e}")
    print("OK" if ok else "MISMATCH")
    from bench.common import save_result

    path = save_result("reference_check", {"golden_max_rel_error": dict(golden), "same_weights_vs_ours": diff, "ok": ok})
    print(f"saved {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
