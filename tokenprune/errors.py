"""The library's own exception types, so callers can catch them apart from torch errors."""


class TokenPruneError(ValueError):
    """Invalid configuration or input for a pruner or adapter."""


class UnsupportedModelError(TokenPruneError):
    """No adapter knows how to prune this model."""


class AlreadyAttachedError(TokenPruneError):
    """A pruner is already attached to this model."""
