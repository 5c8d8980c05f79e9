"""What to hook: the module-name grammar, per-architecture presets, activation layouts."""

from .layouts import POOLINGS, apply_map, pool, unit_axis
from .names import add_hooks, declared_width, get_module, match_modules, pick_output, remove_hooks, replace_output, split_spec
from .presets import DEFAULT_PRESETS, PRESETS, default_preset, model_type, resolve

__all__ = [
    "DEFAULT_PRESETS", "POOLINGS", "PRESETS", "add_hooks", "apply_map", "declared_width", "default_preset", "get_module",
    "match_modules", "model_type", "pick_output", "pool", "remove_hooks", "replace_output", "resolve", "split_spec", "unit_axis",
]
