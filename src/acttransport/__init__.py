r"""acttransport: steer generative models by transporting their activations.

Quick start::

    import acttransport as at
    tmap = at.estimate(model, tok, toxic, clean, r"model\.layers\.\d+\.post_attention_layernorm")
    with at.steer(model, tmap, strength=1.0):
        model.generate(...)

``__all__`` below is the supported API; everything else lives in subpackages (``methods``,
``transport``, ``targets``, ``runners``, ``engine``, ``bake``, ``assets``, ``evaluate``) and may change.
"""

from ._version import __version__  # noqa: F401  (an attribute, not part of __all__)
from .artifact import TransportConfig, TransportMap, compose
from .bake import bake
from .engine import collect, estimate
from .errors import ActTransportError, ConfigError, DataError, MapFormatError, ModuleMatchError
from .methods import METHODS, register_method
from .options import FitOptions
from .steer import load, steer
from .targets import match_modules
from .transport import ModuleMap

__all__ = [
    "METHODS",
    "ActTransportError",
    "ConfigError",
    "DataError",
    "FitOptions",
    "MapFormatError",
    "ModuleMap",
    "ModuleMatchError",
    "TransportConfig",
    "TransportMap",
    "bake",
    "collect",
    "compose",
    "estimate",
    "load",
    "match_modules",
    "register_method",
    "steer",
]
