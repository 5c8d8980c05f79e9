"""The judges, together: the MiniLM encoder, the toxicity judge and its metrics, the concept judge.

Judges use only embedded offline assets; transformers and scikit-learn are imported inside the
functions that need them.
"""

from .concept import Calibration, ConceptJudge, auc, balanced_accuracy, best_threshold
from .embed import EMBED_DIM, embed
from .toxicity import Judge, ToxicityJudge, scores_probabilities, toxic_share, toxicity_metrics

__all__ = [
    "EMBED_DIM", "Calibration", "ConceptJudge", "Judge", "ToxicityJudge", "auc", "balanced_accuracy", "best_threshold", "embed",
    "scores_probabilities", "toxic_share", "toxicity_metrics",
]
