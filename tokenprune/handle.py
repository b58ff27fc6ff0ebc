"""Attach pruners to a model and detach them exactly: ``prune``, ``pruning``, ``PruningHandle``."""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

import torch

from .errors import AlreadyAttachedError, TokenPruneError
from .pruner import Pruner

_ATTACHED: "weakref.WeakKeyDictionary[torch.nn.Module, PruningHandle]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class PruningHandle:
    """The attachment of pruners to one model; ``remove()`` restores it bit for bit.

    Adapters only add removable hooks and never touch parameters, buffers or attributes,
    so removing the hooks is the whole restoration; width pruning (U-Nets) also swaps block
    parts for sliced copies and puts the original module objects back.
    """

    def __init__(self, model, adapter, key=None):
        self.model = model
        self.adapter = adapter
        self.key = model if key is None else key  # the module the hooks are on (a pipeline's U-Net)

    @property
    def pruners(self) -> list[Pruner]:
        return self.adapter.pruners

    @property
    def stats(self):
        """Stats of the most recent request (a forward call, or one whole ``generate``)."""
        return self.adapter.last_stats

    def segments(self, segments: torch.Tensor):
        """Context manager: use these ``(B, N)`` Segment ids for the calls inside it (this thread).

        Lets a caller mark e.g. already generated tokens when recomputing without a cache.
        """
        return self.adapter.segment_override(segments)

    def remove(self) -> None:
        with _LOCK:
            if _ATTACHED.get(self.key) is self:
                del _ATTACHED[self.key]
        self.adapter.detach()

    def __repr__(self):
        return f"PruningHandle({type(self.model).__name__}, {[p.to_dict() for p in self.pruners]})"


def prune(model, pruners, **options) -> PruningHandle:
    """Attach one pruner or a list of them until ``handle.remove()``.

    ``options`` go to the model's adapter (e.g. ``renumber_positions=True`` for decoders).
    Raises ``UnsupportedModelError``, ``AlreadyAttachedError`` or ``TokenPruneError`` before
    touching the model.
    """
    from .adapters import find_adapter

    pruners = list(pruners) if isinstance(pruners, (list, tuple)) else [pruners]
    for p in pruners:
        if not isinstance(p, Pruner):
            raise TokenPruneError(f"expected a Pruner (see tp.build_pruner), got {type(p).__name__}")
    with _LOCK:
        adapter_cls = find_adapter(model)
        # attachments are keyed by the module the hooks go on: a pipeline and its U-Net are one model
        key = adapter_cls.hooked_module(model) if hasattr(adapter_cls, "hooked_module") else model
        if key in _ATTACHED:
            raise AlreadyAttachedError(
                f"pruners are already attached to this {type(key).__name__}; remove() them first or pass a list"
            )
        adapter = adapter_cls(model, pruners, **options)  # validates, attaches nothing yet
        adapter.attach()
        handle = _ATTACHED[key] = PruningHandle(model, adapter, key)
    return handle


@contextmanager
def pruning(model, pruners, **options):
    """``with tp.pruning(model, pruner) as handle: ...`` attaches for the block only."""
    handle = prune(model, pruners, **options)
    try:
        yield handle
    finally:
        handle.remove()
