"""Concepts for the induction task and their sentences: the paper's seven concepts (or any
word a user names), keyword matching, and generated stand-ins for the paper's OneSec data.

The paper fits concept maps on OneSec sentences (WordNet senses), which cannot be had
offline. Here the shipped SmolLM2-135M-Instruct is asked, through its chat template, to write
one sentence about the concept (or about an everyday topic for the generic set); replies are
filtered (first complete sentence, keyword present / absent, deduplicated) and cached as JSON
under ``cache_dir()/concept_data``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from torch import nn

from .._io import write_text_atomic
from ..assets import cache_dir
from ..runners import model_id
from ..errors import ConfigError, DataError
from ..generation import Sampling, generate

__all__ = [
    "CONCEPTS", "CONCEPT_NAMES", "CONCEPT_PROMPTS", "DATA_SAMPLING", "GENERATOR", "GENERIC_PROMPT", "GENERIC_TOPICS", "Concept",
    "USER_DEFINITION", "concept_sentences", "first_sentence", "generic_sentences", "get_concept", "has_keyword", "keyword_re",
    "keyword_share",
]
from .grid import digest


@dataclass(frozen=True)
class Concept:
    """A concept: ``name`` (lower case), ``definition`` (what the judge compares against),
    ``keywords`` (forms counted by :func:`keyword_share`) and ``topic`` (how prompts say it)."""

    name: str
    definition: str
    keywords: tuple[str, ...]
    topic: str


# The paper's seven concepts; the definitions are our own wording.
CONCEPTS: dict[str, Concept] = {c.name: c for c in (
    Concept("football", "Football: a team sport in which players kick a ball to score goals.", ("football", "footballs"), "football"),
    Concept("cloud", "A cloud: a white or grey mass of tiny water droplets floating in the sky.", ("cloud", "clouds", "cloudy"), "clouds"),
    Concept("baby", "A baby: a newborn or very young child, an infant cared for by its parents.", ("baby", "babies"), "a baby"),
    Concept("church", "A church: a building where Christians gather to worship, pray and sing.", ("church", "churches"), "a church"),
    Concept("book", "A book: printed pages of writing bound together between covers, for reading.", ("book", "books"), "a book"),
    Concept("flower", "A flower: the colourful, often fragrant blossom of a plant, with petals.", ("flower", "flowers"), "flowers"),
    Concept("balloon", "A balloon: a thin rubber bag blown up with air or gas that floats.", ("balloon", "balloons"), "a balloon"),
)}
CONCEPT_NAMES: tuple[str, ...] = tuple(CONCEPTS)
USER_DEFINITION = "A sentence about {word}."  # definition of a user-named concept
_WORD = re.compile(r"[a-z][a-z0-9 \-]{0,39}")

# Phrasings asking the generator for one sentence about a concept ({topic}) or a generic topic.
CONCEPT_PROMPTS = (
    "Write one sentence about {topic}.",
    'Write one sentence that uses the word "{word}".',
    "Write one sentence about {topic} in everyday life.",
    "Write one sentence describing {topic}.",
    "Write one sentence about a memory involving {topic}.",
    "Write one sentence about {topic} for a children's story.",
)
GENERIC_PROMPT = "Write one sentence about {topic}."
GENERIC_TOPICS = (
    "cooking pasta", "a cup of coffee", "a train journey", "the ocean", "a cat", "a dog", "a mountain hike",
    "a bicycle", "a busy city street", "a kitchen", "a river", "grocery shopping", "a piano", "painting a wall",
    "a car", "the moon", "a computer", "a smartphone", "a bakery", "a winter coat", "a desert", "a fishing boat",
    "a bridge", "a farm tractor", "a pair of shoes", "a clock", "a lighthouse", "an apple", "a forest path",
    "a hotel room", "a bus stop", "a chess game", "a glass of water", "a snowman", "a camping tent", "a candle",
    "a museum", "a washing machine", "an elephant", "a bowl of soup",
)
GENERATOR = "smollm2-135m"  # SmolLM2-135M-Instruct, shipped
DATA_SAMPLING = Sampling(max_new_tokens=40, temperature=1.0, top_p=0.9, repetition_penalty=1.0)
_DATA_FORMAT = 1
_ROUND = 32  # replies sampled per round (fixed, so the data do not depend on a batch size)


def _plural(word: str) -> str:
    head, _, last = word.rpartition(" ")
    if re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def get_concept(name: str | Concept) -> Concept:
    """The :class:`Concept` for a name: one of :data:`CONCEPTS`, or any word a user names.

    A user-named word (letters, digits, spaces, hyphens; lower-cased) gets the definition
    :data:`USER_DEFINITION` (``"A sentence about {word}."``), keywords = the word and its simple
    English plural (``box`` → ``boxes``, ``city`` → ``cities``, else ``+s``; the last word of a
    phrase), and the word itself as prompt topic.

    Raises:
        ConfigError: empty name, or characters other than the ones above.
    """
    if isinstance(name, Concept):
        return name
    word = " ".join(str(name).split()).lower() if isinstance(name, str) else ""
    if word in CONCEPTS:
        return CONCEPTS[word]
    if not _WORD.fullmatch(word):
        raise ConfigError(
            f"concept name {name!r} is not usable: give a word or short phrase (letters, digits, spaces, hyphens; "
            f"at most 40 characters), e.g. one of {', '.join(CONCEPT_NAMES)}"
        )
    return Concept(word, USER_DEFINITION.format(word=word), (word, _plural(word)), word)


def keyword_re(keywords: Sequence[str]) -> re.Pattern[str]:
    """Matches any of ``keywords`` as whole words, in any case."""
    alts = "|".join(re.escape(k) for k in sorted(keywords, key=len, reverse=True))
    return re.compile(r"\b(?:" + alts + r")\b", re.IGNORECASE)


def has_keyword(concept: str | Concept, text: str) -> bool:
    """Whether ``text`` holds one of the concept's keywords (whole words, any case)."""
    return bool(keyword_re(get_concept(concept).keywords).search(text))


