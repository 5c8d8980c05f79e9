"""The evaluation tasks of the AcT paper as resumable sweeps: truthfulness, toxicity, concept induction."""

from .concept import concept_sweep
from .toxicity import toxicity_sweep
from .truthfulness import split_pairs, truthfulness_sweep

__all__ = ["concept_sweep", "split_pairs", "toxicity_sweep", "truthfulness_sweep"]
