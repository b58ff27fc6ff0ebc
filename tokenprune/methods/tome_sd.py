"""ToMe for Stable Diffusion (Bolya & Hoffman, 2023): merge the spatial tokens of a U-Net block
before attention, unmerge after, so the convolutions still see the whole feature map.

Partition (as the ``tomesd`` package): the token grid is cut into ``sy x sx`` cells and one
token of each cell, chosen at random, is a destination; all others are sources. Each source
finds its most similar destination (cosine of the block's input hidden states) and the
``int(ratio * N)`` most similar sources are averaged into their destinations. Merged sources
get their destination's output back. The random choice is drawn from a generator seeded by
``(seed, timestep, block)``, so a row gives the same result alone or in a batch and calls
never share state. Which parts of the block run merged (``merge_attn`` / ``merge_crossattn`` /
``merge_mlp``) travels in the returned ``Merge``; the U-Net adapter applies it around those
parts. Needs a token grid (``state.grid``): on models without one it raises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TokenPruneError
from ..pruner import Pruner, check_ratio, register_pruner
from ..reductions import Merge, top_k_mask


def destination_mask(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None) -> torch.Tensor:
    """(h * w,) bool, row-major: one destination per full ``sy x sx`` cell (top-left without a generator).

    Rows / columns past the last full cell hold only sources, as in tomesd.
    """
    hc, wc = h // sy, w // sx
    if generator is None:
        pick = torch.zeros(hc, wc, dtype=torch.long)
    else:
        pick = torch.randint(sy * sx, (hc, wc), generator=generator)
    rows = torch.arange(hc)[:, None] * sy + pick // sx
    cols = torch.arange(wc)[None, :] * sx + pick % sx
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[rows, cols] = True
    return mask.flatten()


def merge_into_destinations(metric: torch.Tensor, dst: torch.Tensor, r: int) -> Merge:
    """Merge the ``r`` sources most similar to a destination, per row of ``metric`` (B, N, C)."""
    B, N, _ = metric.shape
    dev = metric.device
    x = torch.nn.functional.normalize(metric.float(), dim=-1)
    dst_slots, src_slots = dst.nonzero().flatten().to(dev), (~dst).nonzero().flatten().to(dev)
    sim, target = (x[:, src_slots] @ x[:, dst_slots].transpose(-1, -2)).max(dim=-1)  # sources only
    best = torch.full((B, N), float("-inf"), device=dev).index_copy_(1, src_slots, sim)
    into = torch.full((B, N), -1, dtype=torch.long, device=dev).index_copy_(1, src_slots, dst_slots[target])
    src = (~dst).to(dev).expand(B, N)
    merged = top_k_mask(best, src, count=torch.full((B,), min(r, len(src_slots)), device=dev))
    return Merge(keep=~merged, dst=torch.where(merged, into, -1))


@register_pruner("tome-sd")
@dataclass
class ToMeSD(Pruner):
    """ToMe-SD with tomesd's option names.

    ``ratio``: share of a block's tokens merged away (capped at the sources, ``1 - 1/(sx*sy)``).
    ``max_downsample``: merge only in blocks whose map is at most this many times smaller than
    the U-Net's input (1: the highest resolution only, as tomesd's default).
    ``blocks``: indices of the U-Net's transformer blocks (in module order) that may merge;
    None = all. ``timesteps``: ``(low, high)``: merge only at diffusion timesteps in that range;
    None = always. ``use_rand=False``: always the top-left token of a cell (tomesd's ``no_rand``).
    """

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    seed: int = 0
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    blocks: tuple[int, ...] | None = None
    timesteps: tuple[float, float] | None = None

    def __post_init__(self):
        super().__post_init__()
        check_ratio(self.name, "ratio", self.ratio)
        for f in ("max_downsample", "sx", "sy"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TokenPruneError(f"{self.name}: {f} must be an integer >= 1, got {v!r}")
        if self.blocks is not None:
            blocks = list(self.blocks) if isinstance(self.blocks, (list, tuple)) else [self.blocks]
            if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks) or len(set(blocks)) != len(blocks):
                raise TokenPruneError(f"{self.name}: blocks must be distinct integers >= 0, got {self.blocks!r}")
            self.blocks = tuple(sorted(blocks))
        if self.timesteps is not None:
            t = self.timesteps
            if not isinstance(t, (list, tuple)) or len(t) != 2 or not all(isinstance(v, (int, float)) for v in t) \
                    or t[0] > t[1]:
                raise TokenPruneError(f"{self.name}: timesteps must be a (low, high) pair with low <= high, got {t!r}")
            self.timesteps = (float(t[0]), float(t[1]))

    def layers(self) -> list[int]:
        """The listed blocks ([] when ``blocks`` is None: every block, see ``layers_on``)."""
        return list(self.blocks or ())

    def layers_on(self, num_layers: int) -> list[int]:
        return list(range(num_layers)) if self.blocks is None else list(self.blocks)

    def parts(self) -> tuple[str, ...]:
        flags = (("attn1", self.merge_attn), ("attn2", self.merge_crossattn), ("ff", self.merge_mlp))
        return tuple(part for part, on in flags if on)

    def select(self, state):
        if state.grid is None:
            raise TokenPruneError(
                f"{self.name} merges on a 2-D token grid, which this model's tokens do not have "
                "(it runs inside diffusers U-Net transformer blocks)"
            )
        if state.downsample > self.max_downsample or not self.parts():
            return None
        if self.timesteps is not None:
            if state.timestep is None:
                raise TokenPruneError(f"{self.name}: timesteps are scheduled but this call has no single timestep")
            if not self.timesteps[0] <= state.timestep <= self.timesteps[1]:
                return None
        r = int(state.num_slots * self.ratio)
        if r <= 0:
            return None
        generator = None
        if self.use_rand:  # same draw for a row alone or in a batch; a fresh one per (timestep, block)
            generator = torch.Generator().manual_seed(hash((self.seed, state.layer, state.timestep)) & (2**63 - 1))
        h, w = state.grid
        merge = merge_into_destinations(state.hidden, destination_mask(h, w, self.sx, self.sy, generator), r)
        merge.parts = self.parts()
        return merge
