"""The pure math of transport maps: per-unit maps, piecewise-linear maps, support bounds, diagnostics."""

from .diagnostics import mean_progress, wasserstein1
from .maps import ModuleMap, apply_units, piecewise_linear, spatial_mean_shift
from .support import parse_support, support_bounds

__all__ = ["ModuleMap", "apply_units", "parse_support", "piecewise_linear", "spatial_mean_shift", "support_bounds", "mean_progress", "wasserstein1"]
