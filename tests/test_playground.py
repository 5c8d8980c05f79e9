"""The playground served on a free local port with a tiny random Llama and a tiny random toy
pipeline, driven through its HTTP API with gradio_client: fit from two lists, steer at λ = 0
(bit for bit the unsteered model, greedy) and λ = 1 (differs), the λ grid, per-session maps,
and bad input answered with the library's one-line message."""

from __future__ import annotations

import re
import socket

import pytest
import torch
from conftest import make_llama, make_tokenizer, sentences

from acttransport.errors import DataError
from acttransport.ui import Playground, fit_map, launch, stream_pair

PROMPT = "w5 w6 w7 w8"
DECODE = dict(seed=0, max_new=12, greedy=True, temperature=1.0, top_p=0.3, penalty=1.2)


class StubJudge:
    """Scores a text by its share of words from the source range (w2..w99)."""

    def score(self, texts):
        return [sum(int(w[1:]) < 100 for w in t.split()) / max(1, len(t.split())) for t in texts]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """``(url, playground)``: the page served in this process; closed also when a test fails."""
    from acttransport.toy import tiny_random_pipeline

    pg = Playground(model=make_llama(), tokenizer=make_tokenizer(), model_id="tiny-llama", pipe=tiny_random_pipeline(0), pipe_id="tiny-toy",
                    text_judge=StubJudge(), steps=2)
    # a map the page opens with (as `--map DIR`): every session starts with it
    pg.maps.append(("text", "preloaded", fit_map(pg, "text", sentences(8, 2, 100, 5), sentences(8, 150, 300, 6), progress=False)))
    port = free_port()
    demo = launch(pg, port=port, block=False, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", pg
    finally:
        demo.close()


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def fit(c, name, kind="text", source=None, target=None, support="(method default)", pattern="", gate="(none)"):
    source = source if source is not None else sentences(12, 2, 100, seed=1)
    target = target if target is not None else sentences(12, 150, 300, seed=2)
    return c.predict(kind, "\n".join(source), None, "\n".join(target), None, "linear", pattern, support, 1.0, 64, name, gate, api_name="/fit")


def generate(c, name, lam, prompt=PROMPT, **kw):
    d = {**DECODE, **kw}
    return c.predict(prompt, name, lam, "(none)", 1.0, d["seed"], d["max_new"], d["greedy"], d["temperature"], d["top_p"], d["penalty"],
                     api_name="/generate")


def reference(pg, prompt=PROMPT, max_new=12):
    """The unsteered model's greedy continuation, computed here without the page."""
    tok = pg.tokenizer
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = pg.model.generate(**ids, max_new_tokens=max_new, do_sample=False, repetition_penalty=1.2, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_fit_then_steer_lambda_zero_is_the_unsteered_model_and_one_differs(server):
    url, pg = server
    c = client(url)
    status, plot, name, *drops = fit(c, "tox")  # the session state is not an output of the API
    assert "fitted **tox**" in status and "linear on 6 modules from 9 pairs" in status  # a quarter of 12 held out for the diagnostics
    assert "held-out" in status and plot is not None and plot["type"] == "matplotlib"
    assert drops[0]["value"] == "tox" and ["tox", "tox"] in drops[0]["choices"]
    plain0, steered0, score_plain, score_steered = generate(c, "tox", 0.0)
    want = reference(pg)
    assert plain0 == want and steered0 == want  # λ = 0: the unsteered model, token for token
    plain1, steered1, _, _ = generate(c, "tox", 1.0)
    assert plain1 == want and steered1 != want and len(steered1.split()) > 0
    assert score_plain.startswith("**p(toxic)**") and f"{StubJudge().score([want])[0]:.3f}" in score_plain
    # what the page does, a script does: the same map and seed give the same continuation
    tmap = fit_map(pg, "text", sentences(12, 2, 100, seed=1)[3:], sentences(12, 150, 300, seed=2)[3:], progress=False)
    *_, (p, s) = stream_pair(pg, tmap, PROMPT, 1.0, max_new_tokens=12, greedy=True)
    assert (p, s) == (plain1, steered1)


def test_continuations_stream_token_by_token_unsteered_first(server):
    url, _ = server
    c = client(url)
    fit(c, "tox")
    job = c.submit(PROMPT, "tox", 1.0, "(none)", 1.0, 0, 12, True, 1.0, 0.3, 1.2, api_name="/generate")
    plain, steered, _, _ = job.result()
    updates = [tuple(o[:2]) for o in job.outputs()]
    growing_plain = [p for p, s in updates if not s]
    growing_steered = [s for p, s in updates if s]
    assert len(set(growing_plain)) >= 6 and len(set(growing_steered)) >= 6  # many partial texts of each, not one final text
    assert all(plain.startswith(p) for p in growing_plain) and all(steered.startswith(s) for s in growing_steered)
    assert all(p == plain for p, s in updates if s)  # the steered side starts once the unsteered one is complete


def test_a_gated_map_shows_what_its_gate_read_per_continuation(server):
    url, _ = server
    c = client(url)
    status = fit(c, "gated", source=sentences(40, 2, 100, seed=7), target=sentences(40, 150, 300, seed=8), gate="probe")[0]
    assert "gate probe on " in status and "AUC" in status
    values = set()
    for prompt in sentences(8, 2, 100, seed=9) + sentences(4, 150, 300, seed=10):
        plain, steered, _, score = generate(c, "gated", 1.0, prompt=prompt)
        value = re.search(r"\*\*gate\*\* ([01]) \((open|closed) on the prompt, score (-?[0-9.]+)", score)
        assert value, score
        values.add(value.group(1))
        assert (value.group(2) == "open") == (value.group(1) == "1")
        if value.group(1) == "1":
            assert steered != plain  # an open gate steers
    assert values == {"0", "1"}  # the tiny model's gate is weak (AUC ~0.7), but it opens on some prompts and not on others


def test_two_maps_are_composed_each_at_its_own_lambda(server):
    url, _ = server
    c = client(url)
    fit(c, "a", support="all")
    fit(c, "b", support="all", source=sentences(12, 2, 60, seed=3), target=sentences(12, 200, 300, seed=4))
    args = (0, 12, True, 1.0, 0.3, 1.2)
    alone = c.predict(PROMPT, "a", 1.0, "(none)", 1.0, *args, api_name="/generate")
    with_b_off = c.predict(PROMPT, "a", 1.0, "b", 0.0, *args, api_name="/generate")
    both_off = c.predict(PROMPT, "a", 0.0, "b", 0.0, *args, api_name="/generate")
    both_on = c.predict(PROMPT, "a", 1.0, "b", 1.0, *args, api_name="/generate")
    assert with_b_off[1] == alone[1] != alone[0]  # b at λ = 0 composes as the identity
    assert both_off[1] == both_off[0]  # both at λ = 0: the unsteered model
    assert both_on[1] not in (alone[1], both_on[0])
    fit(c, "observed")  # support observed: a bounded map does not compose
    with pytest.raises(Exception, match="cannot be steered together.*support='all'.*select one map"):
        c.predict(PROMPT, "a", 1.0, "observed", 1.0, *args, api_name="/generate")


def test_concurrent_sessions_queue_and_do_not_steer_each_other(server):
    url, _ = server
    a, b = client(url), client(url)
    fit(a, "tox")
    alone_a, alone_b = generate(a, "tox", 1.0), generate(b, "(none)", 1.0)
    jobs = [a.submit(PROMPT, "tox", 1.0, "(none)", 1.0, 0, 12, True, 1.0, 0.3, 1.2, api_name="/generate"),
            b.submit(PROMPT, "(none)", 1.0, "(none)", 1.0, 0, 12, True, 1.0, 0.3, 1.2, api_name="/generate")]
    jobs += [b.submit(PROMPT, "(none)", 1.0, "(none)", 1.0, 0, 12, True, 1.0, 0.3, 1.2, api_name="/generate")]
    results = [j.result() for j in jobs]
    assert results[0][:2] == alone_a[:2] and results[1][:2] == results[2][:2] == alone_b[:2]
    assert alone_b[1] == "" and alone_b[0] == reference(server[1])  # b has no map: nothing of a's steering reached it


def test_lists_can_be_uploaded_as_files(server, tmp_path):
    from gradio_client import handle_file

    url, _ = server
    (tmp_path / "src.txt").write_text("\n".join(sentences(12, 2, 100, seed=1)) + "\n\n")
    (tmp_path / "tgt.jsonl").write_text("\n".join(f'{{"text": "{t}"}}' for t in sentences(12, 150, 300, seed=2)))
    c = client(url)
    status = c.predict("text", "", handle_file(str(tmp_path / "src.txt")), "", handle_file(str(tmp_path / "tgt.jsonl")), "linear", "",
                       "(method default)", 1.0, 64, "uploaded", "(none)", api_name="/fit")[0]
    assert "fitted **uploaded**" in status and "from 9 pairs" in status
    fit(c, "pasted")  # the same lines pasted: the same map, the same continuation
    assert generate(c, "uploaded", 1.0)[:2] == generate(c, "pasted", 1.0)[:2]
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(Exception, match="must be a JSON object with a 'text' field"):
        c.predict("text", "", handle_file(str(tmp_path / "bad.jsonl")), "a", None, "linear", "", "(method default)", 1.0, 64, "x", "(none)",
                  api_name="/fit")


def test_every_session_starts_with_the_maps_given_at_launch(server):
    url, _ = server
    plain, steered, _, _ = generate(client(url), "preloaded", 1.0)
    assert plain and steered and plain != steered


def test_sampling_is_seeded_and_the_map_changes_only_the_steered_side(server):
    url, _ = server
    c = client(url)
    fit(c, "tox")
    a = generate(c, "tox", 1.0, greedy=False, seed=3)
    b = generate(c, "tox", 1.0, greedy=False, seed=3)
    z = generate(c, "tox", 0.0, greedy=False, seed=3)
    assert a[:2] == b[:2] and a[0] == z[0] == z[1] and a[1] != a[0]


def test_image_tab_draws_pairs_with_the_toy_judge_and_the_lambda_grid(server, tmp_path):
    url, _ = server
    c = client(url)
    captions = ["a red circle", "a blue square", "a green triangle"]
    status = fit(c, "striped", "image", captions, [p + ", striped style" for p in captions], support="all")[0]
    assert "fitted **striped**" in status and "diagnostics: text maps only" in status
    plain, read_plain, steered, read_steered = c.predict("a red circle\na blue square", "striped", 1.0, 2, 0, api_name="/draw")
    assert len(plain) == len(steered) == 4
    styles = ("plain", "striped", "dotted", "outline")
    assert all(item["caption"].startswith(styles) for item in plain + steered)  # the toy judge's reading under each image
    assert read_plain.startswith("toy judge: ") and "shape as asked" in read_plain and "/4" in read_steered
    assert "saved striped" in c.predict("image", "striped", str(tmp_path / "striped"), api_name="/save_map")
    msg, *drops = client(url).predict(str(tmp_path / "striped"), api_name="/load_map")  # another session
    assert "loaded the image map **striped**" in msg and drops[2]["value"] == "striped"
    from PIL import Image

    grid = c.predict("a red circle", "striped", "0,0.5,1", 2, 0, api_name="/grid")
    with Image.open(grid) as im:  # 3 rows (λ) x 2 images of 16 px at scale 4, 2 px padding: as `acttransport images`
        assert im.height == 3 * (16 * 4 + 2) + 2
        rows = [im.crop((im.width - 64, 2 + r * 66, im.width, 2 + r * 66 + 64)).tobytes() for r in range(3)]
    assert rows[0] != rows[2]  # λ = 1 draws another image than λ = 0


def test_modules_dry_run_lists_matches_with_widths(server):
    url, _ = server
    rows = client(url).predict("text", r"model\.layers\.\d+\.input_layernorm", api_name="/modules")
    assert rows["data"] == [[f"model.layers.{i}.input_layernorm", 32] for i in range(3)]


def test_maps_belong_to_their_session_and_round_trip_through_a_folder(server, tmp_path):
    url, _ = server
    a, b = client(url), client(url)
    fit(a, "mine")
    with pytest.raises(Exception, match="no text map named 'mine' in this session"):
        generate(b, "mine", 1.0)
    assert "saved mine" in a.predict("text", "mine", str(tmp_path / "mine"), api_name="/save_map")
    msg, *drops = b.predict(str(tmp_path / "mine"), api_name="/load_map")
    assert "loaded the text map **mine**" in msg and drops[0]["value"] == "mine"
    assert generate(b, "mine", 1.0)[:2] == generate(a, "mine", 1.0)[:2]


def test_bad_input_answers_with_the_one_line_message(server, tmp_path):
    from gradio_client.exceptions import AppError

    url, _ = server
    c = client(url)
    with pytest.raises(AppError, match="the source list is empty; paste one sentence"):
        fit(c, "x", source=[])
    with pytest.raises(AppError, match="transport_config.json not found"):
        c.predict(str(tmp_path), api_name="/load_map")
    other = make_llama(hidden=16)  # a map of another model: its widths differ
    fit_map(Playground(model=other, tokenizer=make_tokenizer(), model_id="other"), "text", sentences(6, 2, 100, 1),
            sentences(6, 150, 300, 2), progress=False).save(tmp_path / "other")
    with pytest.raises(AppError, match="does not fit the playground's models.*fitted on 'other'"):
        c.predict(str(tmp_path / "other"), api_name="/load_map")
    with pytest.raises(AppError, match="the prompt is empty"):
        generate(c, "(none)", 1.0, prompt="  ")
    with pytest.raises(AppError, match="new tokens must be between 1 and 512"):
        generate(c, "(none)", 1.0, max_new=100_000)
    with pytest.raises(AppError, match="at most 64 images in all"):
        c.predict("a red circle\na blue square", "(none)", 1.0, 40, 0, api_name="/draw")
    with pytest.raises(AppError, match="matches nothing|matched nothing|no module"):
        c.predict("text", "nothing\\.here", api_name="/modules")
    captions = ["a red circle", "a blue square"]
    fit(c, "st", "image", captions, [p + ", striped style" for p in captions], support="all")
    with pytest.raises(AppError, match="outside \\[0, 1\\]"):
        c.predict("a red circle", "st", "0,2", 1, 0, api_name="/grid")
    with pytest.raises(AppError) as err:
        c.predict("a red circle", "st", "0,abc", 1, 0, api_name="/grid")
    assert "comma-separated numbers" in str(err.value) and "Traceback" not in str(err.value)


def test_script_api_checks_its_input():
    pg = Playground(model=None)
    with pytest.raises(DataError, match="target list is empty"):
        fit_map(pg, "text", ["a"], [])
    with pytest.raises(Exception, match="no text model"):
        fit_map(pg, "text", ["a"], ["b"])
