"""The three things a pruner can ask for: drop, skip or merge token slots.

A pruner returns one of these from ``select(state)``; the adapter applies it to hidden
states, positions, masks and the KV cache. Each is plain data plus pure tensor functions,
so methods stay independent of model classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .state import TokenState


def rectangular(keep: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots to keep per row, padded to one count so the batch stays a rectangle.

    Returns ``(slots, slot_valid)``, both ``(B, m)``: ascending slot indices (causal order is
    preserved) and whether each kept slot is real content. Rows that keep fewer than ``m``
    slots are filled with dropped slots, padding first; fillers are marked invalid so they
    are masked as keys and never reach the output.
    """
    keep = keep & valid
    n = keep.shape[1]
    m = max(int(keep.sum(dim=1).max()), 1)
    pos = torch.arange(n, device=keep.device)
    priority = keep.long() * (4 * n) + (~valid).long() * (2 * n) + pos  # unique per slot
    slots = priority.topk(m, dim=1).indices.sort(dim=1).values
    return slots, keep.gather(1, slots)


def keep_count(candidates: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """(B,) ``round(keep_ratio * #candidates)`` per row, halves rounded up."""
    return (candidates.sum(dim=1).double() * keep_ratio + 0.5).floor().long()


def top_k_mask(scores: torch.Tensor, candidates: torch.Tensor, keep_ratio: float | None = None,
               count: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n) bool: the top ``count`` (or ``keep_ratio`` share) of each row's candidates by score.

    Ties go to the earlier slot, so a row gives the same answer alone or in a batch.
    """
    if count is None:
        count = keep_count(candidates, keep_ratio)
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank < count[:, None])


@dataclass
class Reduction:
    """Base: ``keep`` marks the slots (B, n) that take part in the next layers."""

    keep: torch.Tensor
    # for blocks made of parts (U-Net: "attn1", "attn2", "ff"): the parts that run on the reduced
    # set, the others on all tokens; None = the whole block. Adapters without parts ignore it.
    parts: tuple[str, ...] | None = field(default=None, kw_only=True)
    persistent: ClassVar[bool] = True  # False: the token rejoins after one block

    def plan(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        return rectangular(self.keep, state.valid)

    def combine(self, state: TokenState) -> torch.Tensor:
        """Hidden states of all current slots as they should enter the kept set."""
        return state.hidden

    def redirect(self) -> torch.Tensor | None:
        """(B, n) slot whose final output a removed slot takes, or -1 (keeps its own)."""
        return None

    def sizes(self, state: TokenState) -> torch.Tensor | None:
        """(B, n) how many original tokens each slot stands for after this reduction (None: all 1)."""
        return state.sizes

    def is_noop(self, state: TokenState) -> bool:
        """Keeps every real token: the adapter then leaves the stream untouched (bit-exact)."""
        return bool((self.keep | ~state.valid).all())

    @classmethod
    def from_scores(cls, state: TokenState, scores: torch.Tensor, candidates: torch.Tensor, keep_ratio: float):
        """Keep every non-candidate token plus the top share of candidates by ``scores``."""
        keep = (state.valid & ~candidates) | top_k_mask(scores, candidates, keep_ratio)
        return cls(keep=keep)


@dataclass
class Drop(Reduction):
    """Removed tokens leave the stream for good; their output is their hidden state at exit."""


@dataclass
class Skip(Reduction):
    """Tokens not in ``keep`` bypass one block and rejoin unchanged after it."""

    persistent: ClassVar[bool] = False


@dataclass
class Merge(Reduction):
    """Removed tokens are averaged into a kept one (``dst`` slot, ``weight``) and unmerged at the end.

    ``dst`` is ``(B, n)``: for each removed slot the kept slot it joins, -1 for a plain drop.
    """

    dst: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def combine(self, state: TokenState) -> torch.Tensor:
        """Each kept slot that receives tokens becomes the weighted mean of itself and them.

        Only the receiving rows are computed; every other slot is returned bit-identical.
        """
        h = state.hidden
        B, n, D = h.shape
        row, slot = self._sources(state).nonzero(as_tuple=True)
        if len(row) == 0:
            return h
        w = torch.ones(B * n, dtype=h.dtype, device=h.device) if self.weight is None else self.weight.to(h.dtype).reshape(-1)
        flat, src = h.reshape(B * n, D), row * n + slot
        targets, into = torch.unique(row * n + self.dst[row, slot], return_inverse=True)
        num = (flat[targets] * w[targets, None]).index_add_(0, into, flat[src] * w[src, None])
        den = w[targets].index_add(0, into, w[src])
        out = flat.clone()
        out[targets] = num / den.clamp_min(torch.finfo(h.dtype).tiny)[:, None]
        return out.view(B, n, D)

    def _sources(self, state: TokenState) -> torch.Tensor:
        """(B, n) real slots that leave by merging into a kept slot."""
        src = (~self.keep) & (self.dst >= 0) & state.valid
        return src & self.keep.gather(1, self.dst.clamp_min(0))

    def redirect(self) -> torch.Tensor:
        return torch.where(self.keep, -1, self.dst)

    def sizes(self, state: TokenState) -> torch.Tensor:
        size = state.token_sizes()
        src = self._sources(state)
        return size.scatter_add(1, self.dst.clamp_min(0), torch.where(src, size, torch.zeros_like(size)))
