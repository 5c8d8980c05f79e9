"""A map as a llama.cpp control vector: one vector per layer added to that layer's output.

llama.cpp adds tensor ``direction.N`` (float32, ``[n_embd]``) of a GGUF file with
architecture ``controlvector`` to the output of decoder layer N (0-based, N ≥ 1: the loader
refuses layer 0), scaled by the strength the user passes (``--control-vector-scaled F S``).
That is exactly Mean-AcT with support ``all`` on ``model.layers.N`` (the ``@blocks`` preset):
``a -> a + λβ``. Any map that scales, masks or lives elsewhere is refused with its reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .._io import atomic_file
from ..artifact import TransportMap
from ..errors import ConfigError

__all__ = ["control_vectors", "write_control_vector"]

_BLOCK = re.compile(r"(?:.*\.)?layers\.(\d+)")


def control_vectors(tmap: TransportMap, strength: float = 1.0) -> dict[int, torch.Tensor]:
    """``{layer N: λβ}`` (``[d]`` float32) for a map llama.cpp can run as a control vector.

    Raises:
        ConfigError: the map has a gate, or some module is not a decoder layer's output ≥ 1, scales (ω ≠ 1), has a
            support mask, knots or denoising steps (each module and its reason listed).
    """
    if tmap.gate is not None:
        raise ConfigError(f"this map has a {tmap.gate.kind} gate, which decides per input whether the map applies; a control vector adds "
                          "to every input: export the ungated map (tmap.without_gate(); CLI: --no-gate)")
    out: dict[int, torch.Tensor] = {}
    bad: list[str] = []
    for spec, m in tmap.maps.items():
        hit = _BLOCK.fullmatch(spec)
        if hit is None:
            bad.append(f"{spec}: not a decoder layer's output (llama.cpp adds control vectors to model.layers.N; fit on @blocks)")
        elif int(hit.group(1)) == 0:
            bad.append(f"{spec}: llama.cpp has no control vector for layer 0's output")
        elif m.kind != "affine" or m.steps is not None:
            bad.append(f"{spec}: a {m.kind} map{' per denoising step' if m.steps else ''} is not one added vector")
        elif bool((m.scale != 1).any()):
            bad.append(f"{spec}: the map scales {int((m.scale != 1).sum())} of {m.width} units (a control vector only adds; use --method mean)")
        elif m.bounded:
            bad.append(f"{spec}: support {tmap.config.support} masks by value (a control vector adds everywhere; refit with --support all)")
        else:
            out[int(hit.group(1))] = (float(strength) * m.shift).to(torch.float32)
    if bad:
        raise ConfigError(f"{len(bad)} of {len(tmap.maps)} modules cannot be a llama.cpp control vector:\n  " + "\n  ".join(bad))
    return out


def write_control_vector(path: str | os.PathLike, vectors: dict[int, torch.Tensor], model_hint: str = "llama") -> Path:
    """Writes ``vectors`` in llama.cpp's control-vector GGUF layout, atomically (temp file + rename)."""
    import gguf

    path = Path(path)
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "controlvector")
        w.add_string("controlvector.model_hint", model_hint)
        w.add_uint32("controlvector.layer_count", len(vectors))
        for layer in sorted(vectors):
            w.add_tensor(f"direction.{layer}", vectors[layer].detach().cpu().numpy().astype("float32"))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
