"""``acttransport import``: a steering vector from another tool as a map (a llama.cpp control
vector, as repeng's ``export_gguf``, llama.cpp's ``cvector-generator`` and ``acttransport export``
write it)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import MODEL_HELP, load_lm

__all__ = ["IMPORT_FORMATS", "add_import_command", "cmd_import"]

#: What ``import`` reads.
IMPORT_FORMATS = ("gguf-control-vector",)


def cmd_import(a: argparse.Namespace) -> None:
    from ..bake.control_vector import import_vector

    model, _ = load_lm(a.model, a.dtype)
    tmap = import_vector(a.file, model)
    layers = [m.rsplit(".", 1)[-1] for m in tmap.modules]
    print(f"read {len(layers)} directions (layers {layers[0]}..{layers[-1]}, width {tmap.maps[tmap.modules[0]].width}) from {a.file}")
    print(f"map written to {tmap.save(a.out)}")
    print(f"steer with it: acttransport generate {a.model} --map {a.out} --prompt TEXT --strengths 0,S  "
          "(S = repeng's coeff / llama.cpp's scale, any real number)")


def add_import_command(sub: Any) -> None:
    """Registers ``import`` on an argparse subparsers object."""
    p = sub.add_parser("import", help="read a llama.cpp control vector (repeng's export_gguf, llama.cpp) into a map on a model's decoder layers")
    p.add_argument("file", help="the control-vector .gguf file (tensors direction.N: added to the output of model.layers.N)")
    p.add_argument("--model", required=True, help=MODEL_HELP + " (the model the vector was made for; widths and layers are checked)")
    p.add_argument("--format", choices=IMPORT_FORMATS, default="gguf-control-vector", help="input format (default gguf-control-vector)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype while checking (default float32)")
    p.add_argument("-o", "--out", required=True, help="map directory to write (written atomically)")
    p.set_defaults(func=cmd_import)
