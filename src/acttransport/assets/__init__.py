"""Embedded offline assets: models (aliases, GGUF conversion, cache), text-to-image pipelines and data sets, apart; the model kinds
(:mod:`.kinds`) that turn a name into a runner."""

from .datasets import DATASETS, PairData, load_clean_text, load_insults, load_pair_dataset, load_rtp_prompts, load_truthful_pairs
from .files import asset_dir, asset_file, cache_dir
from .kinds import DEFAULT_KIND, MODEL_KINDS, ModelKind, kind_of, load_runner, register_model_kind
from .models import EMBEDDED_MODELS, EmbeddedModel, check_installed, gguf_path, load_model
from .pipelines import PIPELINE_ALIASES, is_pipeline_name, load_pipeline
from .wikipedia import load_wikipedia

__all__ = [
    "DEFAULT_KIND", "MODEL_KINDS", "ModelKind", "kind_of", "load_runner", "register_model_kind",
    "DATASETS", "EMBEDDED_MODELS", "EmbeddedModel", "PairData", "asset_dir", "asset_file", "cache_dir", "check_installed",
    "PIPELINE_ALIASES", "gguf_path", "is_pipeline_name", "load_clean_text", "load_insults", "load_model", "load_pair_dataset", "load_rtp_prompts", "load_pipeline", "load_truthful_pairs",
    "load_wikipedia",
]
