"""What to hook: the module-name grammar, per-architecture presets, activation layouts."""

from .layers import LAYER_RULES, layer_of, layer_subsets, pick_layers
from .layouts import POOLINGS, SPATIAL, apply_map, pool, unit_axis
from .names import (
    DENOISERS, add_hooks, declared_width, denoiser_name, get_module, match_modules, module_tree, pick_output, remove_hooks,
    replace_output, split_spec,
)
from .presets import DEFAULT_PRESETS, PRESETS, default_preset, model_type, resolve

__all__ = [
    "DEFAULT_PRESETS", "DENOISERS", "LAYER_RULES", "POOLINGS", "PRESETS", "SPATIAL", "add_hooks", "apply_map", "declared_width",
    "default_preset", "denoiser_name", "get_module", "layer_of", "layer_subsets", "match_modules", "model_type", "module_tree",
    "pick_layers", "pick_output", "pool", "remove_hooks", "replace_output", "resolve", "split_spec", "unit_axis",
]
