"""The runner of a diffusers text-to-image pipeline (a UNet or a diffusion transformer).

Inputs are prompts; one forward call is one pipeline call on a batch of prompts, each with its
own generator seed (``seed + position``), so a prompt gets the same noise whatever the
batching. Modules of the denoiser run once per denoising step (``repeated = True``): each step
is its own site. With classifier-free guidance diffusers stacks ``[unconditional,
conditional]`` along the batch; :meth:`DiffusionRunner.pool` keeps the conditional half.
Feature maps ``[B, C, H, W]`` are pooled over H×W, image tokens ``[B, N, d]`` over all tokens.

diffusers is never imported here: the pipeline is used through its call signature and its
``components``.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ModuleMatchError
from ..options import NUM_INFERENCE_STEPS
from ..targets.layouts import pool
from ..targets.names import denoiser_name, module_tree
from .base import Batch

__all__ = ["PROBE_PROMPT", "DiffusionRunner", "read_timestep"]

PROBE_PROMPT = "a photo"


def read_timestep(denoiser: nn.Module, args: tuple, kwargs: dict[str, Any]) -> float:
    """The timestep a denoiser call was given (``timestep`` argument; first element of a tensor).

    Raises:
        ModuleMatchError: the call has no ``timestep`` argument.
    """
    try:
        bound = inspect.signature(denoiser.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = kwargs
    t = bound.get("timestep", bound.get("timesteps"))
    if t is None:
        raise ModuleMatchError(f"{type(denoiser).__name__} was called without a timestep; cannot tell the denoising step")
    return float(t.flatten()[0]) if isinstance(t, Tensor) else float(t)


class DiffusionRunner:
    """Runs prompts through a text-to-image pipeline for estimation.

    Args:
        pipe: a diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
            ``StableDiffusion3Pipeline``, ``FluxPipeline``, ``PixArtAlphaPipeline``, the toy
            pipeline, ...).
        num_inference_steps: denoising steps per image (a per-step map is fitted for this schedule;
            default :data:`~acttransport.options.NUM_INFERENCE_STEPS`).
        guidance_scale: classifier-free guidance weight; None: the pipeline's default.
        batch_size: prompts per pipeline call.
        seed: image k of the input list is drawn with ``torch.Generator().manual_seed(seed + k)``.
        **call_kwargs: more keyword arguments of every pipeline call (``height``, ``width``, ...).

    Raises:
        ConfigError: the pipeline has no UNet / transformer component.
    """

    repeated = True

    def __init__(self, pipe: Any, num_inference_steps: int = NUM_INFERENCE_STEPS, guidance_scale: float | None = None, batch_size: int = 8,
                 seed: int = 0, **call_kwargs: Any) -> None:
        self.pipe, self.model = pipe, module_tree(pipe)
        self.denoiser = denoiser_name(pipe)
        if self.denoiser is None:
            raise ConfigError(f"{type(pipe).__name__} has no unet or transformer component; it is not a diffusion pipeline acttransport can run")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        self.steps, self.guidance_scale, self.batch_size, self.seed = num_inference_steps, guidance_scale, batch_size, seed
        self.call_kwargs = dict(call_kwargs)
        self.model_id = getattr(pipe, "acttransport_model_id", None) or getattr(pipe, "name_or_path", None) or type(pipe).__name__
        self.timesteps: list[float] = []  # of the schedule, one per denoiser call (set by running the probe)
        self._output_type = "latent" if isinstance(getattr(pipe, "components", {}).get("vae"), nn.Module) else "pt"
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)  # acttransport shows its own bars

    @property
    def settings(self) -> dict[str, Any]:
        """What a map records about the runs its activations came from."""
        return {"kind": "diffusion", "pipeline": type(self.pipe).__name__, "denoiser": self.denoiser,
                "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale, "seed": self.seed,
                **{k: v for k, v in self.call_kwargs.items() if isinstance(v, (int, float, str, bool))}}

    def batches(self, items: Sequence[str]) -> list[Batch]:
        rows = list(range(len(items)))
        return [Batch(rows[i : i + self.batch_size], {"prompt": [items[j] for j in rows[i : i + self.batch_size]]})
                for i in range(0, len(items), self.batch_size)]

    def forward(self, batch: Batch) -> None:
        """One pipeline call on the batch's prompts. Each call gets its own copy of the scheduler
        (schedulers keep a step counter, and causal estimation interleaves the calls of batches)."""
        call = copy.copy(self.pipe)
        object.__setattr__(call, "scheduler", copy.deepcopy(self.pipe.scheduler))
        kw: dict[str, Any] = {"prompt": batch.inputs["prompt"], "num_inference_steps": self.steps, "output_type": self._output_type,
                              "generator": [torch.Generator().manual_seed(self.seed + r) for r in batch.rows], **self.call_kwargs}
        if self.guidance_scale is not None:
            kw["guidance_scale"] = self.guidance_scale
        if not batch.inputs.get("probe"):
            call(**kw)
            return
        seen: list[float] = []  # the probe records the schedule's timesteps, one per denoiser call
        handle = self.model[self.denoiser].register_forward_pre_hook(lambda m, a, k: seen.append(read_timestep(m, a, k)), with_kwargs=True)
        try:
            call(**kw)
        finally:
            handle.remove()
        self.timesteps = seen

    def pool(self, x: Tensor, batch: Batch, how: str) -> Tensor:
        """``[B, d]`` from a conv map ``[B', C, H, W]`` or image tokens ``[B', N, d]``, B' = B or 2B
        (classifier-free guidance: the conditional half, second, is kept)."""
        b = len(batch.rows)
        if x.shape[0] == 2 * b:
            x = x[b:]
        elif x.shape[0] != b:
            raise ModuleMatchError(f"an output has batch {x.shape[0]} for {b} prompts (expected {b} or {2 * b}); hook a module of the denoiser")
        if x.ndim == 3:
            return pool(x, torch.ones(x.shape[:2], device=x.device), how)
        return pool(x, None, how)

    def probe(self) -> Batch:
        """One prompt, run with the same settings; it records :attr:`timesteps`."""
        return Batch([0], {"prompt": [PROBE_PROMPT], "probe": True})
