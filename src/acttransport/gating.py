"""The gate at run time: reading it in a forward pass, and the per-row weights it gives.

One :class:`GateReader` per ``steer`` block. A forward pre-hook on the model reads the call's
``attention_mask`` to tell padding, and the mask's length beyond the call's tokens — or, without
a mask (``generate`` on an unpadded batch sends none), ``cache_position``, the KV cache's length
or ``position_ids`` — to tell whether the call starts a sequence (prefill) or extends one (a
decoding step); a forward hook on the gate's module pools
its output and scores it; each mapped module's hook then asks :meth:`GateReader.weights` for
its per-row (``sequence`` mode) or per-token (``token`` and ``position`` mode) gate values.

* ``sequence`` — at prefill, the mean of the prompt's real tokens is scored once per row; the
  value is kept for every generated token of that row. A call without a cache that repeats the
  previous call's ``input_ids`` and adds tokens (``generate(use_cache=False)``) continues the
  same rows: the kept value holds, no new prompt is scored.
* ``token`` — the running mean of the row's real tokens so far (prompt and generated) is
  scored at every position; a padding position gets 0. Without a cache the re-run rows'
  new tokens are counted as generated ones of the same prompt, as with one.
* ``position`` — each position's own vector is scored, with no memory of earlier tokens: the
  hidden state at the last position is the model's state as it picks the next token, so the
  gate can open right before a word the source set holds even after a long target-like
  prompt that would dilute a running mean. Padding gets 0; its history is token mode's. Its
  threshold is calibrated per token (:func:`~acttransport.transport.gate.fit_gate`).

The gate module must run before every mapped module in each forward pass (it usually is the
first mapped module, read before its map acts); a mapped module that runs before the gate has
been read in the current pass raises :class:`~acttransport.errors.ConfigError`.

A diffusion pipeline has its own reader (:class:`ImageGateReader`): one value per image, read
at the first denoising step and kept for the later ones.
"""

from __future__ import annotations

from typing import Any

import inspect

import torch
from torch import Tensor, nn

from .errors import ConfigError, ModuleMatchError
from .runners.diffusion import read_timestep
from .targets.layouts import pool
from .targets.names import pick_output
from .transport.gate import Gate

__all__ = ["GateReader", "ImageGateReader", "guidance_halves"]


