"""Offline loaders for the bundled models: `tp.zoo.load(name)`.

Nothing here touches the network. Each loader returns the standard library class
(a transformers / open_clip / diffusers object) plus its processor or tokenizer.
"""
from __future__ import annotations

from typing import Callable

from ..errors import TokenPruneError

_LOADERS: dict[str, Callable] = {}


def register(name: str):
    def wrap(fn):
        _LOADERS[name] = fn
        return fn
    return wrap


def names() -> list[str]:
    return sorted(_LOADERS)


def load(name: str, **kwargs):
    """Load a bundled model by name; returns ``(model, processor_or_tokenizer)``."""
    if name not in _LOADERS:
        raise TokenPruneError(f"unknown zoo model {name!r}; available: {', '.join(names())}")
    return _LOADERS[name](**kwargs)


from . import llava, smollm2, t2i, vision  # noqa: E402,F401  (each registers its loaders)
