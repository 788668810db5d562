"""SemCKD: cross-layer distillation with semantic calibration (Chen et al., AAAI 2021).

Every student map ``i`` is matched against every teacher map ``j`` through its own projection, and
a per-sample attention over teacher layers decides how much each pair counts. The attention comes
from the batch's Gram matrices: student layer ``i`` of sample ``b`` asks with a query built from
row ``b`` of ``G_s^i = X_s^i X_s^i^T``, teacher layer ``j`` answers with a key built from row ``b``
of ``G_t^j``. Everything here follows the authors' code (``models/util.py`` SelfA, AAEmbed,
MLPEmbed and ``distiller_zoo/SemCKD.py``; see SEMCKD_SPEC sections 2-5), plus the attention
temperature ``soft`` of the authors' later SimKD code base (section 9).

Parameter names are our own: ``key_embed.{j}``, ``query_embed.{i}`` and ``proj.{i}.{j}``.
``semckd_ray.distill.official`` maps them to and from the official checkpoints' names.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semckd_ray.distill.base import DistillContext, DistillMethod, register_method
from semckd_ray.distill.catalog import SemCKDSpec
from semckd_ray.errors import UserError

__all__ = ["SemCKD", "SemCKDOutput", "MLPEmbed", "projection"]


class MLPEmbed(nn.Module):
    """Query/key embedding: Linear -> ReLU -> Linear -> L2 normalisation of each row.

    The input is one row of a batch Gram matrix, so ``in_dim`` is the batch size. The
    normalisation has no epsilon, as in the official ``Normalize``: an all-zero embedding gives NaN.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, 2 * out_dim)
        self.linear2 = nn.Linear(2 * out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear2(F.relu(self.linear1(x)))
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


def projection(in_channels: int, out_channels: int, width: int = 2) -> nn.Sequential:
    """The student-to-teacher projection (official AAEmbed / Proj): 1x1 -> BN-ReLU -> 3x3 -> BN-ReLU -> 1x1.

    The layer indices (0, 1, 3, 4, 6) are those of the official checkpoints. The output has no
    BN or ReLU because it is compared with raw teacher features.
    """
    mid = width * out_channels
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, kernel_size=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_channels, kernel_size=1, bias=False),
    )


class SemCKDOutput(NamedTuple):
    """The loss and the intermediates of one forward (the intermediates serve tests and debugging)."""

    loss: Tensor  # 0-d
    attention: Tensor  # [B, S, T], softmax over teacher layers
    energy: Tensor  # [B, S, T], query . key / soft
    ind_loss: Tensor  # [B, S, T], per-sample MSE of every (student, teacher) pair
    query: Tensor  # [B, S, d]
    key: Tensor  # [B, d, T]
    proj_value_stu: list[list[Tensor]]  # S x T projected student maps
    value_tea: list[list[Tensor]]  # S x T teacher maps at the pair's resolution


def _rows(feat: Tensor) -> Tensor:
    """Each sample's values as one row [B, C*H*W], in memory order: a view for NCHW and for channels_last.

    Only for sums over a whole sample (inner products, squared errors), which the order does not change.
    """
    if not feat.is_contiguous() and feat.is_contiguous(memory_format=torch.channels_last):
        feat = feat.permute(0, 2, 3, 1)
    return feat.reshape(feat.shape[0], -1)


def _gram(feat: Tensor) -> Tensor:
    """Batch Gram matrix of the flattened maps: no centring, no normalisation (official SelfA)."""
    x = _rows(feat)
    return x @ x.t()


