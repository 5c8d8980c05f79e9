"""A map as a llama.cpp control vector: one vector per layer added to that layer's output.

llama.cpp adds tensor ``direction.N`` (float32, ``[n_embd]``) of a GGUF file with
architecture ``controlvector`` to the output of decoder layer N (0-based, N ≥ 1: the loader
refuses layer 0), scaled by the strength the user passes (``--control-vector-scaled F S``).
That is exactly Mean-AcT with support ``all`` on ``model.layers.N`` (the ``@blocks`` preset):
``a -> a + λβ``. Any map that scales, masks or lives elsewhere is refused with its reason.

The other way, :func:`import_vector` reads such a file — written by ``acttransport export``,
llama.cpp's ``cvector-generator`` or repeng's ``ControlVector.export_gguf`` (repeng adds
``direction.N`` to the output of ``model.layers[N]`` too) — into that map: steering it at
strength λ adds ``λ·direction.N`` to layer N's output, as repeng's ``coeff`` and llama.cpp's
scale do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .._io import atomic_file
from ..artifact import TransportConfig, TransportMap
from ..errors import ConfigError, MapFormatError, ModuleMatchError
from ..targets.names import match_modules, module_tree
from ..transport.maps import ModuleMap

__all__ = ["control_vectors", "decoder_layers", "import_vector", "read_control_vector", "write_control_vector"]

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


def read_control_vector(path: str | os.PathLike) -> tuple[dict[int, torch.Tensor], str]:
    """The directions of a llama.cpp control-vector GGUF file and its model hint.

    Returns:
        ``({layer N: direction.N as [d] float32}, controlvector.model_hint or "")``.

    Raises:
        MapFormatError: no such file, not a GGUF file, not a control vector (another
            architecture, a tensor not named ``direction.N``, no directions), a direction that
            is not one F32/F16 vector, directions of different widths, or non-finite values.
    """
    import gguf
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise MapFormatError(f"{path}: no such file; give a control-vector .gguf (from repeng's export_gguf, llama.cpp or `acttransport export`)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError / struct errors / memmap errors on other files
        raise MapFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def text(key: str) -> str | None:
        field = reader.get_field(key)
        return None if field is None or not field.parts else bytes(field.parts[-1]).decode("utf-8", errors="replace")

    arch = text("general.architecture")
    if arch != "controlvector":
        raise MapFormatError(f"{path}: not a llama.cpp control vector (general.architecture is {arch!r}, expected 'controlvector'); "
                             "a model's own GGUF file is not a steering vector")
    out: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        hit = re.fullmatch(r"direction\.(\d+)", t.name)
        if hit is None:
            raise MapFormatError(f"{path}: tensor {t.name!r} is not a control vector's direction.N")
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise MapFormatError(f"{path}: {t.name} is stored as {t.tensor_type.name}; only F32 and F16 directions can be read")
        vec = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
        if vec.numel() != int(np.prod(t.shape)) or sum(int(n) > 1 for n in t.shape) > 1:
            raise MapFormatError(f"{path}: {t.name} has shape {list(t.shape)}; a direction is one vector")
        if not bool(torch.isfinite(vec).all()):
            raise MapFormatError(f"{path}: {t.name} holds NaN or infinite values")
        out[int(hit.group(1))] = vec
    if not out:
        raise MapFormatError(f"{path}: a control vector without any direction.N tensor")
    widths = {int(v.numel()) for v in out.values()}
    if len(widths) > 1:
        raise MapFormatError(f"{path}: directions of different widths {sorted(widths)}; the file is corrupt")
    return out, text("controlvector.model_hint") or ""


def decoder_layers(model: torch.nn.Module) -> dict[int, str]:
    """``{N: name of decoder layer N}`` (``model.layers.N``): the ``@blocks`` preset, or any
    ``….layers.N`` module where the architecture has no preset.

    Raises:
        ModuleMatchError: the model has no ``layers.N`` modules.
    """
    try:
        names = match_modules(model, "@blocks")
    except ModuleMatchError:
        names = [n for n, _ in module_tree(model).named_modules() if _BLOCK.fullmatch(n)]
    out: dict[int, str] = {}
    for n in names:
        if (hit := _BLOCK.fullmatch(n)) is None:
            continue
        k = int(hit.group(1))
        if k in out:  # e.g. a vision tower's layers beside the language model's
            raise ModuleMatchError(f"both {out[k]} and {n} are a layer {k}; cannot tell which stack a control vector's direction.{k} is for")
        out[k] = n
    if not out:
        raise ModuleMatchError(f"{type(model).__name__} has no decoder layers named like model.layers.N; "
                               "a control vector steers a decoder-only language model")
    return out


def _hidden_width(model: torch.nn.Module) -> int | None:
    """The residual stream's width: the input embedding's, else ``config.hidden_size``, else None."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(getattr(emb, "embedding_dim", None), int):
        return int(emb.embedding_dim)
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    return size if isinstance(size, int) else None


def import_vector(path: str | os.PathLike, model: torch.nn.Module) -> TransportMap:
    """A llama.cpp control vector as a map on ``model``'s decoder-layer outputs.

    ``direction.N`` becomes a Mean-AcT-style map on ``model.layers.N``: scale 1, shift
    ``direction.N``, support all; ``steer(model, tmap, λ)`` adds ``λ·direction.N`` to every
    token of layer N's output — repeng's ``ControlModel.set_control(vector, coeff=λ)`` and
    llama.cpp's ``--control-vector-scaled FILE λ``. λ may be any real number (negative
    inverts the direction), as in those tools. ``direction.0`` is read as layer 0's output
    (repeng's meaning; llama.cpp itself refuses a vector for layer 0).

    Args:
        path: the ``.gguf`` file.
        model: the causal LM the vector was made for.

    Raises:
        MapFormatError: the file is not a control vector (see :func:`read_control_vector`),
            its width is not the model's hidden width, or a layer is beyond the model's.
        ModuleMatchError: the model has no ``model.layers.N``.
    """
    vectors, hint = read_control_vector(path)
    layers = decoder_layers(model)
    name = Path(path).name
    width, d = _hidden_width(model), int(next(iter(vectors.values())).numel())
    if width is not None and width != d:
        raise MapFormatError(f"{name}: directions of width {d}, but the model's hidden width is {width}; "
                             f"the vector was made for another model (its hint: {hint or 'none'})")
    beyond = sorted(n for n in vectors if n not in layers)
    if beyond:
        raise MapFormatError(f"{name}: direction(s) for layer(s) {beyond}, but the model has layers {min(layers)}..{max(layers)}; "
                             f"the vector was made for a deeper model (its hint: {hint or 'none'})")
    # every map gets tensors of its own (safetensors refuses to save shared storage)
    maps = {layers[n]: ModuleMap(torch.ones(d), vectors[n], torch.full((d,), -torch.inf), torch.full((d,), torch.inf)) for n in sorted(vectors)}
    model_id = getattr(model, "acttransport_model_id", None) or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    notes = (f"imported from the llama.cpp control vector {name} (model hint {hint or 'none'}): direction.N added to model.layers.N; "
             "λ is repeng's coeff / llama.cpp's scale, any real number",)
    cfg = TransportConfig(method="mean", support="all", causal=False, unbounded=True, model=model_id, data=f"control vector {name}",
                          notes=notes)
    return TransportMap(maps, cfg)
