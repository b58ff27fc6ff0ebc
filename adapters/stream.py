"""The token stream of one forward: applies reductions to a ``TokenState`` and undoes them at the end.

Shared by every adapter. An adapter feeds it the hidden states entering a layer and the
reductions its pruners chose; the stream keeps the slot bookkeeping (which original token
each slot holds, exits of removed tokens, merge redirects, tokens skipping one block) and
gives the full-length output back, so models keep their dense output shape.
"""
from __future__ import annotations

import torch

from ..state import TokenState, expand_rows, flat_rows, gather_rows, scatter_rows  # noqa: F401  (the adapters import them from here)


class Stream:
    def __init__(self, state: TokenState):
        self.state = state
        self.N = state.num_slots  # tokens the forward brought in
        self.dense_count = self.alive_count = state.valid.sum(1)  # (B,) real tokens, and those not removed
        self.exits: torch.Tensor | None = None  # (B, N + 1, D): last hidden state per token; column N is a sink
        self.redirects: list[tuple[torch.Tensor, ...]] = []  # (row, token, token whose output it takes)
        self.skip: tuple | None = None  # (layer, slots, valid, hidden of all slots, saved state fields)
        self.version = 0  # bumped whenever the slot set changes
        self.changed = False

    def reduce(self, layer: int, reduction) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply ``reduction`` before ``layer``; returns the kept ``(slots, valid)`` of the old slots."""
        st = self.state
        slots, valid = reduction.plan(st)
        full = reduction.combine(st)
        sizes = reduction.sizes(st)
        if reduction.persistent:
            self._remember_exits(full, reduction)
            self.alive_count = valid.sum(1)
        else:
            self.skip = (layer, slots, valid, full, (st.index, st.valid, st.segments, st.sizes))
        st.hidden = gather_rows(full, slots)
        st.index, st.segments, st.valid = st.index.gather(1, slots), st.segments.gather(1, slots), valid
        st.sizes = None if sizes is None else sizes.gather(1, slots)
        self.version += 1
        self.changed = True
        return slots, valid

    def unskip(self, layer: int, out: torch.Tensor) -> torch.Tensor | None:
        """After a block that some tokens skipped: put them back (unchanged) beside the outputs."""
        if self.skip is None or self.skip[0] != layer:
            return None
        _, slots, valid, full, saved = self.skip
        if not bool(valid.all()):  # fillers (rows that kept fewer) keep their input
            out = torch.where(valid[..., None], out, gather_rows(full, slots))
        merged = scatter_rows(full, slots, out)
        st = self.state
        st.index, st.valid, st.segments, st.sizes = saved
        st.hidden = merged
        self.skip = None
        self.version += 1
        return merged

    def restore(self, h: torch.Tensor) -> torch.Tensor | None:
        """Full-length output: kept tokens' outputs, removed tokens' exits, merged tokens' targets.

        Also releases the state's scoring accessors (``release``; adapters set them before each layer).
        """
        self.release()
        if self.exits is None:
            return None
        st = self.state
        B, n, D = h.shape
        sink = torch.where(st.valid, st.index, self.N)
        out = self.exits.scatter(1, sink[..., None].expand(B, n, D), h)
        for row, src, dst in reversed(self.redirects):
            out[row, src] = out[row, dst]
        return out[:, : self.N]

    def release(self):
        """Drop the state's attention / keys accessors: they close over the adapter's call record,
        which holds this stream, and that cycle would keep the call's tensors alive until the
        garbage collector happens to run."""
        self.state._attention = self.state._keys = self.state._context = self.state._mass = None

    def _remember_exits(self, full: torch.Tensor, reduction):
        """Write the hidden states of the slots leaving now (kept ones are written later)."""
        st = self.state
        B, n, D = full.shape
        if self.exits is None:
            self.exits = full.new_zeros(B, self.N + 1, D)
        row, slot = (st.valid & ~reduction.keep).nonzero(as_tuple=True)
        self.exits[row, st.index[row, slot]] = full[row, slot]
        redirect = reduction.redirect()
        if redirect is not None:
            row, slot = ((redirect >= 0) & st.valid).nonzero(as_tuple=True)
            self.redirects.append((row, st.index[row, slot], st.index[row, redirect[row, slot]]))
