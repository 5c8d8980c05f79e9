"""The Wikipedia sentences PPL-Wiki is measured on: the wikitext cleaning and the held-out split."""

from __future__ import annotations

import json
import re

import pytest

from acttransport.assets import wikipedia as wiki
from acttransport.errors import AssetError, ConfigError

ARTICLE = """{{Infobox country|name=Testland|capital=[[Test City]]}}
'''Testland''' is a small country in [[Europe|western Europe]] with a long coastline.<ref>{{cite web|url=http://x.org|title=X}}</ref> Its capital is [[Test City]], which lies on the river Test.
[[File:Flag of Testland.svg|thumb|200px|The flag of [[Testland]]]]
<!-- a hidden editor's note that must not appear anywhere -->
== History ==
The first settlers arrived in the region about three thousand years ago from the east.{{citation needed|date=May 2020}} Dr. Smith wrote the first history of the country in 1901.
* A list item that is long enough to be a sentence but is not prose at all.
{| class="wikitable"
|-
| A table cell with enough words in it to pass the length filter easily. || Another cell.
|}
The coastline is about {{convert|300|km|mi}} long.
Short one.
[[Category:Countries in Europe]]
"""


def test_clean_article_keeps_prose_and_drops_markup():
    got = wiki.clean_article(ARTICLE)
    assert got == [
        "Testland is a small country in western Europe with a long coastline.",
        "Its capital is Test City, which lies on the river Test.",
        "The first settlers arrived in the region about three thousand years ago from the east.",
        "Dr. Smith wrote the first history of the country in 1901.",
    ]


def test_clean_article_word_bounds():
    assert wiki.clean_article("One two three four five six seven eight nine.", min_words=10) == []
    assert wiki.clean_article("One two three four five six seven eight nine.", min_words=9) == ["One two three four five six seven eight nine."]


@pytest.fixture(scope="module")
def parsed():
    return {s: wiki.load_wikipedia(split=s) for s in wiki.WIKI_SPLITS}


def test_sentences_are_clean(parsed):
    markup = re.compile(r"[\[\]{}|<>=]|&[a-z]+;|https?://|'''|\s[.,;:]")
    for split, sentences in parsed.items():
        assert len(sentences) > 1000, split
        for s in sentences:
            assert not markup.search(s), s
            assert s[0].isupper() or s[0].isdigit(), s
            assert s[-1] in ".!?" and 8 <= len(s.split()) <= 60, s


def test_split_is_by_article_and_stable(parsed):
    assert not set(parsed["eval"]) & set(parsed["rest"])
    assert 0.1 < len(parsed["eval"]) / (len(parsed["eval"]) + len(parsed["rest"])) < 0.35  # one article in five
    # the split is a hash of the title (the same on every machine and run), and the cached
    # sentences are what cleaning the article anew gives
    assert wiki.article_split("Anarchism") == wiki.article_split("Anarchism") and {wiki.article_split(f"t{i}") for i in range(20)} == {"eval", "rest"}
    articles = wiki.read_articles()
    assert len(articles) > 100 and articles[0][0] == "Anarchism"
    for title, text in articles[:6]:
        own = wiki.clean_article(text)
        assert own and set(own) <= set(parsed[wiki.article_split(title)]), title
    assert wiki.load_wikipedia(50, seed=3) == wiki.load_wikipedia(50, seed=3) != wiki.load_wikipedia(50, seed=4)
    assert set(wiki.load_wikipedia(50, seed=3)) <= set(parsed["eval"])


def test_unreadable_cache_is_rebuilt(parsed, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTTRANSPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(wiki, "read_articles", lambda: [("Anarchism", ARTICLE)])  # quick: one article
    cache = wiki.cache_file()
    assert cache.is_relative_to(tmp_path)
    cache.parent.mkdir(parents=True)
    cache.write_text("{half a fil")
    monkeypatch.setattr(wiki, "article_split", lambda title: "eval")
    with pytest.raises(AssetError, match="no sentences"):  # 'rest' would be empty: refused, not cached
        wiki.load_wikipedia(split="eval")
    assert cache.read_text() == "{half a fil"
    monkeypatch.setattr(wiki, "read_articles", lambda: [("A", ARTICLE), ("B", ARTICLE)])
    monkeypatch.setattr(wiki, "article_split", lambda title: "eval" if title == "A" else "rest")
    assert wiki.load_wikipedia(split="eval") == wiki.clean_article(ARTICLE)
    assert json.loads(cache.read_text())["rest"] == wiki.clean_article(ARTICLE)
    monkeypatch.setattr(wiki, "read_articles", lambda: pytest.fail("parsed again although cached"))
    assert wiki.load_wikipedia(split="rest") == wiki.clean_article(ARTICLE)


@pytest.mark.parametrize("kw", [dict(split="train"), dict(n=0), dict(n=10**6), dict(n=2.5), dict(n=True)])
def test_bad_arguments(kw):
    with pytest.raises(ConfigError):
        wiki.load_wikipedia(**kw)
