"""One adapter per model family: how reductions are applied inside that family's models.

An adapter finds the layers, carries a ``TokenState`` through a forward and keeps hidden
states, positions, masks and caches consistent with what the pruners chose. It never
branches on the pruning method.
"""
from __future__ import annotations

from ..errors import UnsupportedModelError
from .decoder import DecoderAdapter
from .encoder import EncoderAdapter
from .lvlm import LVLMAdapter
from .unet import UNetAdapter

ADAPTERS = [LVLMAdapter, DecoderAdapter, EncoderAdapter, UNetAdapter]  # first match wins: an LVLM also holds a decoder


def find_adapter(model):
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    families = "; ".join(a.family for a in ADAPTERS)
    raise UnsupportedModelError(f"no tokenprune adapter for {type(model).__name__}. Supported families: {families}")
