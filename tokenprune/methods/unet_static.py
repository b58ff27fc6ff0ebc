"""Static width pruning of a diffusers U-Net's transformer blocks: the baseline prompt-routed
pruning (APTP) has to beat at equal MACs.

Every prompt gets the same smaller U-Net: each transformer block keeps ``round(keep * H)``
attention heads (the same in self- and cross-attention) and ``round(keep * C)`` feed-forward
hidden channels, at least one of each, the ones whose weights have the largest L1 norm
(magnitude pruning, Li et al. 2017, per unit: a head's q / k / v rows and output columns, a
channel's input rows, value and gate, and its output column). A uniform share per block rather
than one global ranking, because weight norms are not comparable across blocks of different
widths and depths. The U-Net adapter slices the kept units into real smaller layers at attach
(``experts``) and puts the original layers back at ``remove()``.

Every matmul of a transformer block (projections, attention, feed-forward) is linear in its
heads and channels, so ``keep`` is the transformer blocks' MACs ratio up to rounding, which is
what ``handle.stats.flops_ratio`` reports: for "equal average MACs" with a routed method, set
``keep`` to its mean ratio. Convolutions are not pruned; the whole U-Net's ratio is
``1 - (1 - keep) * share`` with ``share`` the transformer blocks' part of its MACs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TokenPruneError
from ..pruner import Pruner, register_pruner


def l1_norms(views: list[torch.Tensor]) -> torch.Tensor:
    """(n,) summed absolute weights of each unit (dim 0 of every view)."""
    return sum(v.abs().sum(dim=tuple(range(1, v.dim()))).double() for v in views)


def top_units(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """(n,) bool: the ``max(1, round(keep * n))`` largest scores (ties to the lower index)."""
    n = len(scores)
    count = max(1, int(keep * n + 0.5))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[scores.argsort(descending=True, stable=True)[:count]] = True
    return mask


@register_pruner("unet-static")
@dataclass
class UNetStatic(Pruner):
    """``keep``: share of heads and feed-forward channels kept in each sliced block, in (0, 1]
    (1.0 = the dense model). ``blocks``: transformer block indices (module order) to slice;
    None = all. ``heads`` / ``channels``: whether to slice attention heads / feed-forward channels.
    """

    keep: float = 0.5
    blocks: tuple[int, ...] | None = None
    heads: bool = True
    channels: bool = True

    def __post_init__(self):
        super().__post_init__()
        k = self.keep
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < float(k) <= 1.0:
            raise TokenPruneError(f"{self.name}: keep must be a number in (0, 1], got {k!r}")
        if self.blocks is not None:
            blocks = list(self.blocks) if isinstance(self.blocks, (list, tuple)) else [self.blocks]
            if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks) \
                    or len(set(blocks)) != len(blocks):
                raise TokenPruneError(f"{self.name}: blocks must be distinct integers >= 0, got {self.blocks!r}")
            self.blocks = tuple(sorted(blocks))
        for f in ("heads", "channels"):
            if not isinstance(getattr(self, f), bool):
                raise TokenPruneError(f"{self.name}: {f} must be True or False, got {getattr(self, f)!r}")

    def layers(self) -> list[int]:
        return []  # no token reduction: the model itself is narrower

    def validate(self, num_layers: int) -> None:
        for b in self.blocks or ():
            if b >= num_layers:
                raise TokenPruneError(f"{self.name}: block {b} is beyond the model, which has {num_layers} "
                                      f"transformer blocks (0..{num_layers - 1})")

    def select(self, state):
        return None

    def experts(self, units: list[dict]) -> list[dict]:
        """One expert for every prompt: the kept heads and channels of each sliced block."""
        heads, channels = {}, {}
        for i, unit in enumerate(units):
            if self.blocks is not None and i not in self.blocks:
                continue
            if self.heads:
                heads[i] = top_units(l1_norms(unit["heads"]), self.keep)
            if self.channels:
                channels[i] = top_units(l1_norms(unit["channels"]), self.keep)
        return [{"heads": heads, "channels": channels}]