def keyword_share(concept: str | Concept, texts: Sequence[str]) -> float:
    """Share of ``texts`` holding one of the concept's keywords (NaN for no texts)."""
    rx = keyword_re(get_concept(concept).keywords)
    return float(np.mean([bool(rx.search(t)) for t in texts])) if len(texts) else float("nan")


# ---------------------------------------------------------------------------------------- data


def first_sentence(text: str) -> str | None:
    """The first complete sentence of a generated reply (4–60 words ending in ``.!?``), or None.

    Skips empty lines and lead-ins ending with ``:``, drops a ``... sentence ...:`` prefix and quotes.
    """
    for line in text.strip().splitlines():
        line = line.strip().strip("\"“”*'").strip()
        if not line or line.endswith(":"):
            continue
        head, colon, tail = line.partition(":")
        if colon and "sentence" in head.lower():
            line = tail.strip().strip("\"“”*'").strip()
        m = re.match(r"(.+?[.!?])(?=\s|$|[\"”'])", line)
        s = m.group(1).strip().strip("\"“”").strip() if m else ""
        return s if 4 <= len(s.split()) <= 60 else None
    return None


@functools.lru_cache(maxsize=1)
def _default_generator() -> tuple[nn.Module, Any]:
    from ..assets import load_model

    return load_model(GENERATOR)


