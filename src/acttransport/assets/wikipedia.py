"""Wikipedia sentences for PPL-Wiki, the paper's fluency measure, from a file gensim ships.

The ``gensim==4.4.0`` wheel carries a shortened English Wikipedia dump (206 pages, 106 real
articles: Anarchism, Autism, Alabama, Aristotle, Abraham Lincoln, ...; text CC BY-SA). Its
wikitext is parsed with ``mwparserfromhell``: templates, tables, references, comments, files,
categories and headings are removed and links keep their visible text; what is left is split
into paragraphs and sentences, and only well-formed prose sentences are kept (see
:func:`clean_article`). The held-out split is chosen per article by a hash of its title, so it
is the same in every run and on every machine. The parsed sentences are cached as JSON under
``cache_dir()/wikipedia`` (a few seconds to parse, once).
"""

from __future__ import annotations

import bz2
import hashlib
import json
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .._io import write_text_atomic
from ..errors import AssetError, ConfigError
from .files import asset_file, cache_dir

__all__ = ["WIKI_SPLITS", "article_split", "cache_file", "clean_article", "load_wikipedia", "read_articles"]

_GENSIM = ("gensim", "gensim==4.4.0")
_DUMP = ("test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
#: Bump when the cleaning changes: it names the cache file.
_VERSION = 4
#: ``eval``: the held-out articles (one in five by title hash) PPL-Wiki is measured on;
#: ``rest``: the others, free for fitting or calibrating anything.
WIKI_SPLITS = ("eval", "rest")

_DROP_LINKS = re.compile(r"^\s*:?\s*(file|image|category|media|wikipedia|wp|help|template|portal|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
_LIST_MARKS = {"*", "#", ":", ";"}
_DROP_TAGS = {"ref", "table", "gallery", "math", "code", "pre", "timeline", "imagemap", "score", "syntaxhighlight", "source", "chem", "hiero"}
# A sentence ends at . ! or ? (optionally closed by a quote or bracket) followed by white space
# and an upper-case letter, digit or opening quote; common abbreviations are not ends.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(])")
_ABBREVIATIONS = re.compile(r"\b(?:[A-Z]|Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Gen|Col|Lt|Sgt|Rev|Gov|Sen|Rep|No|Vol|vs|etc|e\.g|i\.e|c|ca|approx|U\.S|Inc|Ltd|Co|Mt|Ft)\.$")
# Markup left over, editorial brackets, and two sentences run together by a removed reference.
_LEFTOVER = re.compile(r"[\[\]{}|<>=]|&[a-z]+;|https?://|\bthumb\b|\bpx\b|__|[a-z]\.[A-Z][a-z]")
# A removed template (a unit conversion, a date, a citation, a title) leaves "about .", "( , )"
# or empty quotes behind.
_HOLE = re.compile(r"\s[.,;:!?)]|\(\s*[,;)]|,\s*,|''|\"\"")
_WORD = re.compile(r"[A-Za-z]+")


def clean_article(wikitext: str, min_words: int = 8, max_words: int = 60) -> list[str]:
    """Prose sentences of one article's wikitext.

    Args:
        wikitext: The raw ``<text>`` of a page.
        min_words, max_words: Sentences outside this word count are dropped.

    Returns:
        Sentences in article order: no templates, tables, references, comments, file or
        category links, headings or list items; links replaced by their visible text; each
        sentence starts with an upper-case letter or digit, ends with ``.``, ``!`` or ``?``,
        is mostly words, and holds no markup character left over (``{{``, ``[[``, ``|``,
        ``<``, ``==``, entities, URLs) and no hole a removed template left (``about .``).
    """
    import mwparserfromhell
    from mwparserfromhell.nodes import Comment, Heading, Tag, Template, Text, Wikilink

    def keep(node) -> bool:
        if isinstance(node, (Template, Comment, Heading)):
            return False
        if isinstance(node, Tag):
            return str(node.tag).strip().lower() not in _DROP_TAGS and str(node.wiki_markup or "") != "{|"
        return not (isinstance(node, Wikilink) and _DROP_LINKS.match(str(node.title)))

    code = mwparserfromhell.parse(wikitext)
    kept, in_list = [], False  # top-level nodes only: nested ones go with their parent
    for node in code.nodes:
        if isinstance(node, Tag) and str(node.wiki_markup or "") in _LIST_MARKS:
            in_list = True  # a list item runs to the end of its line: strip_code would keep its text
        elif in_list:
            if isinstance(node, Text) and "\n" in node.value:
                kept.append(Text(node.value.split("\n", 1)[1]))
                in_list = False
        elif keep(node):
            kept.append(node)
    code.nodes = kept
    text = code.strip_code(normalize=True, collapse=True, keep_template_params=False)
    sentences: list[str] = []
    for paragraph in text.split("\n"):
        paragraph = " ".join(paragraph.split())
        if not paragraph or paragraph[0] in "*#:;!|{}=<" or len(paragraph.split()) < min_words:
            continue  # list items, table rows and short captions are not prose
        for sentence in _split_sentences(paragraph):
            if _is_prose(sentence, min_words, max_words):
                sentences.append(sentence)
    return sentences


def _split_sentences(paragraph: str) -> list[str]:
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(paragraph):
        head = paragraph[start:match.start() + 1].rstrip()
        if _ABBREVIATIONS.search(head.split()[-1] if head.split() else ""):
            continue
        pieces.append(paragraph[start:match.end()].strip())
        start = match.end()
    pieces.append(paragraph[start:].strip())
    return [p for p in pieces if p]


def _is_prose(sentence: str, min_words: int, max_words: int) -> bool:
    words = sentence.split()
    if not (min_words <= len(words) <= max_words):
        return False
    if not (sentence[0].isupper() or sentence[0].isdigit()) or sentence[-1] not in ".!?":
        return False
    if _LEFTOVER.search(sentence) or _HOLE.search(sentence) or sentence.count("(") != sentence.count(")"):
        return False
    return sum(bool(_WORD.fullmatch(w.strip(".,;:!?\"'()"))) for w in words) >= 0.7 * len(words)


def read_articles(path: str | Path | None = None) -> list[tuple[str, str]]:
    """``(title, wikitext)`` of every main-namespace page that is not a redirect, in file order.

    Args:
        path: A MediaWiki XML dump (``.xml.bz2``); default: the one inside ``gensim==4.4.0``.

    Raises:
        AssetError: ``gensim`` is not installed (the default dump).
    """
    path = asset_file(*_GENSIM, *_DUMP) if path is None else Path(path)
    out: list[tuple[str, str]] = []
    with bz2.open(path, "rb") as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns_tag = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
            text = elem.find(".//{*}revision/{*}text")
            if ns_tag.get("ns") is not None and ns_tag["ns"].text == "0" and "redirect" not in ns_tag and text is not None and text.text:
                out.append((ns_tag["title"].text or "", text.text))
            elem.clear()
    return out


def article_split(title: str) -> str:
    """The split (``"eval"`` or ``"rest"``) an article belongs to: one in five by a SHA-256 of its title."""
    return "eval" if int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 5 == 0 else "rest"


def cache_file() -> Path:
    """Where the parsed sentences are cached (named by the cleaning's version)."""
    return cache_dir() / "wikipedia" / f"sentences-v{_VERSION}.json"


def _parsed() -> dict[str, list[str]]:
    """``{split: sentences}`` of the whole dump, cached as JSON."""
    cache = cache_file()
    if cache.is_file():
        try:
            return json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            pass  # rebuilt below
    try:
        import mwparserfromhell  # noqa: F401
    except ImportError as err:
        raise AssetError("The Wikipedia loader needs mwparserfromhell: pip install 'acttransport[eval]' "
                         "(or pip install mwparserfromhell)") from err
    splits: dict[str, list[str]] = {s: [] for s in WIKI_SPLITS}
    for title, wikitext in read_articles():
        splits[article_split(title)].extend(clean_article(wikitext))
    if not all(splits.values()):
        raise AssetError(f"the Wikipedia dump gave no sentences for a split: reinstall it with pip install --no-deps --force-reinstall {_GENSIM[1]}")
    write_text_atomic(cache, json.dumps(splits, ensure_ascii=False))
    return splits


def load_wikipedia(n: int | None = None, split: str = "eval", seed: int = 0) -> list[str]:
    """Clean Wikipedia sentences (the text PPL-Wiki is measured on).

    Args:
        n: Number of sentences; all of the split if None, else a seeded random sample.
        split: ``"eval"`` (held-out articles, one in five by title hash) or ``"rest"``.
        seed: Sampling seed.

    Returns:
        Sentences, in article order if ``n`` is None.

    Raises:
        ConfigError: Unknown split, or ``n`` not in 1..(sentences available).
        AssetError: ``gensim`` (the wheel holding the dump) or ``mwparserfromhell`` is missing.
    """
    if split not in WIKI_SPLITS:
        raise ConfigError(f"split must be one of {', '.join(WIKI_SPLITS)}, got {split!r}")
    sentences = _parsed()[split]
    if n is None:
        return list(sentences)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0 or n > len(sentences):
        raise ConfigError(f"n must be an int in 1..{len(sentences)} (or None for all), got {n!r}")
    return random.Random(seed).sample(sentences, n)
