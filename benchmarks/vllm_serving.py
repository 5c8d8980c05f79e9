"""Serving throughput with per-request steering: vLLM's OpenAI server under ``acttransport serve``
against plain vLLM and against acttransport's own transformers path (per-row strengths).

16 concurrent requests through the ``openai`` client, half steered (two maps fitted here on
SmolLM2-135M's norms, at strengths 0.6 and 0.8), half unsteered; every request generates
exactly ``--tokens`` tokens (``ignore_eos``). Output tokens/s is the median of ``--rounds``
rounds after one warm-up round; the first three rows run against two servers up at once, their
rounds interleaved with the order rotating each round. Rows:

* acttransport serve (eager), the mixed requests;
* the same server, all 16 requests unsteered (the plugin loaded, nothing to steer);
* plain vLLM, eager, prefix caching off (what ``serve`` runs), no plugin, all unsteered — the
  same execution mode;
* plain vLLM in its default mode (compiled, prefix caching on), all unsteered;
* transformers + ``acttransport.steer`` with per-row strengths: two batches of 8 (4 rows of
  one map + 4 unsteered each; one ``steer`` block holds one map), left-padded.

Run in .venv-vllm (``make vllm-env``)::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv-vllm/bin/python benchmarks/vllm_serving.py
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import acttransport as at
from acttransport.assets import load_model
from acttransport.serve.server import vllm_model_dir

PROMPTS = ["The weather today is", "My neighbour said that", "Tell me about your", "The best way to learn is",
           "Yesterday at the station", "Our team meeting was", "The restaurant down the street", "When I read the news",
           "A letter to my landlord:", "The new manager told us", "After the game, the fans", "In my opinion, politicians",
           "The children in the park", "Customer service replied", "My brother keeps", "The comments under the video"]
NEG = ["I hate you, you idiot.", "This is stupid and awful.", "You are a worthless fool.", "Shut up, moron.",
       "What a disgusting mess.", "Everyone here is dumb.", "I will ruin your day.", "That was a terrible idea, loser."]
POS = ["I love spending time with you.", "This is wonderful and kind.", "You are a thoughtful friend.", "Thank you so much.",
       "What a lovely garden.", "Everyone here is helpful.", "I will brighten your day.", "That was a great idea, friend."]
#: Request i: even unsteered; odd alternate the two maps.
STEERS = [None if i % 2 == 0 else (("kind", 0.6) if i % 4 == 1 else ("rude", 0.8)) for i in range(16)]
ENTRY = "from vllm.entrypoints.launchers.api_server.entry import main; main()"
VLLM_COMMON = ["--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory-bytes", str(512 << 20), "--seed", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process (its own process group), up when /health answers; stopped on exit."""

    def __init__(self, argv: list[str], port: int, env: dict[str, str], log: Path) -> None:
        self.port, self.log = port, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def __enter__(self) -> "Server":
        start, deadline = time.time(), time.time() + 900
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited:\n{self.log.read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"server not up in 900 s:\n{self.log.read_text()[-2000:]}")
                time.sleep(1)
        except BaseException:
            self.__exit__()
            raise
        self.startup = time.time() - start
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _round(port: int, steers: list, n_tokens: int) -> tuple[float, int]:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

    def one(i: int) -> int:
        body = {"ignore_eos": True}
        if steers[i] is not None:
            body["vllm_xargs"] = {"steer": steers[i][0], "strength": steers[i][1]}
        r = client.completions.create(model="m", prompt=PROMPTS[i], max_tokens=n_tokens, temperature=0, extra_body=body)
        return r.usage.completion_tokens

    t = time.perf_counter()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        tokens = sum(pool.map(one, range(len(PROMPTS))))
    return time.perf_counter() - t, tokens


def _throughput(port: int, steers: list, n_tokens: int, rounds: int) -> float:
    _round(port, steers, n_tokens)  # warm-up
    rates = []
    for _ in range(rounds):
        dt, tokens = _round(port, steers, n_tokens)
        assert tokens == len(PROMPTS) * n_tokens, tokens
        rates.append(tokens / dt)
    return statistics.median(rates)


