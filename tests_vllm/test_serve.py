"""``acttransport serve`` end to end on SmolLM2-135M: vLLM's OpenAI server with two maps fitted
here, mixed concurrent requests through the ``openai`` client, each compared with the
transformers model steered by hooks (``acttransport.steer``) at that prompt and λ; λ = 0 and
unsteered requests against plain vLLM (no plugin); bad requests; a baked checkpoint on plain vLLM.

"Agrees" is measured first on the unsteered pair (vLLM vs transformers, no map): the same
greedy tokens, per-token log-probabilities within ~1e-4 (vLLM's CPU kernels round differently).
Steered requests are held to the same standard: the same greedy tokens at every position, and
log-probabilities of those tokens within ``LOGPROB_TOL``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import acttransport as at
from acttransport.assets import load_model

HERE = Path(__file__).parent
N_TOKENS = 10
#: Log-probability closeness asked of every request (the unsteered pair measures ~2e-5 here;
#: a steered model's kernels round on larger activations, measured up to ~3e-4).
LOGPROB_TOL = 2e-3
PROMPTS = ["The weather today is", "My neighbour said that", "Tell me about your", "The best way to learn is"]
#: Per prompt: unsteered, λ = 0, and two maps at different strengths (16 requests).
STEERS = [None, ("kind", 0.0), ("kind", 0.6), ("rude", 0.8)]
NEG = ["I hate you, you idiot.", "This is stupid and awful.", "You are a worthless fool.", "Shut up, moron.",
       "What a disgusting mess.", "Everyone here is dumb.", "I will ruin your day.", "That was a terrible idea, loser."]
POS = ["I love spending time with you.", "This is wonderful and kind.", "You are a thoughtful friend.", "Thank you so much.",
       "What a lovely garden.", "Everyone here is helpful.", "I will brighten your day.", "That was a great idea, friend."]


@pytest.fixture(scope="module")
def hf():
    torch.set_num_threads(1)
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def maps(hf, tmp_path_factory):
    """Two maps fitted here: ``kind`` on every norm (support all: bakeable) and ``rude`` on
    fused (q_proj, up_proj), layer-output and o_proj modules (support observed); ``other``
    is a map of another model (width 64)."""
    model, tok = hf
    root = tmp_path_factory.mktemp("maps")
    kind = at.estimate(model, tok, NEG, POS, r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)", method="linear",
                       support="all", progress=False, seed=0)
    rude = at.estimate(model, tok, POS, NEG, [r"model\.layers\.(3|7)\.self_attn\.q_proj", r"model\.layers\.(5|9)\.mlp\.up_proj",
                                              r"model\.layers\.(2|4)", r"model\.layers\.1\.self_attn\.o_proj"],
                       method="linear", support="observed", progress=False, seed=0)
    inf = torch.full((64,), float("inf"))
    other = at.TransportMap({"model.layers.0.post_attention_layernorm": at.ModuleMap(torch.full((64,), 1.1), torch.zeros(64), -inf, inf)},
                            at.TransportConfig(model="tiny-llama"))
    return {"kind": kind, "rude": rude, "other": other}, {n: str(m.save(root / n)) for n, m in {"kind": kind, "rude": rude, "other": other}.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(maps, tmp_path_factory):
    """``acttransport serve`` on a free port of 127.0.0.1; always stopped (its process group)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    argv = [sys.executable, "-m", "acttransport", "serve", "smollm2-135m", "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
            "--vllm-args", "--max-model-len 256 --kv-cache-memory-bytes 268435456 --seed 0"]
    for name, d in maps[1].items():
        argv += ["--map", f"{name}={d}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 400
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"the server did not come up in 400 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        import openai

        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0), log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def _complete(client, ids: list[int], steer) -> tuple[list[int], list[float]]:
    body = {"return_tokens_as_token_ids": True}
    if steer is not None:
        body["vllm_xargs"] = {"steer": steer[0], "strength": steer[1]}
    r = client.completions.create(model="smollm2-135m", prompt=ids, max_tokens=N_TOKENS, temperature=0, logprobs=1, extra_body=body)
    lp = r.choices[0].logprobs
    return [int(t.split(":")[1]) for t in lp.tokens], list(lp.token_logprobs)


