"""Estimators, one function each, registered in :data:`METHODS` by :func:`register_method`.

Importing this package registers the built-in methods: the transport estimators of
:mod:`.ot` (linear, mean, gaussian, quantile) and the literature's baselines of
:mod:`.baselines` (actadd, caa, itic, aura, detzero), and :mod:`.lineas` (learned end to end). See docs/METHODS.md.
"""

from . import ot  # noqa: F401  (registers linear, mean, gaussian, quantile: first, in this order)
from . import baselines  # noqa: F401  (registers actadd, caa, itic, aura, detzero)
from . import lineas  # noqa: F401  (registers lineas: learned jointly, see acttransport.engine.lineas)
from .baselines import auroc, average_precision, fit_actadd, fit_aura, fit_caa, fit_detzero, fit_itic
from .common import STD_EPS, check_pair
from .ot import fit_gaussian, fit_linear, fit_mean, fit_quantile
from .registry import METHODS, Fitted, MethodInfo, method_info, register_method

__all__ = [
    "METHODS", "STD_EPS", "Fitted", "MethodInfo", "auroc", "average_precision", "check_pair", "fit_actadd", "fit_aura",
    "fit_caa", "fit_detzero", "fit_gaussian", "fit_itic", "fit_linear", "fit_mean", "fit_quantile", "method_info",
    "register_method",
]
