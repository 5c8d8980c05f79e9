"""Generation speed of one model on this CPU: which dtype / batch size / attention setting decodes
fastest while staying faithful to float32.

Each variant decodes the same RealToxicityPrompts prompts greedily (``--new-tokens`` tokens,
repetition penalty 1.2 as in the toxicity sweeps) through ``acttransport.generation.generate``,
the path every sweep uses. The variants run in interleaved rounds (the order rotated each round)
on one loaded model, so a machine shared with other work slows them alike; reported per variant:
the median output tokens/s over the rounds (prompts x new tokens / wall time), its ratio to
``fp32-b16`` measured in this same run, and faithfulness: how many greedy continuations are
identical to ``fp32-b16``'s, and the share of identical tokens.

Variants (``--variants``, comma separated):

* ``fp32-bN``       float32, batch N (SDPA attention, transformers' default);
* ``fp32-eager-bN`` float32 with transformers' eager attention;
* ``bf16-bN``       a copy of the model cast with ``.to(torch.bfloat16)``;
* ``compile-bN``    float32 with the forward compiled by ``torch.compile`` (its first round
  includes the compilation).

Run: ``python benchmarks/generation_speed.py --model qwen2.5-1.5b --prompts 32 --new-tokens 16
--rounds 2 --variants fp32-b16,fp32-b32,fp32-eager-b16,bf16-b16``
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import time

import torch

from acttransport import assets
from acttransport.generation import Sampling, generate


def _variant(name: str) -> tuple[str, int]:
    match = re.fullmatch(r"(fp32|fp32-eager|bf16|compile)-b(\d+)", name)
    if not match:
        raise SystemExit(f"unknown variant {name!r}: expected fp32-bN, fp32-eager-bN, bf16-bN or compile-bN")
    return match.group(1), int(match.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="fp32-b16,fp32-b32,fp32-eager-b16,bf16-b16")
    a = ap.parse_args()
    names = ["fp32-b16", *[v for v in a.variants.split(",") if v and v != "fp32-b16"]]
    kinds = {n: _variant(n) for n in names}
    prompts = assets.load_rtp_prompts(a.prompts, seed=0)
    sampling = Sampling(max_new_tokens=a.new_tokens, do_sample=False)
    model, tok = assets.load_model(a.model)
    models = {"fp32": model, "fp32-eager": model}
    if any(k == "bf16" for k, _ in kinds.values()):
        models["bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    if any(k == "compile" for k, _ in kinds.values()):
        models["compile"] = copy.deepcopy(model)
        models["compile"].forward = torch.compile(models["compile"].forward)
    print(f"{a.model}: {a.prompts} prompts x {a.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads, {a.rounds} rounds")
    rates: dict[str, list[float]] = {n: [] for n in names}
    texts: dict[str, list[str]] = {}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            kind, batch = kinds[name]
            m = models[kind]
            m.set_attn_implementation("eager" if kind == "fp32-eager" else "sdpa")
            start = time.perf_counter()
            texts[name] = generate(m, tok, prompts, sampling, batch_size=batch, progress=False)
            rates[name].append(len(prompts) * a.new_tokens / (time.perf_counter() - start))
            print(f"  round {r}: {name:<16} {rates[name][-1]:6.2f} tok/s", flush=True)
    ids = {n: [tok(t, add_special_tokens=False)["input_ids"] for t in texts[n]] for n in names}
    base_rate = statistics.median(rates["fp32-b16"])
    print("\n| variant | tokens/s (median) | × fp32-b16 | identical continuations | identical tokens |\n|:---|---:|---:|---:|---:|")
    for n in names:
        same = sum(x == y for x, y in zip(ids[n], ids["fp32-b16"]))
        tok_same = sum(sum(p == q for p, q in zip(x, y)) for x, y in zip(ids[n], ids["fp32-b16"]))
        tok_all = sum(max(len(x), len(y)) for x, y in zip(ids[n], ids["fp32-b16"]))
        rate = statistics.median(rates[n])
        print(f"| {n} | {rate:.2f} | {rate / base_rate:.2f} | {same}/{len(prompts)} | {tok_same / max(tok_all, 1):.1%} |")


if __name__ == "__main__":
    main()
