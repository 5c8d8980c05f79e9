"""What the playground's page does, as plain functions on plain objects (no Gradio here).

Every button of the page calls one function of this module with a :class:`Playground` (the
models, loaded once per process) and the per-session maps; each one goes through the public
API (``estimate``, ``steer``, ``load``, ``match_modules``, ``collect``, ``compose``) and raises
:class:`~acttransport.errors.ActTransportError` with the usual one-line message on bad input.
So whatever the page can do, a script can do::

    pg = Playground.from_names("smollm2-135m", "toy-t2i")
    tmap = fit_map(pg, "text", ["you idiot"], ["thank you"])
    for plain, steered in stream_pair(pg, tmap, "The man said", strength=1.0):
        pass
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..artifact import TransportMap, compose
from ..engine import estimate
from ..errors import ActTransportError, ConfigError, DataError, MapFormatError
from ..steer import check_fits, load, steer
from ..generation import NucleusFilter, Sampling
from ..options import NUM_INFERENCE_STEPS

__all__ = ["KINDS", "MAX_NEW_TOKENS", "Playground", "compose_selected", "fit_map", "gate_reading", "load_map", "parse_lines", "score_texts", "split_patterns", "stream_pair"]

#: What a map steers: the text model or the image pipeline.
KINDS = ("text", "image")
#: The most tokens one continuation of the page may ask for (every session waits in one queue).
MAX_NEW_TOKENS = 512


@dataclass
class Playground:
    """The models one playground process serves (shared by every browser tab; the maps are not).

    Attributes:
        model, tokenizer, model_id: the causal LM of the text tab (None: no text tab).
        pipe, pipe_id: the diffusers pipeline of the image tab (None: no image tab).
        text_judge: anything with ``score(texts) -> [n]`` probabilities of toxicity; ``"auto"``
            loads (or trains once, ~1 minute) the MiniLM toxicity judge on first use; None: off.
        image_judge: anything with ``predict(images [B, 3, H, W])`` like the toy judge; ``"auto"``
            loads the shipped toy judge when the pipeline is the toy model; None: off.
        maps: ``(kind, name, map)`` loaded at start (``--map``); every session starts with them.
        steps, guidance: how the image tab draws images (denoising steps, guidance scale).
        lock: held while a map is fitted or images are drawn (hooks are global to a model, so two
            sessions must never steer it at once; the page also queues every model call in one line).
    """

    model: Any = None
    tokenizer: Any = None
    model_id: str = ""
    pipe: Any = None
    pipe_id: str = ""
    text_judge: Any = "auto"
    image_judge: Any = "auto"
    maps: list[tuple[str, str, TransportMap]] = field(default_factory=list)
    steps: int = NUM_INFERENCE_STEPS
    guidance: float = 3.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_names(cls, model: str | None = "smollm2-135m", pipe: str | None = "toy-t2i", map_dirs: Sequence[str] = (), **kw: Any) -> "Playground":
        """Loads a model and a pipeline by alias, id or folder (None skips one) and the map folders,
        each checked against the model or the pipeline it was fitted for."""
        m = tok = p = None
        if model:
            from ..assets import load_model

            m, tok = load_model(model)
        if pipe:
            from ..assets import load_pipeline

            p = load_pipeline(pipe)
        pg = cls(model=m, tokenizer=tok, model_id=model or "", pipe=p, pipe_id=pipe or "", **kw)
        for d in map_dirs:
            kind, tmap = load_map(pg, d)
            pg.maps.append((kind, Path(d).name, tmap))
        return pg

    def target(self, kind: str) -> Any:
        """The model (``text``) or pipeline (``image``) a map of ``kind`` steers.

        Raises:
            ConfigError: the playground has none of that kind.
        """
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        obj = self.model if kind == "text" else self.pipe
        if obj is None:
            what = "a causal LM (acttransport playground MODEL)" if kind == "text" else "a pipeline (--pipeline toy-t2i)"
            raise ConfigError(f"this playground has no {kind} model; start it with {what}")
        return obj

    def toxicity_judge(self) -> Any:
        """The text judge (loaded on first use), or None when off."""
        if isinstance(self.text_judge, str):
            from ..evaluate.judges.toxicity import ToxicityJudge

            self.text_judge = ToxicityJudge.load_or_train()
        return self.text_judge

    def toy_judge(self) -> Any:
        """The image judge (the shipped toy judge when the pipeline is the toy model), or None."""
        if isinstance(self.image_judge, str):
            from ..toy import ToyTextToImagePipeline, load_toy_judge

            self.image_judge = load_toy_judge() if isinstance(self.pipe, ToyTextToImagePipeline) else None
        return self.image_judge


def parse_lines(text: str | None, file: str | None = None) -> list[str]:
    """The non-empty lines of a text box plus those of an uploaded text file (``.jsonl``: its ``text`` fields)."""
    lines = [s.strip() for s in (text or "").splitlines() if s.strip()]
    if file:
        import json

        path = Path(str(file))
        if not path.is_file():
            raise DataError(f"{path.name} not found; upload a text file with one sentence per line (or a .jsonl with a 'text' field)")
        try:
            raw = [s for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
        except UnicodeDecodeError:
            raise DataError(f"{path.name} is not UTF-8 text; upload a text file with one sentence per line") from None
        if path.suffix == ".jsonl":
            try:
                raw = [str(json.loads(s)["text"]) for s in raw]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path.name}: every line of a .jsonl file must be a JSON object with a 'text' field") from None
        lines += [s.strip() for s in raw if s.strip()]
    return lines


def split_patterns(text: str | None) -> str | list[str] | None:
    """Module patterns from a text box: several separated by spaces or new lines; blank: None (the default)."""
    parts = (text or "").split()
    return None if not parts else parts[0] if len(parts) == 1 else parts


def load_map(pg: Playground, directory: str) -> tuple[str, TransportMap]:
    """``(kind, map)`` of a map folder: checked against the text model, else the pipeline.

    Raises:
        MapFormatError: the folder holds no map, or the map fits neither model (the message says
            which model it was fitted on).
    """
    if not directory or not str(directory).strip():
        raise MapFormatError("give the folder of a map (written by `acttransport fit` or the Fit tab's Save)")
    folder = str(directory).strip()
    tmap = load(folder)  # no map, or a corrupt one: MapFormatError with the library's message
    last: ActTransportError | None = None
    for kind in KINDS:
        obj = pg.model if kind == "text" else pg.pipe
        if obj is None:
            continue
        try:
            check_fits(obj, tmap)
            return kind, tmap
        except ActTransportError as e:  # a module the model lacks, or another width
            last = e
    if last is None:
        raise ConfigError("this playground has neither a text model nor a pipeline to load a map for")
    raise MapFormatError(f"{folder}: this map does not fit the playground's models (it was fitted on {tmap.config.model!r}: {last}); "
                         "load a map fitted on this model, or start the playground with the model the map was fitted on")


def compose_selected(maps: Sequence[tuple[TransportMap, float]]) -> tuple[TransportMap | None, float]:
    """One map and λ for several ``(map, λ)`` pairs: the one map as is, or the maps each taken at
    its λ (``interpolate``) and composed in the order given, applied at λ = 1.

    Raises:
        ConfigError: the maps cannot be composed (``compose`` needs the same modules and support ``all``).
    """
    if not maps:
        return None, 0.0
    if len(maps) == 1:
        return maps[0]
    out = maps[0][0].interpolate(maps[0][1])
    for tmap, lam in maps[1:]:
        try:
            out = compose(tmap.interpolate(lam), out)
        except ConfigError as e:
            raise ConfigError(f"the selected maps cannot be steered together ({e}); select one map") from None
    return out, 1.0


def fit_map(pg: Playground, kind: str, source: Sequence[str], target: Sequence[str], method: str = "linear", modules: str | None = None,
            support: str | None = None, strength: float = 1.0, max_samples: int | None = None, data: str = "", progress: bool = True,
            gate: str | None = None) -> TransportMap:
    """Fits a map on the text model or the pipeline (through :func:`acttransport.estimate`);
    ``gate`` (``"probe"``, ``"ratio"``, ``"cosine"``) fits a gate with it.

    Raises:
        DataError: a list is empty.
        ActTransportError: bad method, modules or support.
    """
    for side, texts in (("source", source), ("target", target)):
        if not texts:
            raise DataError(f"the {side} list is empty; paste one sentence (prompt) per line, upload a file or pick a data set")
    if max_samples:
        import random

        source = random.Random(0).sample(list(source), min(max_samples, len(source)))
        target = random.Random(1).sample(list(target), min(max_samples, len(target)))
    obj = pg.target(kind)
    kw: dict[str, Any] = dict(method=method or None, modules=split_patterns(modules), support=support or None,
                              data=data or f"{len(source)} source / {len(target)} target lines from the playground", progress=progress)
    if gate:
        kw["gate"] = gate
    with pg.lock:
        if kind == "image":
            from ..runners import DiffusionRunner

            runner = DiffusionRunner(pipe=obj, num_inference_steps=pg.steps, guidance_scale=pg.guidance)
            tmap = estimate(runner, source=list(source), target=list(target), **kw)  # halves: FitOptions' (cond)
        else:
            tmap = estimate(obj, pg.tokenizer, list(source), list(target), **kw)
    from ..steer import check_strength

    lam = check_strength(strength, tmap.config.unbounded)
    return dataclasses.replace(tmap, config=tmap.config.replace(model=pg.model_id if kind == "text" else pg.pipe_id, strength=lam))  # keeps a gate


def _generate_kwargs(tok: Any, sampling: Sampling) -> dict[str, Any]:
    """``model.generate`` arguments of :func:`acttransport.generation.generate`'s sampling."""
    from transformers import LogitsProcessorList

    kw: dict[str, Any] = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample, repetition_penalty=sampling.repetition_penalty,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if sampling.do_sample:
        kw.update(temperature=sampling.temperature, top_p=1.0, top_k=0)
        if sampling.top_p < 1:
            kw["logits_processor"] = LogitsProcessorList([NucleusFilter(sampling.top_p)])
    return kw


