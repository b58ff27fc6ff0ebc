"""Token-skip baselines for FTP (no training): tokens pass decoder blocks by on the residual stream.

A skipping token neither changes in the block nor leaves keys / values in its cache; it rejoins
after it (``Skip``). ``sparsity`` is the share of token-block computations skipped (0.0 = dense,
bit-exact); block 0 is never routed (HF derives new tokens' positions from its cache, and a
router has no attention before it), so each routed block skips ``sparsity * L / #blocks`` of its
tokens. The first real token of each row (``protect_first``) never skips: it is the attention
sink every later token reads in every block.

- ``skip-rank``: a static attention-rank router. Before block i, the prompt tokens that received
  the least attention in block i-1 (head mean, averaged over the prompt queries that ran it and
  see the token) skip. A token that skipped block i-1 received nothing there and ranks lowest, so
  skipping is sticky while the budget allows. Generated tokens never skip: the attention a token
  receives comes from later tokens, which a new token does not have yet.
- ``skip-random``: each token draws a number from its row position, the block and ``seed``
  (a hash: a row routes the same alone or in a batch, in ``generate`` and in a recompute). The
  prompt's lowest ``round(rate * n)`` skip (exact share); a generated token skips when its number
  is below the rate (the share on average).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import TokenPruneError
from ..pruner import Pruner, check_ratio, register_pruner
from ..reductions import Skip, top_k_mask
from ..state import Segment


@dataclass
class BlockSkipper(Pruner):
    """Shared config: ``sparsity`` over ``blocks`` (None: every block but 0)."""

    sparsity: float = 0.3
    blocks: tuple[int, ...] | None = None
    protect_first: int = 1

    def __post_init__(self):
        super().__post_init__()
        check_ratio(self.name, "sparsity", self.sparsity)
        if self.blocks is not None:
            if not isinstance(self.blocks, (list, tuple)) or not self.blocks or any(
                    isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.blocks):
                raise TokenPruneError(f"{self.name}: blocks must be a list of block indices >= 1, got {self.blocks!r}")
            if len(set(self.blocks)) != len(self.blocks):
                raise TokenPruneError(f"{self.name}: blocks {list(self.blocks)} repeats a block")
            self.blocks = tuple(sorted(self.blocks))
        if isinstance(self.protect_first, bool) or not isinstance(self.protect_first, int) or self.protect_first < 0:
            raise TokenPruneError(f"{self.name}: protect_first must be a non-negative integer")

    def layers(self) -> list[int]:
        if self.blocks is None:
            raise TokenPruneError(f"{self.name}: its blocks depend on the model's depth (use layers_on(num_layers))")
        return list(self.blocks)

    def layers_on(self, num_layers: int) -> list[int]:
        if self.sparsity <= 0:
            return []
        return list(self.blocks) if self.blocks is not None else list(range(1, num_layers))

    def validate(self, num_layers: int) -> None:
        super().validate(num_layers)
        if self.sparsity > 0 and self.rate(num_layers) > 1.0:
            raise TokenPruneError(f"{self.name}: sparsity {self.sparsity} of {num_layers} blocks does not fit in the "
                                  f"{len(self.layers_on(num_layers))} routed blocks")

    def rate(self, num_layers: int) -> float:
        """Share of each routed block's tokens that skip it."""
        return self.sparsity * num_layers / len(self.layers_on(num_layers))

    def routable(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, generated): (B, n) slots that may skip, split by segment."""
        ok = state.valid & (state.positions() >= self.protect_first)
        generated = state.segments == int(Segment.GENERATED)
        return ok & ~generated, ok & generated


def mix(h):
    """lowbias32 integer hash, on a Python int or an int64 tensor alike."""
    h = h & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def uniform_hash(seed: int, layer: int, positions: torch.Tensor) -> torch.Tensor:
    """Numbers in [0, 1) from (seed, layer, position): the same on every platform and batch."""
    return mix(positions.long() + mix(mix(seed) + layer)).double() / 2**32


@register_pruner("skip-random")
@dataclass
class SkipRandom(BlockSkipper):
    """Random tokens skip each routed block at the sparsity (see the module docstring)."""

    seed: int = 0
    routes_decode: ClassVar[bool] = True
    reads_previous_layer: ClassVar[bool] = False

    def select(self, state):
        rate = self.rate(state.num_layers)
        if state.decoding and state.index.numel() <= 64:  # a few new tokens: the same hash in Python ints
            key = mix(mix(self.seed) + state.layer)
            skip = [[p >= self.protect_first and mix(p + key) / 2**32 < rate for p in row]
                    for row in state.positions().tolist()]
            return Skip(keep=~torch.tensor(skip, device=state.valid.device))
        prompt, generated = self.routable(state)
        u = uniform_hash(self.seed, state.layer, state.positions())
        skip = generated & (u < rate)
        if not state.decoding:  # (a decode step holds generated tokens only)
            skip |= top_k_mask(-u, prompt, rate)
        return Skip(keep=state.valid & ~skip)


@register_pruner("skip-rank")
@dataclass
class SkipRank(BlockSkipper):
    """The prompt tokens least attended in the previous block skip (see the module docstring)."""

    spares_generated: ClassVar[bool] = True

    def select(self, state):
        prompt, _ = self.routable(state)
        if not bool(prompt.any()):
            return None
        voters = state.valid & (state.segments != int(Segment.GENERATED))
        probs = state.attention(None).float().mean(dim=1) * voters[:, :, None]  # (B, q, n), prompt queries
        received = probs.sum(dim=1)
        seen_by = voters.long().flip(1).cumsum(1).flip(1).clamp_min(1)  # prompt queries at or after each slot
        score = received / seen_by
        skip = top_k_mask(-score, prompt, self.rate(state.num_layers))
        return Skip(keep=state.valid & ~skip)
