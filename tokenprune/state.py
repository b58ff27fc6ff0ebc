"""What a pruner sees while a forward runs: the live token slots of every row."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable

import torch

from .errors import TokenPruneError


def expand_rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, *t.shape[1:]) if t.shape[0] != batch else t


def gather_rows(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``t[b, slots[b]]`` for ``t`` of shape (B or 1, n, ...).

    Whole-row copies (``index_select`` on the flattened rows): on a CPU about ten times faster
    than an element-wise ``gather``, and the engine gathers the hidden states at every routed block.
    """
    B, m = slots.shape
    if t.shape[0] == 1:
        return t[0].index_select(0, slots.reshape(-1)).view(B, m, *t.shape[2:])
    n = t.shape[1]
    return t.reshape(B * n, *t.shape[2:]).index_select(0, flat_rows(slots, n)).view(B, m, *t.shape[2:])


def scatter_rows(t: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (B, n, ...) with ``t[b, slots[b]] = values[b]`` (slots distinct within a row)."""
    B, n = t.shape[:2]
    return t.reshape(B * n, *t.shape[2:]).index_copy(0, flat_rows(slots, n), values.reshape(-1, *t.shape[2:])).view(t.shape)


def flat_rows(slots: torch.Tensor, n: int) -> torch.Tensor:
    """Row-major indices of ``[b, slots[b]]`` into the (B * n) flattened rows."""
    return (slots + torch.arange(slots.shape[0], device=slots.device)[:, None] * n).reshape(-1)


class Segment(IntEnum):
    """Modality / role of a token; adapters fill this map, pruners pick a segment to reduce."""

    PAD = 0
    SYSTEM = 1
    TEXT = 2
    VISUAL = 3
    GENERATED = 4

    @classmethod
    def parse(cls, name: "str | Segment") -> "Segment":
        if isinstance(name, Segment):
            return name
        try:
            return cls[str(name).upper()]
        except KeyError:
            raise TokenPruneError(
                f"unknown segment {name!r}; choose one of {[s.name.lower() for s in cls]}"
            ) from None


@dataclass
class TokenState:
    """Slots of the token stream at the entry of ``layer``.

    Each row holds ``n`` slots (the same count for every row so tensors stay rectangular).
    ``index`` maps a slot to its original token position; ``valid`` is False for left padding
    and for filler slots that only exist to keep rows rectangular: those never count as
    content and are masked as attention keys.
    """

    layer: int
    num_layers: int
    hidden: torch.Tensor  # (B, n, D) hidden states entering `layer`
    index: torch.Tensor  # (B, n) original token positions, ascending per row
    valid: torch.Tensor  # (B, n) bool
    segments: torch.Tensor  # (B, n) Segment ids
    sizes: torch.Tensor | None = None  # (B, n) original tokens per slot (after merges); None = all 1
    # U-Net blocks: the slots are the row-major pixels of an (h, w) feature map, ``downsample``
    # times smaller than the model's input, at diffusion ``timestep`` (None where not applicable)
    grid: tuple[int, int] | None = None
    downsample: int | None = None
    timestep: float | None = None
    _attention: Callable[[torch.Tensor | None], torch.Tensor] | None = field(default=None, repr=False)
    _keys: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    _context: Callable | None = field(default=None, repr=False)
    _mass: Callable | None = field(default=None, repr=False)
    _input: tuple | None = field(default=None, repr=False)  # (segments, valid) as built: ``input_segments``
    # per original token (B, N, ...) facts an adapter knows, e.g. an LVLM's "image", "row", "col";
    # a value may be a zero-argument callable, computed once on first use
    token_info: dict = field(default_factory=dict, repr=False)
    # (B,) left padding per row, so ``positions()`` counts from each row's first real token
    row_offset: torch.Tensor | None = field(default=None, repr=False)
    # True at a decode step: the slots are the new tokens only (``Pruner.routes_decode``)
    decoding: bool = False
    _memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._input = (self.segments, self.valid)

    @property
    def input_segments(self) -> frozenset:
        """Segments the input contained, so "segment missing" is told apart from "already pruned away"
        (computed on first use: a decode step builds a state at every call and rarely asks)."""
        if not isinstance(self._input, frozenset):
            segments, valid = self._input
            self._input = frozenset(segments[valid].unique().tolist())
        return self._input

    @property
    def batch_size(self) -> int:
        return self.index.shape[0]

    @property
    def num_slots(self) -> int:
        return self.index.shape[1]

    def attention(self, query_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities ``(B, heads, q, n)`` of the query slots ``(B, q)`` (all if None).

        Computed on demand from the previous layer's own q/k projections, so the model keeps
        its fast attention kernel (SDPA never materialises these probabilities).
        """
        if self._attention is None:
            raise TokenPruneError(f"attention scores are not available at layer {self.layer}")
        return self._attention(query_slots)

    def context_attention(self, query_slots: torch.Tensor | None = None):
        """``(probs (B, heads, q, K), key_index (B, K), key_valid (B, K))``: the previous layer's
        attention of the query slots over every key they saw, with the keys' original positions.

        At prefill the keys are the current slots (``attention`` and ``index``); at a decode step
        (``decoding``) they are everything that layer's KV cache holds (the prompt and earlier
        tokens too), where ``attention`` only gives the new slots' columns.
        """
        if self._context is not None:
            return self._context(query_slots)
        return self.attention(query_slots), self.index, self.valid

    def attention_mass(self, key_positions: torch.Tensor, query_slots: torch.Tensor | None = None,
                       heads: tuple[int, ...] | None = None) -> torch.Tensor:
        """(B, heads, q): the previous layer's attention of the query slots on the keys at the
        original positions ``key_positions`` ((B,) or (B, k)), e.g. ``state.row_offset`` for each row's
        first token (the attention sink). The same numbers as summing ``context_attention`` columns,
        without the whole (q, n) matrix: at prefill a chunk of query rows at a time, at decode the
        fused attention kernel.
        ``heads``: only these query heads (their indices), which costs only their share.
        """
        on = key_positions.to(self.index.device).reshape(self.batch_size, -1)
        heads = None if heads is None else tuple(int(h) for h in heads)
        if self._mass is not None:
            return self._mass(on, query_slots, heads)
        probs, key_index, _ = self.context_attention(query_slots)
        if heads is not None:
            probs = probs[:, list(heads)]
        return (probs * (key_index[:, :, None] == on[:, None, :]).any(-1)[:, None, None, :]).sum(-1)

    def keys(self) -> torch.Tensor:
        """Attention keys ``(B, heads, n, head_dim)`` of the previous layer (token similarity)."""
        if self._keys is None:
            raise TokenPruneError(f"attention keys are not available at layer {self.layer}")
        return self._keys()

    def info(self, name: str) -> torch.Tensor:
        """Per-slot ``(B, n, ...)`` view of the adapter-provided fact ``name`` (see ``token_info``).

        Methods read model facts through this (an LVLM's patch grid coordinates, pixels,
        vision-tower attention), so they never need to know the model class.
        """
        if name not in self.token_info:
            known = ", ".join(sorted(self.token_info)) or "none"
            raise TokenPruneError(f"this model does not provide per-token {name!r} (it provides: {known})")
        value = self.token_info[name]
        if callable(value):
            value = self.token_info[name] = value()
        return gather_rows(value, self.index)

    def memo(self, key, compute: Callable[[], object]):
        """``compute()``, computed once while the slots stay the same (``index``, ``valid``, ``segments``
        and ``sizes`` the same tensors): for what a method derives from the slots alone (masks,
        position features, counts), which a router before every block would otherwise rebuild at each
        (a Skip gives the same slots back after its block). ``key`` names the value (include the
        settings it depends on); ``compute`` must not read ``hidden`` or the attention."""
        slots = (self.index, self.valid, self.segments, self.sizes)
        hit = self._memo.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], slots)):
            return hit[1]
        value = compute()
        self._memo[key] = (slots, value)  # (holding the slot tensors: their ids cannot be reused meanwhile)
        return value

    def positions(self) -> torch.Tensor:
        """(B, n) each slot's position among its row's real tokens (0 = the first; left padding
        not counted), so a row gets the same positions alone or in a padded batch."""
        if self.row_offset is None:
            return self.index
        return self.index - self.row_offset.to(self.index.device)[:, None]

    def token_sizes(self) -> torch.Tensor:
        if self.sizes is None:
            return torch.ones(self.index.shape, dtype=torch.float32, device=self.index.device)
        return self.sizes

    def content(self) -> torch.Tensor:
        """(B, n) bool: real prompt tokens (not padding, filler or generated)."""
        return self.valid & (self.segments != Segment.GENERATED)

    def last_content_slot(self) -> torch.Tensor:
        """(B,) slot of each row's last prompt token (the query FastV listens to)."""
        content = self.content()
        pos = torch.arange(self.num_slots, device=content.device).expand_as(content)
        return torch.where(content, pos, -1).amax(dim=1)

    def candidates(self, segment: "str | Segment", protect_first: int = 0, protect_last: int = 0) -> torch.Tensor:
        """(B, n) bool: slots of ``segment`` that may be reduced.

        The first ``protect_first`` and last ``protect_last`` prompt tokens of each row are
        never candidates (attention sinks and the instruction tail).
        """
        seg = Segment.parse(segment)
        content = self.content()
        if int(seg) not in self.input_segments:
            raise TokenPruneError(
                f"no '{seg.name.lower()}' tokens to prune at layer {self.layer} "
                f"(did the input contain that segment?)"
            )
        rank = content.long().cumsum(dim=1) - 1  # 0-based rank among prompt tokens
        total = content.long().sum(dim=1, keepdim=True)
        inside = (rank >= protect_first) & (rank < total - protect_last)
        return content & (self.segments == seg) & inside
