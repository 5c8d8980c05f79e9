r"""acttransport: steer generative models by transporting their activations.

Quick start::

    import acttransport as at
    tmap = at.estimate(model, tok, toxic, clean, r"model\.layers\.\d+\.post_attention_layernorm")
    with at.steer(model, tmap, strength=1.0):
        model.generate(...)
"""

__version__ = "0.1.0"

from .collect import collect, estimate
from .errors import ActTransportError
from .fit import METHODS
from .hooks import match_modules, steer
from .maps import ModuleMap, TransportConfig, TransportMap, compose, load

__all__ = [
    "ActTransportError",
    "METHODS",
    "ModuleMap",
    "TransportConfig",
    "TransportMap",
    "collect",
    "compose",
    "estimate",
    "load",
    "match_modules",
    "steer",
]