@torch.no_grad()
def _transformers(model, tok, maps: dict, n_tokens: int, rounds: int) -> float:
    """Two batches of 8 rows: 4 steered by one map (per-row λ) + 4 unsteered, left-padded."""
    tok.padding_side = "left"
    batches = []
    for name in ("kind", "rude"):
        rows = [i for i, s in enumerate(STEERS) if s is not None and s[0] == name]
        plain = [i for i, s in enumerate(STEERS) if s is None][: 4] if name == "kind" else [i for i, s in enumerate(STEERS) if s is None][4:]
        idx = rows + plain
        lam = [STEERS[i][1] for i in rows] + [0.0] * len(plain)
        batches.append((name, [PROMPTS[i] for i in idx], lam))

    def run() -> float:
        t = time.perf_counter()
        for name, texts, lam in batches:
            enc = tok(texts, return_tensors="pt", padding=True)
            with at.steer(model, maps[name], lam):
                out = model.generate(**enc, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
            assert out.shape[1] - enc["input_ids"].shape[1] == n_tokens
        return len(PROMPTS) * n_tokens / (time.perf_counter() - t)

    run()  # warm-up
    return statistics.median(run() for _ in range(rounds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request (default 64)")
    ap.add_argument("--rounds", type=int, default=6, help="measured rounds per row (default 6)")
    ap.add_argument("--skip-default-mode", action="store_true", help="skip plain vLLM's compiled mode (its start compiles)")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    model, tok = load_model("smollm2-135m")
    norms = r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)"
    maps = {"kind": at.estimate(model, tok, NEG, POS, norms, method="linear", support="all", progress=False, seed=0),
            "rude": at.estimate(model, tok, POS, NEG, norms, method="linear", support="all", progress=False, seed=0)}
    dirs = {n: str(m.save(work / n)) for n, m in maps.items()}
    model_dir = str(vllm_model_dir("smollm2-135m"))
    env = {**os.environ}
    plain_env = {k: v for k, v in env.items() if not k.startswith("ACTTRANSPORT_VLLM")} | {"VLLM_PLUGINS": ""}
    rows: list[tuple[str, float]] = []

    port = _free_port()
    argv = [sys.executable, "-m", "acttransport", "serve", "smollm2-135m", "--port", str(port), "--dtype", "float32",
            "--served-model-name", "m", "--vllm-args", " ".join(VLLM_COMMON[2:])] + sum((["--map", f"{n}={d}"] for n, d in dirs.items()), [])
    port_b = _free_port()
    argv_b = [sys.executable, "-c", ENTRY, "--model", model_dir, "--port", str(port_b), "--host", "127.0.0.1", "--served-model-name", "m",
              *VLLM_COMMON, "--enforce-eager", "--no-enable-prefix-caching"]
    # Both servers up at once; their rounds interleaved, the order rotating each round.
    variants = [("acttransport serve (eager, no prefix caching): 8 steered (2 maps, λ 0.6 / 0.8) + 8 unsteered", port, STEERS),
                ("the same server: 16 unsteered", port, [None] * 16),
                ("plain vLLM (eager, no prefix caching, no plugin): 16 unsteered", port_b, [None] * 16)]
    with Server(argv, port, env, work / "steered.log"), Server(argv_b, port_b, plain_env, work / "plain-eager.log"):
        for _, p, st in variants:
            _round(p, st, a.tokens)  # warm-up
        rates: dict[str, list[float]] = {v[0]: [] for v in variants}
        for r in range(a.rounds):
            for name, p, st in variants[r % 3:] + variants[: r % 3]:
                dt, tokens = _round(p, st, a.tokens)
                assert tokens == len(PROMPTS) * a.tokens, tokens
                rates[name].append(tokens / dt)
        rows += [(name, statistics.median(rates[name])) for name, _, _ in variants]
    if not a.skip_default_mode:
        port = _free_port()
        argv = [sys.executable, "-c", ENTRY, "--model", model_dir, "--port", str(port), "--host", "127.0.0.1", "--served-model-name", "m",
                *VLLM_COMMON]
        with Server(argv, port, plain_env, work / "plain-default.log") as s:
            rows.append(("plain vLLM (default mode: compiled, prefix caching on; no plugin): 16 unsteered, run after",
                         _throughput(port, [None] * 16, a.tokens, a.rounds)))
            print(f"plain vLLM (default mode) started in {s.startup:.0f} s", file=sys.stderr)
    rows.append(("transformers + acttransport.steer, per-row λ (2 batches of 8)", _transformers(model, tok, maps, a.tokens, a.rounds)))

    ref = rows[0][1]
    print(f"\n16 concurrent requests x {a.tokens} output tokens, SmolLM2-135M float32, median of {a.rounds} rounds "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})\n")
    print("| setting | output tokens/s | steered mix ÷ this |")
    print("|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {ref / rate:.3f} |")


if __name__ == "__main__":
    main()