def _pair_mse(proj: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean of ``(proj - target)^2`` over C, H, W (official ``MSELoss(reduction='none')``).

    On contiguous maps it is the official expression, which is also the faster one there for the
    large pairs (forward + backward of a 64 x 64 x 32 x 32 pair: 5.8 against 11.2 ms written out, on
    a Zen 3; ``bench/pair_mse.py``). On channels_last maps it is written out, because ``mse_loss``
    followed by a mean is 2-4x slower there (strided reduction and backward). Under autocast in
    float32, as autocast runs ``mse_loss``.
    """
    if proj.is_contiguous() and target.is_contiguous():
        return F.mse_loss(proj, target, reduction="none").reshape(proj.shape[0], -1).mean(1)
    dtype = torch.promote_types(proj.dtype, target.dtype)
    if torch.is_autocast_enabled(proj.device.type):
        dtype = torch.promote_types(dtype, torch.float32)
    diff = _rows(proj.to(dtype) - target.to(dtype))
    return (diff * diff).sum(1) / diff.shape[1]


def _pool_to(feat: Tensor, size: int) -> Tensor:
    if feat.shape[2] == size:
        return feat
    return F.adaptive_avg_pool2d(feat, (size, size))


@register_method
class SemCKD(SemCKDSpec, DistillMethod):
    """SemCKD on the student's and teacher's intermediate maps ``feats[1:-1]`` (SPEC section 1).

    The query/key MLPs take a whole row of the batch Gram matrix, so the module is built for
    ``ctx.batch_size`` and cannot see a batch of any other size (the trainer skips partial batches).
    """

    # name, default_beta, Options, check_batch_size: SemCKDSpec (semckd_ray.distill.catalog)
    requires_fixed_batch = True

    def __init__(self, ctx: DistillContext, options: SemCKDSpec.Options | None = None):
        super().__init__(ctx, options)
        opts = self.options
        batch_size = ctx.batch_size
        self.check_batch_size(opts, batch_size)
        embed_dim = batch_size // opts.factor
        s_channels = self._map_channels(ctx.student_shapes, "student")
        t_channels = self._map_channels(ctx.teacher_shapes, "teacher")
        self.batch_size = batch_size
        self.soft = float(opts.soft)
        # Registration order (keys, queries, projections i-major) is the official one, so that the
        # same seed draws the same default initialisation as the authors' SelfA.
        self.key_embed = nn.ModuleList(MLPEmbed(batch_size, embed_dim) for _ in t_channels)
        self.query_embed = nn.ModuleList(MLPEmbed(batch_size, embed_dim) for _ in s_channels)
        self.proj = nn.ModuleList(
            nn.ModuleList(projection(cs, ct, opts.proj_width) for ct in t_channels) for cs in s_channels
        )
        self.last_attention: Tensor | None = None

    @staticmethod
    def _map_channels(shapes: tuple[tuple[int, ...], ...], who: str) -> list[int]:
        maps = shapes[1:-1]
        if not maps or any(len(s) != 3 for s in maps):
            raise UserError(
                f"semckd needs the {who}'s intermediate feature maps (features[1:-1], each C x H x W); "
                f"got feature shapes {list(shapes)}"
            )
        return [s[0] for s in maps]

    def forward(self, out_s, out_t, target, index=None):
        return {"semckd": self.forward_features(out_s[1][1:-1], out_t[1][1:-1]).loss}

    def forward_features(self, feat_s: list[Tensor], feat_t: list[Tensor]) -> SemCKDOutput:
        """SemCKD on lists of S student maps and T teacher maps, each [B, C, H, W]."""
        for who, feats in (("student", feat_s), ("teacher", feat_t)):
            if feats[0].shape[0] != self.batch_size:
                raise UserError(
                    f"semckd was built for batch size {self.batch_size} but got a {who} batch of "
                    f"{feats[0].shape[0]}: its query/key MLPs read whole rows of the batch Gram "
                    f"matrix, so every batch must hold exactly {self.batch_size} samples"
                )
        bsz, num_s = self.batch_size, len(feat_s)

        key = torch.stack([emb(_gram(f)) for emb, f in zip(self.key_embed, feat_t)], dim=2)
        query = torch.stack([emb(_gram(f)) for emb, f in zip(self.query_embed, feat_s)], dim=1)
        energy = torch.bmm(query, key) / self.soft
        attention = F.softmax(energy, dim=-1)

        # Each pair is compared at the smaller of the two heights (only H is looked at, square maps
        # assumed, as in the official code); the larger map is average-pooled, the student before
        # its projection. Pooled maps are shared between the pairs that need the same size.
        pooled: dict[tuple[str, int, int], Tensor] = {}

        def pool(who: str, idx: int, feat: Tensor, size: int) -> Tensor:
            if (who, idx, size) not in pooled:
                pooled[who, idx, size] = _pool_to(feat, size)
            return pooled[who, idx, size]

        proj_value_stu, value_tea, pair_mse = [], [], []
        for i, fs in enumerate(feat_s):
            stu_row, tea_row = [], []
            for j, ft in enumerate(feat_t):
                size = min(fs.shape[2], ft.shape[2])
                stu_row.append(self.proj[i][j](pool("s", i, fs, size)))
                tea_row.append(pool("t", j, ft, size))
            proj_value_stu.append(stu_row)
            value_tea.append(tea_row)
            pair_mse.append(
                torch.stack(
                    [_pair_mse(p, t) for p, t in zip(stu_row, tea_row)],
                    dim=1,
                )
            )
        ind_loss = torch.stack(pair_mse, dim=1)  # [B, S, T]
        loss = (attention * ind_loss).sum() / (bsz * num_s)

        self.last_attention = attention.detach()
        return SemCKDOutput(loss, attention, energy, ind_loss, query, key, proj_value_stu, value_tea)

    def extra_metrics(self) -> dict[str, float]:
        """Batch-mean attention of every (student i, teacher j) pair of the last forward."""
        if self.last_attention is None:
            return {}
        mean = self.last_attention.float().mean(0).tolist()
        return {f"attn_s{i}_t{j}": a for i, row in enumerate(mean) for j, a in enumerate(row)}
