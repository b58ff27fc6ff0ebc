"""Pruner base class and registry: a method is a config dataclass with one ``select``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import TokenPruneError
from .reductions import Reduction
from .state import Segment, TokenState

_REGISTRY: dict[str, type["Pruner"]] = {}
TARGETS = ("auto", "vision", "language")


def register_pruner(name: str):
    """Class decorator: make a pruner buildable by name."""

    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_pruners() -> list[str]:
    return sorted(_REGISTRY)


def build_pruner(name: str, **config) -> "Pruner":
    """``build_pruner(**pruner.to_dict())`` rebuilds the same pruner."""
    if name not in _REGISTRY:
        raise TokenPruneError(f"unknown pruning method {name!r}; registered: {', '.join(list_pruners())}")
    cls = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(config) - fields
    if unknown:
        raise TokenPruneError(f"{name}: unknown option(s) {sorted(unknown)}; options are {sorted(fields)}")
    return cls(**config)


@dataclass(frozen=True)
class ModelFacts:
    """What an adapter knows about a model before it hooks anything, for ``Pruner.check``.

    A method built for one model (a router trained at one width and depth, a schedule of one
    length) refuses another here, at ``tp.prune`` time, not mid-forward with hooks attached.
    ``None``: the adapter does not know, or it differs per layer (a U-Net's widths).
    """

    num_layers: int  # the layers ``Pruner.layers_on`` numbers (decoder layers, ViT blocks, U-Net transformer blocks)
    stack: str = "language"  # the adapter's ``stack``: "language", "vision" or "unet"
    hidden_size: int | None = None  # width of the residual stream the pruner's ``state.hidden`` has
    num_heads: int | None = None  # attention heads (query heads, under grouped-query attention)
    num_kv_heads: int | None = None
    head_dim: int | None = None


@dataclass
class Pruner:
    """A token-reduction method: config fields plus ``select(state) -> Reduction | None``.

    Pruners know nothing about model classes: they read a ``TokenState`` and answer with a
    ``Drop``, ``Skip`` or ``Merge``. The adapter calls ``select`` before each layer listed
    by ``layers()``.
    """

    name: ClassVar[str] = ""
    #: which part of a multi-stack model (an LVLM) ``target="auto"`` means for this method
    default_target: ClassVar[str] = "language"
    #: ``select`` reads what the previous layer computed (its attention or keys). False: it chooses
    #: from the input alone (position, randomness, a vision tower's view), so it may run before a
    #: decoder's layer 0, where the sequence entering the language model is shortened
    reads_previous_layer: ClassVar[bool] = True
    #: routers: ``select`` is also asked at every decode step, with the new tokens as the slots
    #: (``state.decoding``); it may answer a ``Skip`` there, so generated tokens skip blocks too
    routes_decode: ClassVar[bool] = False
    #: skip methods whose generated tokens run every block (``ftp`` also keeps the prompt's last): their
    #: ``sparsity`` is spent on the prompt alone (an eval compares them at equal compute)
    spares_generated: ClassVar[bool] = False

    target: str = field(default="auto", kw_only=True)  # "vision" / "language": where in an LVLM it goes

    def __post_init__(self):
        if self.target not in TARGETS:
            raise TokenPruneError(f"{self.name}: target must be one of {TARGETS}, got {self.target!r}")

    def resolved_target(self) -> str:
        """``"vision"`` (an LVLM's vision tower) or ``"language"`` (its decoder)."""
        return self.default_target if self.target == "auto" else self.target

    def layers(self) -> list[int]:
        raise NotImplementedError

    def layers_on(self, num_layers: int) -> list[int]:
        """The layers ``select`` runs before on a model of ``num_layers`` layers (default: ``layers()``)."""
        return self.layers()

    def select(self, state: TokenState) -> Reduction | None:
        raise NotImplementedError

    def check(self, model: ModelFacts) -> None:
        """Check the config against the model before anything is hooked (raises TokenPruneError).

        Every adapter calls this at ``tp.prune``. The default checks the layer count through
        ``validate``; a method that depends on more (a router trained for one hidden size)
        extends it: ``super().check(model)``, then its own checks.
        """
        self.validate(model.num_layers)

    def validate(self, num_layers: int) -> None:
        """Check the config against a model with ``num_layers`` layers (raises TokenPruneError)."""
        for layer in self.layers_on(num_layers):
            if not 0 <= layer < num_layers:
                raise TokenPruneError(
                    f"{self.name}: layer {layer} is beyond the model, which has {num_layers} layers (0..{num_layers - 1})"
                )

    def to_dict(self) -> dict:
        """``name`` plus the config, JSON-safe (tuples become lists)."""
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return {"name": self.name, **config}


def check_ratio(owner: str, field: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise TokenPruneError(f"{owner}: {field} must be a number in [0, 1], got {value!r}")


@dataclass
class SegmentDropPruner(Pruner):
    """Shared config of methods that keep a share of one segment's tokens before some layers.

    ``layer``: the first layer that runs on the reduced set (layers before it see all tokens),
    or a list of layers for a progressive schedule (the reduction repeats before each).
    ``keep_ratio``: share of the candidate tokens kept at each of those layers. Candidates
    are the ``segment`` tokens except the first ``protect_first`` and last ``protect_last``
    prompt tokens of each row.
    """

    layer: int | tuple[int, ...] = 2
    keep_ratio: float = 0.5
    segment: str = "text"
    protect_first: int = 1
    protect_last: int = 4

    def __post_init__(self):
        super().__post_init__()
        layers = list(self.layer) if isinstance(self.layer, (list, tuple)) else [self.layer]
        low = self.first_layer()
        if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < low for x in layers):
            raise TokenPruneError(f"{self.name}: layer must be an integer >= {low} or a list of them, got {self.layer!r}")
        if len(set(layers)) != len(layers):
            raise TokenPruneError(f"{self.name}: layer list {layers} repeats a layer")
        self.layer = layers[0] if isinstance(self.layer, int) else tuple(sorted(layers))
        check_ratio(self.name, "keep_ratio", self.keep_ratio)
        Segment.parse(self.segment)
        for f in ("protect_first", "protect_last"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 0:
                raise TokenPruneError(f"{self.name}: {f} must be a non-negative integer")

    def first_layer(self) -> int:
        """Lowest ``layer``: 1 for methods that read the previous layer (before layer 0 there is
        none), 0 for those that do not; a method that reduces inside a block (after its
        attention) may start at 0 too."""
        return 1 if self.reads_previous_layer else 0

    def layers(self) -> list[int]:
        return [self.layer] if isinstance(self.layer, int) else list(self.layer)

    def candidates(self, state: TokenState):
        return state.candidates(self.segment, self.protect_first, self.protect_last)