def _sample_sentences(
    prompts: Sequence[str], keywords: Sequence[str], wanted: bool, n: int, seed: int, label: str,
    generator: tuple[nn.Module, Any] | None, progress: bool,
) -> list[str]:
    """Samples chat replies to ``prompts`` until ``n`` distinct first sentences that do
    (``wanted``) or do not contain one of ``keywords``; cached as JSON under
    ``cache_dir()/concept_data``, keyed by generator id, prompts, filter, n and seed."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not isinstance(seed, int):
        raise ConfigError(f"n must be a positive int and seed an int, got n={n!r}, seed={seed!r}")
    gen_id = model_id(generator[0]) if generator is not None else GENERATOR
    key = {"format": _DATA_FORMAT, "generator": gen_id, "prompts": list(prompts), "keywords": sorted(keywords), "wanted": wanted,
           "n": n, "seed": seed, "sampling": dataclasses.asdict(DATA_SAMPLING)}
    path = cache_dir() / "concept_data" / f"{label.replace(' ', '_')}_n{n}_s{seed}_{digest(key)}.json"
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec["key"] == key and len(rec["sentences"]) == n:
            return list(rec["sentences"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: generate
    model, tok = generator if generator is not None else _default_generator()
    rx = keyword_re(keywords)
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    order = list(range(len(chats)))
    random.Random(seed).shuffle(order)
    got: dict[str, str] = {}
    sampled, limit, rnd, t0 = 0, 8 * n + 64, 0, time.perf_counter()
    while len(got) < n and sampled < limit:
        size = min(_ROUND, max(8, 2 * (n - len(got))))
        batch = [chats[order[(sampled + i) % len(order)]] for i in range(size)]
        for reply in generate(model, tok, batch, DATA_SAMPLING, seed=seed * 1000 + rnd, batch_size=_ROUND, progress=False):
            s = first_sentence(reply)
            if s and bool(rx.search(s)) == wanted and s.lower() not in got and len(got) < n:
                got[s.lower()] = s
        sampled, rnd = sampled + size, rnd + 1
        if progress:
            print(f"acttransport: {label} sentences: {len(got)}/{n} from {sampled} samples ({time.perf_counter() - t0:.0f}s)")
    if len(got) < n:
        raise DataError(
            f"collected only {len(got)} of {n} usable {label} sentences from {sampled} samples of {gen_id}; "
            "ask for fewer sentences, try another seed, or inject your own sentences (data=/generic=)"
        )
    write_text_atomic(path, json.dumps({"key": key, "sentences": list(got.values())}, indent=1, ensure_ascii=False))
    return list(got.values())


def concept_sentences(
    concept: str | Concept, n: int, seed: int = 0, generator: tuple[nn.Module, Any] | None = None, progress: bool = False
) -> list[str]:
    """``n`` distinct generated sentences that contain one of ``concept``'s keywords.

    Stand-ins for the paper's OneSec data (not obtainable offline): first sentences of the
    replies of ``generator`` (``(model, tokenizer)`` of a chat model; default the shipped
    SmolLM2-135M-Instruct, loaded once) to :data:`CONCEPT_PROMPTS` through its chat template,
    sampled with :data:`DATA_SAMPLING` (temperature 1.0, top_p 0.9, 40 new tokens) in rounds
    of up to 32. Cached under ``cache_dir()/concept_data``: a repeated call is instant.

    Raises:
        DataError: fewer than ``n`` usable sentences after ``8n + 64`` samples.
    """
    c = get_concept(concept)
    prompts = [p.format(topic=c.topic, word=c.name) for p in CONCEPT_PROMPTS]
    return _sample_sentences(prompts, c.keywords, True, n, seed, f"concept {c.name}", generator, progress)


def generic_sentences(
    n: int, seed: int = 0, generator: tuple[nn.Module, Any] | None = None, exclude: Sequence[str] = (), progress: bool = False
) -> list[str]:
    """``n`` distinct generated sentences about :data:`GENERIC_TOPICS` (everyday things) that
    contain no keyword of the seven :data:`CONCEPTS` nor of the ``exclude`` concepts (topics
    naming one are dropped). Generated stand-ins and cached like :func:`concept_sentences`."""
    kws = sorted({k for c in [*CONCEPT_NAMES, *exclude] for k in get_concept(c).keywords})
    rx = keyword_re(kws)
    prompts = [GENERIC_PROMPT.format(topic=t) for t in GENERIC_TOPICS if not rx.search(t)]
    return _sample_sentences(prompts, kws, False, n, seed, "generic", generator, progress)
