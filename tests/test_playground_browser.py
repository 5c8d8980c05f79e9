"""The playground in a real headless browser: Debian's chromium (``make ui-env`` installs it;
Playwright's own browser download is not reachable here) driven by Playwright's Python API.
With the embedded defaults — SmolLM2-135M, the shipped toy text-to-image model and both judges —
it fits a map from two pasted lists (rude → polite) and a style map from the toy data in the Fit tab, generates in the Text tab, draws pairs
and the λ grid in the Image tab, and takes a screenshot of each tab.

The screenshots go to a temporary folder; ``ACTTRANSPORT_SCREENSHOTS=docs pytest
tests/test_playground_browser.py`` writes the README's ``docs/playground-{fit,text,image}.png``."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Two small lists pasted into the Fit tab (mild, so that the README's screenshot quotes no slurs).
RUDE = """Shut up, nobody asked for your stupid opinion.
You are an idiot and everyone knows it.
What a pathetic excuse for an answer.
Get lost, you clueless fool.
Only a moron would write something this dumb.
You are the most annoying person on this site.
Stop whining, you useless crybaby.
Your idea is garbage, just like you.
Are you really this stupid or just pretending?
Go away, loser, nobody wants you here.
You clearly have no brain at all.
That is the dumbest thing I have read all week.
Keep your ignorant mouth shut.
You are a joke and a waste of everyone's time.
Learn to read before you post, genius.
What an arrogant little jerk you are."""
POLITE = """Thank you for sharing your opinion with us.
You made a thoughtful point and I appreciate it.
That is a helpful answer, thanks for taking the time.
Welcome, it is great to have you here.
I see it differently, but I respect your view.
You are one of the kindest people on this site.
I understand your concern and I am happy to help.
Your idea is interesting, let us talk it through.
Could you explain that a bit more? I want to understand.
Please stay, we value your contributions.
You clearly put a lot of thought into this.
That is a fair question and worth discussing.
I appreciate you speaking up about this.
Thanks for your patience while we sort this out.
Good point, I had not thought of it that way.
You have been very generous with your time."""
PNG = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    """The playground on the embedded defaults, served on a free local port; stopped also on failure."""
    from acttransport.ui import Playground, launch

    pg = Playground.from_names("smollm2-135m", "toy-t2i")
    port = free_port()
    demo = launch(pg, port=port, block=False, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    out = Path(os.environ.get("ACTTRANSPORT_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def pick(page, elem_id: str, option: str) -> None:
    """Chooses ``option`` in the Gradio dropdown ``#elem_id``."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option).click()


def fit(page, name: str, dataset: str | None = None, lists: tuple[str, str] | None = None) -> None:
    """Fits a map in the Fit tab from a shipped data set or two pasted lists."""
    page.get_by_role("tab", name="Fit").click()
    page.locator("#fit-n input").fill("32")
    if dataset:
        pick(page, "fit-dataset", dataset)
        page.wait_for_function("document.querySelector('#fit-source textarea').value.split('\\n').length >= 32")
    else:
        page.locator("#fit-source textarea").fill(lists[0])
        page.locator("#fit-target textarea").fill(lists[1])
    page.locator("#fit-name input, #fit-name textarea").first.fill(name)
    page.locator("#fit").click()
    page.locator("#fit-status").get_by_text(f"fitted {name}").wait_for(timeout=600_000)


def screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 20_000  # a rendered page, not a blank one


def test_a_browser_fits_steers_text_and_draws_images(url, shots):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "Debian's chromium is not installed: run `make ui-env` (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(url)
            page.get_by_text("acttransport playground").first.wait_for()

            # Fit tab: the dry run of the default modules, then a toxicity map with its diagnostics plot
            page.get_by_role("tab", name="Fit").click()
            page.get_by_role("button", name="List modules").click()
            page.get_by_text("model.layers.0.input_layernorm").first.wait_for()  # the table shows its first rows
            fit(page, "rude-to-polite", lists=(RUDE, POLITE))
            page.locator("#fit-plot img, #fit-plot svg, #fit-plot canvas").first.wait_for()
            screenshot(page, shots / "playground-fit.png")

            # Text tab: the new map is selected; unsteered and steered continuations with p(toxic)
            page.get_by_role("tab", name="Text").click()
            page.locator("#prompt textarea").fill("I can't believe you would say something so")
            page.locator("#generate").click()
            page.locator("#score-steered").get_by_text("p(toxic)").wait_for(timeout=600_000)
            plain = page.locator("#out-plain textarea").input_value()
            steered = page.locator("#out-steered textarea").input_value()
            assert plain.strip() and steered.strip() and plain != steered
            screenshot(page, shots / "playground-text.png")

            # Image tab: a style map from the toy data, pairs read by the toy judge, the λ grid
            fit(page, "striped", dataset="toy: plain → striped style")
            page.get_by_role("tab", name="Image").click()
            page.locator("#draw").click()
            page.locator("#gal-steered img").nth(3).wait_for()
            assert page.locator("#gal-plain img").count() >= 4
            page.locator("#grid").click()
            page.locator("#grid-image img").first.wait_for()
            screenshot(page, shots / "playground-image.png")
        except Exception:
            page.screenshot(path=str(shots / "playground-failure.png"), full_page=True)  # what the page showed
            raise
        finally:
            browser.close()