class GateReader:
    """The state of one gate within one ``steer`` block.

    Args:
        gate: the map's gate.
        mode: ``sequence``, ``token`` or ``position`` (see the module docstring).
        gated: the specs of the mapped modules it gates.

    Attributes:
        history: one entry per prefill (a forward call that starts sequences), in order:
            ``{"score": [B], "open": [B]}`` — each row's prompt score and gate value (in token
            and position mode the value at the prompt's last token) — and, in token and position
            mode, ``"open_tokens"`` /
            ``"tokens"`` ``[B]``: how many of the row's later (generated) tokens opened it, of how many,
            ``"prompt_open"`` ``[B, T]``: its value at each prompt position (0 at padding) and
            ``"prompt_tokens"`` ``[B]``: the prompt's real tokens.
    """

    def __init__(self, gate: Gate, mode: str, gated: list[str]) -> None:
        self.gate, self.mode, self.gated = gate, mode, list(gated)
        self.mask: Tensor | None = None  # the call's attention mask, [B, past + T]
        self.start: int | None = None  # tokens already in the cache (cache_position, cache length or position_ids), for a call without a mask
        self.values: Tensor | None = None  # [B] (sequence) or [B, T] (token, position) for the current pass
        self.pending: set[str] = set()  # mapped modules that have not read the current values yet
        self.kept: Tensor | None = None  # sequence mode: the prefill's values, kept for decoding
        self.sums: Tensor | None = None  # token mode: running sums [B, d]; token and position mode: counts [B]
        self.counts: Tensor | None = None
        self.history: list[dict[str, Tensor]] = []
        self.ids: Tensor | None = None  # the call's input_ids [B, T], when given
        self.seen: Tensor | None = None  # the last call's input_ids when it ran the whole sequence (past 0)

    def _regrown(self, past: int, x: Tensor) -> int:
        """For a call that runs its whole sequence (``past == 0``; gate output ``x`` ``[B, T, d]``):
        the length of the previous such call when this one repeats its tokens and adds more
        (``generate(use_cache=False)`` re-runs prompt + generated tokens at each step), else 0
        (a new prompt)."""
        prev, ids = self.seen, self.ids
        if ids is not None and ids.shape != x.shape[:2]:
            ids = None
        self.seen = ids if past == 0 else None
        if past or prev is None or ids is None or ids.shape[0] != prev.shape[0] or ids.shape[1] <= prev.shape[1]:
            return 0
        return prev.shape[1] if torch.equal(ids[:, : prev.shape[1]].to(prev.device), prev) else 0

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (``with_kwargs=True``) on the model: remembers the call's mask."""
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 and isinstance(args[1], Tensor) else None)
        self.mask = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None
        self.start = _past_length(kwargs)
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        self.ids = ids if isinstance(ids, Tensor) and ids.ndim == 2 else None
        self.values, self.pending = None, set()

    def read(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook on the gate's module: scores this pass's tokens."""
        x = pick_output(output, self.gate.module)
        if x.ndim != 3:
            raise ModuleMatchError(f"the gate reads {self.gate.module}, whose output has shape {tuple(x.shape)}; "
                                   "a causal LM's gate needs a [batch, tokens, units] output")
        if x.shape[-1] != self.gate.width:
            raise ModuleMatchError(f"the gate was fitted on {self.gate.width} units of {self.gate.module}, which outputs {x.shape[-1]}")
        b, t = x.shape[:2]
        if self.mask is not None:
            past = self.mask.shape[1] - t
            if past < 0 or self.mask.shape[0] != b:
                raise ModuleMatchError(f"attention mask {tuple(self.mask.shape)} does not line up with {self.gate.module}'s "
                                       f"output {tuple(x.shape)}")
            real = self.mask[:, past:].to(device=x.device, dtype=torch.float64)  # [B, T]
        else:
            past = self.start or 0
            real = torch.ones(b, t, dtype=torch.float64, device=x.device)
        xd = x.detach().double() * real[..., None]
        grown = self._regrown(past, x)  # > 0: the previous call's rows re-run without a cache, longer
        if self.mode == "sequence":
            if past == 0 and not (grown and self.kept is not None and self.kept.shape[0] == b):
                z = xd.sum(1) / real.sum(1, keepdim=True).clamp_min(1)
                score = self.gate.score(z)
                self.kept = (score > self.gate.threshold).double()
                self.history.append({"score": score.cpu(), "open": self.kept.cpu()})
            elif self.kept is None or self.kept.shape[0] != b:
                raise ConfigError("a decoding step reached the gate without its prompt: run the prompt (prefill) inside the same "
                                  "`steer` block, with the same batch")
            self.values = self.kept
        else:
            if past == 0:
                self.sums = torch.zeros(b, x.shape[-1], dtype=torch.float64, device=x.device)
                self.counts = torch.zeros(b, dtype=torch.float64, device=x.device)
            elif self.counts is None or self.counts.shape[0] != b:
                raise ConfigError("a decoding step reached the gate without its prompt: run the prompt (prefill) inside the same "
                                  "`steer` block, with the same batch")
            counts = self.counts[:, None] + real.cumsum(1)  # [B, T]
            z = xd  # [B, T, d]: position mode scores each position's own vector
            if self.mode == "token":  # ... token mode the running mean
                sums = self.sums[:, None] + xd.cumsum(1)
                z, self.sums = sums / counts.clamp_min(1)[..., None], sums[:, -1]
            scores = self.gate.score(z)  # [B, T]
            vals = (scores > self.gate.threshold).double() * real
            self.counts = counts[:, -1]
            self.values = vals
            if grown and self.history and self.history[-1]["tokens"].shape[0] == b:  # the same rows re-run, longer
                h = self.history[-1]
                h["open_tokens"] += vals[:, grown:].sum(1).cpu()
                h["tokens"] += real[:, grown:].sum(1).cpu()
            elif past == 0:
                zeros = torch.zeros(b, dtype=torch.float64)
                last = _at_last(scores, real).cpu()  # the score at each row's last real token
                self.history.append({"score": last, "open": (last > self.gate.threshold).double(), "open_tokens": zeros, "tokens": zeros.clone(),
                                     "prompt_open": vals.cpu(), "prompt_tokens": real.sum(1).cpu()})
            elif self.history:
                h = self.history[-1]
                h["open_tokens"] += vals.sum(1).cpu()
                h["tokens"] += real.sum(1).cpu()
        self.pending = set(self.gated)

    def weights(self, spec: str, x: Tensor) -> Tensor:
        """The gate values for mapped module ``spec``'s output ``x`` (``[B, T, d]`` or ``[B, d]``),
        shaped to broadcast against it: ``[B, 1, 1]`` / ``[B, 1]`` or ``[B, T, 1]`` (token mode).

        Raises:
            ConfigError: the gate has not been read in this forward pass before ``spec`` ran.
        """
        if self.values is None or spec not in self.pending:
            raise ConfigError(f"{spec} ran before the gate's module {self.gate.module} in this forward pass; the gate must be read "
                              "before the modules it gates: fit the gate on the earliest mapped module (the default) or an earlier one")
        self.pending.discard(spec)
        v = self.values
        if v.shape[0] != x.shape[0]:
            raise ModuleMatchError(f"{spec} got a batch of {x.shape[0]} rows but the gate read {v.shape[0]}")
        if v.ndim == 1:
            return v.reshape(-1, *([1] * (x.ndim - 1)))
        if x.ndim != 3 or x.shape[1] != v.shape[1]:
            raise ModuleMatchError(f"token-mode gating needs {spec}'s output to be [batch, tokens, units] with the gate module's "
                                   f"{v.shape[1]} tokens, got {tuple(x.shape)}; use gate='sequence'")
        return v[..., None]


def _at_last(scores: Tensor, real: Tensor) -> Tensor:
    """``scores`` ``[B, T]`` at each row's last real position (``real`` ``[B, T]``, 1 for a real
    token; left or right padding); the last position for a row with none."""
    t = real.shape[1]
    last = t - 1 - torch.flip((real > 0).long(), dims=[1]).argmax(dim=1)
    return scores[torch.arange(scores.shape[0], device=scores.device), last]


def _past_length(kwargs: dict) -> int | None:
    """How many tokens the call's rows already hold in the KV cache (0: a prefill), for a call
    without an attention mask; None when the call does not say.

    ``generate`` in recent transformers passes neither a mask (for an unpadded batch) nor a
    ``cache_position``, only ``position_ids`` and the cache object, so the sources are tried in
    turn: ``cache_position[0]``; the cache's length (``get_seq_length()`` of a ``Cache`` under
    ``past_key_values`` or ``cache``, or ``[layer][0].shape[-2]`` of a legacy tuple), read before
    the call appends to it; ``position_ids[:, 0]`` (a call without a mask has no padding).
    """
    pos = kwargs.get("cache_position")
    if isinstance(pos, Tensor) and pos.numel():
        return int(pos.flatten()[0])
    for key in ("past_key_values", "cache"):
        cache = kwargs.get(key)
        if cache is None:
            continue
        if callable(getattr(cache, "get_seq_length", None)):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)):
            if not cache:
                return 0
            first = cache[0]
            if isinstance(first, (tuple, list)) and first and isinstance(first[0], Tensor) and first[0].ndim >= 2:
                return int(first[0].shape[-2])
    ids = kwargs.get("position_ids")
    if isinstance(ids, Tensor) and ids.ndim >= 1 and ids.numel():
        return int(ids.reshape(-1, ids.shape[-1])[:, 0].min())
    return None


def guidance_halves(pipe: Any, denoiser: nn.Module, args: tuple, kwargs: dict) -> bool | None:
    """Whether a denoiser call's batch is ``[unconditional; conditional]`` (classifier-free
    guidance); None when it cannot be told.

    A pipeline class that defines ``do_classifier_free_guidance`` (Stable Diffusion, SDXL, SD3,
    the toy pipeline) says so itself during its call (on SD a property reading the call's
    ``_guidance_scale``: look it up on the class, the instance has no value before a call).
    Others (PixArt keeps it in a local variable) are read from the batch: guidance runs the
    same latents twice, ``cat([latents] * 2)``, so the two halves of the denoiser's sample
    input are equal, while their text states (``encoder_hidden_states``) differ. Halves equal in
    both cannot be told apart from two identical images without guidance: None.
    """
    if hasattr(type(pipe), "do_classifier_free_guidance"):
        return bool(pipe.do_classifier_free_guidance)
    try:
        bound = inspect.signature(denoiser.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = kwargs
    x = bound.get("sample", bound.get("hidden_states", args[0] if args else None))
    if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[0] % 2:
        return False
    h = x.shape[0] // 2
    if not torch.equal(x[:h], x[h:]):
        return False
    c = bound.get("encoder_hidden_states")
    if isinstance(c, Tensor) and c.ndim and c.shape[0] == x.shape[0] and not torch.equal(c[:h], c[h:]):
        return True
    return None


class ImageGateReader:
    """The state of one gate within one ``steer`` block on a diffusion pipeline: per image, read
    from the gate module's output at the first denoising step of each pipeline call (pooled over
    positions; with classifier-free guidance from the conditional half) and kept for the call's
    later steps, where it scales both halves of the image's rows.

    A new pipeline call is recognised by its timestep: the denoiser's timesteps fall within one
    call, so a timestep no smaller than the previous one starts a new call.

    Args:
        gate: the map's gate.
        gated: the specs of the mapped modules it gates.
        pipe: the pipeline (whether the batch is ``[unconditional, conditional]`` is read per
            denoiser call, :func:`guidance_halves`).

    Attributes:
        history: one entry per pipeline call, ``{"score": [B], "open": [B]}`` per image.
    """

    def __init__(self, gate: Gate, gated: list[str], pipe: Any) -> None:
        self.gate, self.gated, self.pipe = gate, list(gated), pipe
        self.prev: float | None = None
        self.fresh = False  # a call has started and the gate has not been read in it yet
        self.values: Tensor | None = None  # [B'] for the denoiser's batch (B' = 2B with guidance)
        self.cfg = False  # whether the current denoiser call's batch is [unconditional; conditional]
        self.pending: set[str] = set()
        self.history: list[dict[str, Tensor]] = []

    def pre_denoiser(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (``with_kwargs=True``) on the denoiser: a new call at a non-falling timestep."""
        t = read_timestep(module, args, kwargs)
        if self.prev is None or t >= self.prev:
            self.fresh, self.values = True, None
        self.prev = t
        # two identical halves without telling text states: either way each image scores the same
        self.cfg = guidance_halves(self.pipe, module, args, kwargs) is not False
        self.pending = set(self.gated)

    def read(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook on the gate's module: scores each image at a call's first step."""
        if not self.fresh:
            return
        x = pick_output(output, self.gate.module)
        cfg = self.cfg and x.shape[0] % 2 == 0
        xc = x[x.shape[0] // 2 :] if cfg else x
        if xc.ndim not in (3, 4) or xc.shape[1 if xc.ndim == 4 else -1] != self.gate.width:
            raise ModuleMatchError(f"the gate was fitted on {self.gate.width} units of {self.gate.module}, whose output has shape {tuple(x.shape)}")
        z = pool(xc, torch.ones(xc.shape[:2], device=xc.device) if xc.ndim == 3 else None, "mean")
        score = self.gate.score(z)
        opened = (score > self.gate.threshold).double()
        self.history.append({"score": score.cpu(), "open": opened.cpu()})
        self.values = opened.repeat(2) if cfg else opened
        self.fresh = False

    def weights(self, spec: str, x: Tensor) -> Tensor:
        """The gate values ``[B', 1, ...]`` for mapped module ``spec``'s output ``x``.

        Raises:
            ConfigError: ``spec`` ran before the gate's module at a call's first step.
        """
        if self.fresh or self.values is None or spec not in self.pending:
            raise ConfigError(f"{spec} ran before the gate's module {self.gate.module} in this denoising step; the gate must be read "
                              "before the modules it gates: fit the gate on the earliest mapped module (the default) or an earlier one")
        self.pending.discard(spec)
        if self.values.shape[0] != x.shape[0]:
            raise ModuleMatchError(f"{spec} got a batch of {x.shape[0]} rows but the gate read {self.values.shape[0]}")
        return self.values.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