def _stream_one(pg: Playground, prompt: str, sampling: Sampling, seed: int) -> Iterator[str]:
    """The continuation of ``prompt`` as it grows, token by token (generation runs in a thread;
    closing the iterator early stops it at the next token)."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> bool:
            return stop.is_set()

    tok, model, stop = pg.tokenizer, pg.model, threading.Event()
    ids = tok(prompt, return_tensors="pt").to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            torch.manual_seed(seed)
            with torch.inference_mode():
                model.generate(**ids, **_generate_kwargs(tok, sampling), streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop()]))
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text
    finally:
        stop.set()  # a no-op once generation ended; else (the page went away) it ends at the next token
        thread.join()
    if errors:
        raise errors[0]


def stream_pair(pg: Playground, tmap: TransportMap | None, prompt: str, strength: float = 1.0, seed: int = 0, max_new_tokens: int = 32,
                greedy: bool = False, temperature: float = 1.0, top_p: float = 0.3, repetition_penalty: float = 1.2,
                info: dict[str, Any] | None = None) -> Iterator[tuple[str, str]]:
    """``(unsteered, steered)`` continuations of ``prompt`` as they grow: first the unsteered one
    token by token, then the steered one from the same seed (no map: the steered side stays "").

    ``info``, when given, receives ``"gate"``: what a gated map's gate read on the prompt
    (:func:`gate_reading`; "" for an ungated map).

    Raises:
        DataError: the prompt is empty.
        ConfigError: bad strength or sampling settings.
    """
    if not prompt or not prompt.strip():
        raise DataError("the prompt is empty; type a prompt to continue")
    if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS:  # one request must not hold the shared queue for long
        raise ConfigError(f"new tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}; "
                          "for longer continuations use `acttransport generate` or acttransport.steer in a script")
    model = pg.target("text")
    sampling = Sampling(int(max_new_tokens), float(temperature), float(top_p), float(repetition_penalty), not greedy)
    plain = ""
    for plain in _stream_one(pg, prompt, sampling, seed):
        yield plain, ""
    if tmap is None:
        return
    with steer(model, tmap, strength):  # a second steer of the same model (another thread) fails with a clear error
        steered = ""
        for steered in _stream_one(pg, prompt, sampling, seed):
            yield plain, steered
        if info is not None:
            info["gate"] = gate_reading(tmap, model)
    yield plain, steered


def score_texts(pg: Playground, texts: Sequence[str]) -> list[float] | None:
    """The toxicity judge's p(toxic) of each text (None when the judge is off)."""
    judge = pg.toxicity_judge()
    if judge is None:
        return None
    return [float(p) for p in judge.score(list(texts))]


def gate_reading(tmap: TransportMap | None, model: Any = None) -> str:
    """What a gated map's gate read in the current ``steer`` block of ``model`` (its value, 1 open /
    0 closed, and the prompt's score), or its description outside one; "" for an ungated map."""
    gate = getattr(tmap, "gate", None) if tmap is not None else None
    if gate is None:
        return ""
    try:
        from ..steer import gate_history
    except ImportError:  # a library without gates
        history = []
    else:
        history = gate_history(model) if model is not None else []
    if history:
        first = history[0]
        value, score = float(first["open"][0]), float(first["score"][0])
        tokens = f"; open on {int(first['open_tokens'][0])} of {int(first['tokens'][0])} generated tokens" if "tokens" in first else ""
        return f"**gate** {value:g} ({'open' if value else 'closed'} on the prompt, score {score:.3g}{tokens})"
    describe: Callable[[], str] | None = getattr(gate, "describe", None)
    return f"**gate**: {describe() if callable(describe) else type(gate).__name__}"