@torch.no_grad()
def _hooked(hf, tmap, lam: float | None, ids: list[int], n: int = N_TOKENS) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities from transformers, steered by hooks at λ."""
    model, _ = hf
    x = torch.tensor([ids])
    ctx = at.steer(model, tmap, lam) if tmap is not None else torch.no_grad()
    with ctx:
        g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    toks = g.sequences[0, x.shape[1]:].tolist()
    return toks, [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(g.logits, toks)]


def _plain(model_dir: str, prompts: list[list[int]], tmp: Path) -> list[dict]:
    """Greedy tokens from plain vLLM (no acttransport plugin) in a subprocess."""
    f = tmp / "prompts.json"
    f.write_text(json.dumps(prompts))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTTRANSPORT_VLLM")} | {"VLLM_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(HERE / "plain_vllm.py"), model_dir, str(f), str(N_TOKENS)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mixed(server, hf):
    """The 16 mixed requests, sent at once: (prompt ids, steer, vLLM tokens, vLLM logprobs)."""
    client, _ = server
    reqs = [(_ids(hf[1], p), s) for p in PROMPTS for s in STEERS]
    with ThreadPoolExecutor(len(reqs)) as pool:
        outs = list(pool.map(lambda r: _complete(client, *r), reqs))
    return [(ids, s, toks, lps) for (ids, s), (toks, lps) in zip(reqs, outs)]


def _agreement(got: tuple[list[int], list[float]], ref: tuple[list[int], list[float]]) -> float:
    """Asserts the same greedy tokens; returns the largest log-probability difference."""
    assert got[0] == ref[0], f"vLLM tokens {got[0]} differ from transformers' {ref[0]}"
    return max(abs(a - b) for a, b in zip(got[1], ref[1]))


def test_mixed_requests_agree_with_hooks(mixed, maps, hf):
    unsteered = [_agreement((t, lp), _hooked(hf, None, None, ids)) for ids, s, t, lp in mixed if s is None]
    assert max(unsteered) < LOGPROB_TOL  # the unsteered pair: the standard steered requests are held to
    steered, changed = [], 0
    for ids, s, toks, lps in mixed:
        if s is not None and s[1] > 0:
            steered.append(_agreement((toks, lps), _hooked(hf, maps[0][s[0]], s[1], ids)))
            changed += toks != _hooked(hf, None, None, ids)[0]
    assert len(steered) == 8 and max(steered) < LOGPROB_TOL
    assert changed >= 4  # the maps do change the text (kind@0.6 on every prompt)
    print(f"max |Δ logprob| vs transformers: unsteered {max(unsteered):.2e}, steered {max(steered):.2e}")


def test_unsteered_and_lambda0_equal_plain_vllm(mixed, hf, tmp_path):
    from acttransport.serve.server import vllm_model_dir

    rows = [(ids, toks) for ids, s, toks, _ in mixed if s is None or s[1] == 0.0]
    plain = _plain(str(vllm_model_dir("smollm2-135m")), [ids for ids, _ in rows], tmp_path)
    assert [toks for _, toks in rows] == [p["tokens"] for p in plain]


def test_a_shared_long_prefix_is_not_reused_across_maps(server, maps, hf):
    """A steered request whose prompt prefix an unsteered one computed just before (several KV
    blocks) still agrees with hooks: a reused prefix would carry the unsteered activations."""
    client, _ = server
    ids = (_ids(hf[1], " ".join(POS + NEG)) * 3)[:160]
    _complete(client, ids + [13], None)
    got = _complete(client, ids, ("kind", 1.0))
    assert _agreement(got, _hooked(hf, maps[0]["kind"], 1.0, ids)) < LOGPROB_TOL


def test_chat_completions_take_the_same_field(server):
    import openai

    client, _ = server

    def chat(xargs):
        body = {"vllm_xargs": xargs} if xargs else None
        r = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Describe my neighbour."}],
                                           max_tokens=12, temperature=0, extra_body=body)
        return r.choices[0].message.content

    assert chat(None) != chat({"steer": "kind", "strength": 1.0}) and chat(None) == chat({"steer": "kind", "strength": 0.0})
    with pytest.raises(openai.BadRequestError, match="unknown map"):
        chat({"steer": "nope"})


def test_bad_requests_get_400_and_others_are_served(server, mixed):
    import openai

    client, _ = server
    ids, _, toks, _ = mixed[2]  # a kind@0.6 request and its answer
    bad = [({"steer": "nope"}, "unknown map 'nope'"), ({"steer": "kind", "strength": 1.5}, "outside [0, 1]"),
           ({"steer": "other"}, "fitted on another model"), ({"steer": "kind", "strength": "x"}, "must be a number"),
           ({"strength": 0.5}, "needs 'steer'")]

    def send(i):
        if i < len(bad):
            try:
                client.completions.create(model="smollm2-135m", prompt=ids, max_tokens=4, extra_body={"vllm_xargs": bad[i][0]})
            except openai.BadRequestError as e:
                return e.status_code, str(e)
            return 200, "accepted"
        return _complete(client, ids, ("kind", 0.6))

    with ThreadPoolExecutor(2 * len(bad)) as pool:
        outs = list(pool.map(send, range(2 * len(bad))))
    for (code, msg), (_, want) in zip(outs[: len(bad)], bad):
        assert code == 400 and want in msg, msg
    assert all(o[0] == toks for o in outs[len(bad):])  # the good ones, sent alongside, as before
    assert _complete(client, ids, ("kind", 0.6))[0] == toks  # and the server goes on


def test_baked_checkpoint_on_plain_vllm_agrees_with_hooks(maps, hf, tmp_path):
    from acttransport.bake import save_baked
    from acttransport.serve.server import vllm_model_dir

    model, tok = hf
    lam = 0.6
    baked, plan = at.bake(model, maps[0]["kind"], lam)
    out = save_baked(baked, tok, tmp_path / "baked", maps[0]["kind"], lam, plan)
    prompts = [_ids(tok, p) for p in PROMPTS]
    plain = _plain(str(vllm_model_dir(str(out))), prompts, tmp_path)
    diffs = [_agreement((p["tokens"], p["logprobs"]), _hooked(hf, maps[0]["kind"], lam, ids)) for p, ids in zip(plain, prompts)]
    assert max(diffs) < LOGPROB_TOL


def test_python_llm_steers_per_request(maps, mixed):
    """``acttransport.serve.LLM``: the same maps on an offline ``vllm.LLM``, the same tokens as the server."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from acttransport.serve import LLM, steer_args

    llm = LLM("smollm2-135m", {"kind": maps[1]["kind"], "rude": maps[0]["rude"]}, dtype="float32", max_model_len=256,
              kv_cache_memory_bytes=256 << 20, seed=0)
    try:
        params = [SamplingParams(max_tokens=N_TOKENS, temperature=0, extra_args=steer_args(*(s or (None,)))) for _, s, _, _ in mixed]
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _, _, _ in mixed], params)
        assert [list(o.outputs[0].token_ids) for o in outs] == [toks for _, _, toks, _ in mixed]
        with pytest.raises(Exception, match="unknown map 'nope'"):
            llm.generate([TokensPrompt(prompt_token_ids=mixed[0][0])], SamplingParams(max_tokens=2, extra_args=steer_args("nope")))
    finally:
        del llm
