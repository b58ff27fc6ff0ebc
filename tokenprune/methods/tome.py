"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching merges the most similar token pairs.

Where: inside each listed block, between its attention and its MLP, from that block's own
keys (``inside_block=True``, ToMe's placement; the encoder adapter): the block's attention
runs on all its tokens, its MLP and the later blocks on the merged set. Adapters without a
hook point inside blocks (the decoder adapter) merge before the listed layer from the
previous layer's keys, whatever ``inside_block`` says; there ``layer`` starts at 1.

How: the keys averaged over heads are the similarity metric. The segment's tokens alternate
into sets A and B by position (ToMe's ``x[::2]`` / ``x[1::2]``, so a CLS-prefixed row splits
exactly as ToMe's first merge); only the |A| x |B| cosine similarities are computed. Each A
token picks its most similar B token and the A tokens with the most similar partners merge
into them by a size-weighted average; the adapter tracks sizes and applies proportional
attention (log size added to the attention logits). One difference from ToMe's code: ToMe
reorders tokens after each merge ([unmerged A by score, B]), which changes the next split;
here slots keep their image order, so every layer splits by position.

How many: ``r`` merges r tokens in each listed layer (ToMe's constant r; a list gives one r
per listed layer, e.g. ToMe's decreasing schedule); with ``r=0``, ``keep_ratio`` of the
candidates survive each listed layer (a geometric schedule). At most |A| (half the
candidates) merge per layer, as in ToMe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..pruner import SegmentDropPruner, TokenPruneError, register_pruner
from ..reductions import Merge, keep_count, rectangular, top_k_mask


def _gather(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return t.gather(1, slots[..., None].expand(*slots.shape, t.shape[-1]))


def bipartite_merge(keys: torch.Tensor, candidates: torch.Tensor, remove: torch.Tensor, valid: torch.Tensor,
                    sizes: torch.Tensor | None) -> Merge:
    """Merge ``remove[b]`` tokens of row b: pure function of keys (B, n, d) and masks (B, n)."""
    position = valid.long().cumsum(dim=1) - 1
    a_slots, a_ok = rectangular(candidates & (position % 2 == 0), valid)  # (B, |A|) ascending slots
    b_slots, b_ok = rectangular(candidates & (position % 2 == 1), valid)
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = _gather(k, a_slots) @ _gather(k, b_slots).transpose(-1, -2)  # (B, |A|, |B|): A x B only
    sim.masked_fill_(~b_ok[:, None, :], float("-inf"))
    best, partner = sim.max(dim=-1)
    able = a_ok & (best > float("-inf"))
    chosen = top_k_mask(best, able, count=torch.minimum(remove, able.sum(1)))
    merged = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device).scatter(1, a_slots, chosen)
    dst = torch.full(valid.shape, -1, dtype=torch.long, device=valid.device)
    dst = dst.scatter(1, a_slots, torch.where(chosen, b_slots.gather(1, partner), -1))
    return Merge(keep=valid & ~merged, dst=dst, weight=sizes)


@register_pruner("tome")
@dataclass
class ToMe(SegmentDropPruner):
    """Merge ``r`` tokens (or down to ``keep_ratio`` of the candidates when r=0) at each listed layer.

    ``inside_block``: merge between attention and MLP of each listed block (ToMe's placement;
    ``layer`` may then start at 0), else before the listed layer from the previous layer's keys.
    """

    default_target: ClassVar[str] = "vision"  # on an LVLM: the vision tower (a ViT method)

    segment: str = "visual"
    protect_first: int = 0
    protect_last: int = 0
    r: int | tuple[int, ...] = 0
    inside_block: bool = True

    def __post_init__(self):
        if not isinstance(self.inside_block, bool):
            raise TokenPruneError(f"{self.name}: inside_block must be true or false, got {self.inside_block!r}")
        super().__post_init__()
        r = list(self.r) if isinstance(self.r, (list, tuple)) else [self.r]
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in r):
            raise TokenPruneError(f"{self.name}: r must be a non-negative integer or a list of them, got {self.r!r}")
        if isinstance(self.r, (list, tuple)):
            if len(r) != len(self.layers()):
                raise TokenPruneError(f"{self.name}: r lists {len(r)} values for the {len(self.layers())} "
                                      f"layers {self.layers()}")
            self.r = tuple(r)

    def first_layer(self) -> int:
        return 0 if self.inside_block else 1

    def merges(self, layer: int) -> int | None:
        """Tokens ``r`` merges at ``layer``; None: the geometric ``keep_ratio`` schedule decides."""
        if isinstance(self.r, tuple):
            return self.r[self.layers().index(layer)]
        return self.r or None

    def select(self, state):
        candidates = self.candidates(state)
        r = self.merges(state.layer)
        if r is not None:
            remove = torch.full((state.batch_size,), r, dtype=torch.long, device=candidates.device)
        else:
            remove = candidates.sum(1) - keep_count(candidates, self.keep_ratio)
        keys = state.keys().mean(dim=1)  # (B, n, head_dim), ToMe's metric
        return bipartite_merge(keys, candidates, remove, state.valid, state.token_sizes())
