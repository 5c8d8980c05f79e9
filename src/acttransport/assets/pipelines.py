"""Text-to-image pipelines: the shipped toy model by alias, anything else through diffusers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import json

import torch

from ..errors import ConfigError

__all__ = ["PIPELINE_ALIASES", "is_pipeline_name", "load_pipeline"]

#: Pipelines shipped with acttransport, by alias.
PIPELINE_ALIASES = ("toy-t2i",)


def is_pipeline_name(name: str) -> bool:
    """Whether ``name`` names a diffusion pipeline: the toy alias or a folder with ``model_index.json``."""
    return name.strip().lower() in PIPELINE_ALIASES or (Path(name) / "model_index.json").is_file()


def load_pipeline(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """Load a text-to-image pipeline.

    Args:
        name_or_path: ``toy-t2i`` (the toy model trained by this project and shipped with it), a
            folder written by ``acttransport train-toy``, or anything
            ``diffusers.DiffusionPipeline.from_pretrained`` accepts (hub id or folder).
        dtype: parameter dtype.
        device: device.

    Returns:
        The pipeline, with ``acttransport_model_id`` set to ``name_or_path``.

    Raises:
        ConfigError: diffusers is missing, or the pipeline cannot be loaded.
    """
    index = Path(name_or_path) / "model_index.json"
    toy_folder = index.is_file() and json.loads(index.read_text()).get("_class_name") == "ToyTextToImagePipeline"
    if name_or_path.strip().lower() == "toy-t2i" or toy_folder:
        from ..toy import load_toy_pipeline

        pipe = load_toy_pipeline(device=device, dtype=dtype, path=name_or_path if toy_folder else None)
    else:
        try:
            from diffusers import DiffusionPipeline
        except ImportError:
            raise ConfigError("loading a diffusion pipeline needs diffusers: pip install 'acttransport[diffusion]'") from None
        try:
            pipe = DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype).to(device)
        except (OSError, ValueError) as err:
            raise ConfigError(f"could not load the pipeline {name_or_path!r} ({err}); give a diffusers folder (with model_index.json), "
                              "a hub id whose files are in the local cache, or the alias toy-t2i") from err
    object.__setattr__(pipe, "acttransport_model_id", name_or_path)
    return pipe
