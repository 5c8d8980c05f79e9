"""Exceptions raised by acttransport. Every message says what to do next."""

__all__ = ["ActTransportError", "AssetError", "ConfigError", "DataError", "DistributedError", "MapFormatError", "ModuleMatchError"]


class ActTransportError(Exception):
    """Base class for every error acttransport raises on bad input."""


class ConfigError(ActTransportError, ValueError):
    """An option (method, support, pooling, strength, ...) is invalid."""


class ModuleMatchError(ActTransportError, ValueError):
    """A module pattern matched nothing, or a module's output cannot be hooked."""


class DataError(ActTransportError, ValueError):
    """Prompt sets or activations are unusable (empty, NaN/inf, too small)."""


class MapFormatError(ActTransportError, ValueError):
    """A saved transport map is missing, corrupt, or does not fit the model."""


class AssetError(ActTransportError, ImportError):
    """An embedded model or data set needs a package that is not installed."""


class DistributedError(ActTransportError, RuntimeError):
    """Another rank of a distributed estimation failed (its error text is in the message)."""
