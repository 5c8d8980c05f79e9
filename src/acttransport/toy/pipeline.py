"""A tiny pixel-space text-to-image diffusion pipeline (no VAE) for 16×16 toy images.

:class:`ToyTextToImagePipeline` is a :class:`diffusers.DiffusionPipeline` with the modules of
Stable Diffusion minus the VAE: ``unet`` (``UNet2DConditionModel``), ``text_encoder`` (a tiny
``CLIPTextModel``), ``tokenizer`` (a word-level ``PreTrainedTokenizerFast`` whose vocabulary is
written out by hand, so ids never depend on the process) and ``scheduler`` (``DDIMScheduler``).
Its ``__call__`` follows ``StableDiffusionPipeline``'s conventions, so hooks and callbacks
written for Stable Diffusion carry over.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from .render import IMAGE_SIZE, caption_words
from .weights import PIPELINE_FILES, require_files

__all__ = [
    "MAX_TOKENS", "PREDICTION", "SPECIAL_TOKENS", "ToyTextToImagePipeline", "build_tokenizer", "load_toy_pipeline",
    "sampling_scheduler", "text_encoder_config", "tiny_random_pipeline", "training_scheduler",
    "unet_config",
]

MAX_TOKENS = 16
PREDICTION = "epsilon"
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer from the fixed vocabulary (specials, then caption words).

    Ids are fixed by the order of :data:`SPECIAL_TOKENS` and ``render.caption_words()``.
    Text is lower-cased and split on whitespace and punctuation; unknown words map to ``<unk>``;
    every sequence is wrapped as ``<bos> ... <eos>``.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``model_max_length = MAX_TOKENS``.
    """
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *caption_words()])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=MAX_TOKENS,
    )


def text_encoder_config(tokenizer: PreTrainedTokenizerFast, hidden: int = 32, layers: int = 2,
                        heads: int = 4) -> CLIPTextConfig:
    """Config of the tiny CLIP text encoder matching ``tokenizer``."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=MAX_TOKENS,
        projection_dim=hidden, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def unet_config(tiny: bool = False, cross_attention_dim: int = 32) -> dict[str, Any]:
    """Keyword arguments of the ``UNet2DConditionModel`` (about 1M parameters; ``tiny``: ~65k)."""
    width = (8, 16) if tiny else (32, 64)
    return dict(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, block_out_channels=width,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        attention_head_dim=4 if tiny else 8, norm_num_groups=4 if tiny else 8,
        cross_attention_dim=cross_attention_dim,
    )


def training_scheduler() -> dict[str, Any]:
    """DDPM noise schedule used for training (1000 steps, cosine, epsilon prediction)."""
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=PREDICTION)


def sampling_scheduler() -> DDIMScheduler:
    """DDIM sampler over the training schedule, with ``"leading"`` spacing and ``steps_offset=1``.

    ("trailing" spacing starts at t = 999, where the cosine schedule is pure noise and samples
    saturate.) The predicted clean sample is not clipped to [-1, 1]: with guidance 3 the early,
    high-noise predictions overshoot, and clipping them (then re-deriving the noise from the
    clipped sample) derails the trajectory; measured on the judge, clipping cost 0.1–0.2 accuracy.
    """
    return DDIMScheduler(**training_scheduler(), timestep_spacing="leading", steps_offset=1,
                         clip_sample=False, set_alpha_to_one=True)


class ToyTextToImagePipeline(DiffusionPipeline):
    """Pixel-space text-to-image diffusion on 16×16 RGB images.

    Args:
        unet: denoiser taking ``[B, 3, 16, 16]`` samples and ``[B, T, D]`` text states.
        text_encoder: ``CLIPTextModel``; its ``last_hidden_state`` ``[B, T, D]`` conditions the UNet.
        tokenizer: word-level tokenizer (pads to ``MAX_TOKENS``).
        scheduler: a diffusers scheduler (``DDIMScheduler`` as shipped).
    """

    model_cpu_offload_seq = "text_encoder->unet"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                 tokenizer: PreTrainedTokenizerFast, scheduler: DDIMScheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self._guidance_scale = 1.0

    @property
    def guidance_scale(self) -> float:
        """Guidance scale of the current (or last) call."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current call batches an unconditional half (``guidance_scale > 1``)."""
        return self._guidance_scale > 1.0

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``[len(texts), MAX_TOKENS]`` (padded with ``<pad>``, truncated)."""
        return self.tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                              return_tensors="pt").input_ids

    def _embed(self, texts: list[str], device: torch.device) -> torch.Tensor:
        ids = self.tokenize(texts).to(device)
        return self.text_encoder(ids, return_dict=True).last_hidden_state

    def encode_prompt(
        self, prompt: str | list[str] | None, device: torch.device | str | None = None,
        num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None, prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode prompts (and the unconditional text) into text-encoder states.

        Args:
            prompt: one prompt or a list (ignored when ``prompt_embeds`` is given).
            device: device of the outputs; defaults to the pipeline's.
            num_images_per_prompt: each prompt's states are repeated this many times (consecutively).
            do_classifier_free_guidance: also return unconditional states.
            negative_prompt: unconditional text(s); ``None`` means the empty string ``""``.
            prompt_embeds: precomputed ``[B, T, D]`` states.
            negative_prompt_embeds: precomputed unconditional ``[B, T, D]`` states.

        Returns:
            ``(prompt_embeds, negative_prompt_embeds)``, each ``[B * num_images_per_prompt, T, D]``;
            the second is ``None`` without guidance.
        """
        device = torch.device(device) if device is not None else self._execution_device
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self._embed(prompts, device)
        batch = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            neg = [""] * batch if negative_prompt is None else (
                [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt))
            if len(neg) != batch:
                raise ValueError(f"negative_prompt has {len(neg)} entries for {batch} prompts")
            negative_prompt_embeds = self._embed(neg, device)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        else:
            negative_prompt_embeds = None
        return prompt_embeds, negative_prompt_embeds

    def prepare_extra_step_kwargs(self, generator: Any, eta: float) -> dict[str, Any]:
        """``eta`` and ``generator`` for ``scheduler.step`` where its signature takes them."""
        params = set(inspect.signature(self.scheduler.step).parameters)
        extra: dict[str, Any] = {}
        if "eta" in params:
            extra["eta"] = eta
        if "generator" in params and eta > 0:
            extra["generator"] = generator
        return extra

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple[Any]:
        """Generate images from text.

        Args:
            prompt: one prompt or a list of ``P`` prompts.
            negative_prompt: unconditional text(s) for guidance; ``None`` means ``""``.
            num_inference_steps: scheduler steps.
            guidance_scale: classifier-free guidance weight; ``<= 1`` runs the conditional batch only.
            num_images_per_prompt: ``N``; the batch is ``B = P * N`` (images of a prompt consecutive).
            eta: DDIM noise weight (0 = deterministic given the initial noise).
            generator: one ``torch.Generator`` or a list of ``B`` (one per image, for per-image seeds).
            latents: initial noise ``[B, 3, 16, 16]`` (else drawn with ``generator``).
            prompt_embeds: precomputed text states ``[P, T, D]`` instead of ``prompt``.
            negative_prompt_embeds: precomputed unconditional states ``[P, T, D]``.
            output_type: ``"pt"`` (``[B, 3, 16, 16]`` in [0, 1]), ``"np"`` (``[B, 16, 16, 3]``
                float in [0, 1]), ``"pil"`` (list of images) or ``"latent"`` (raw samples in [-1, 1]).
            return_dict: return an ``ImagePipelineOutput`` (else a 1-tuple).
            callback_on_step_end: ``fn(pipe, step_index, timestep, callback_kwargs) -> dict`` called
                after each step; returned ``latents`` / ``prompt_embeds`` / ``negative_prompt_embeds``
                replace the current ones.
            callback_on_step_end_tensor_inputs: keys put in ``callback_kwargs`` (default ``["latents"]``).

        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)``.
        """
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be in "
                             f"{self._callback_tensor_inputs}, not {bad}")
        if output_type not in ("pt", "np", "pil", "latent"):
            raise ValueError(f"output_type must be 'pt', 'np', 'pil' or 'latent', not {output_type!r}")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give prompt or prompt_embeds")
        self._guidance_scale = float(guidance_scale)
        device = self._execution_device
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds, negative_prompt_embeds,
        )
        batch = prompt_embeds.shape[0]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch} images")

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        shape = (batch, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, not {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=prompt_embeds.dtype) * self.scheduler.init_noise_sigma
        extra = self.prepare_extra_step_kwargs(generator, eta)

        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                cfg = self.do_classifier_free_guidance
                model_in = torch.cat([latents] * 2) if cfg else latents
                model_in = self.scheduler.scale_model_input(model_in, t)
                states = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
                noise_pred = self.unet(model_in, t, encoder_hidden_states=states, return_dict=False)[0]
                if cfg:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + self._guidance_scale * (noise_text - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_inputs}) or {}
                    latents = out.pop("latents", latents)
                    prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = out.pop("negative_prompt_embeds", negative_prompt_embeds)
                bar.update()

        images: Any = latents
        if output_type != "latent":
            images = (latents / 2 + 0.5).clamp(0, 1).float()
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def load_toy_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      path: str | Path | None = None, progress: bool = False) -> ToyTextToImagePipeline:
    """Load the shipped (or a ``train_toy``-written) toy pipeline from local files only.

    Args:
        device: where to put the models.
        dtype: parameter dtype.
        path: weights folder; ``None`` for the folder shipped in the package.
        progress: show the per-call denoising progress bar.

    Returns:
        The pipeline in eval mode, with a ``DDIMScheduler`` (20 steps, CFG 3 by default).

    Raises:
        ToyWeightsMissingError: a weights file is missing (the message names the command
            that recreates them).
    """
    root = require_files(path, PIPELINE_FILES, "toy pipeline")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the per-file "Loading weights" bars are noise here
    try:
        pipe = ToyTextToImagePipeline(
            unet=UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True, torch_dtype=dtype),
            text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True, dtype=dtype),
            tokenizer=PreTrainedTokenizerFast.from_pretrained(root / "tokenizer", local_files_only=True),
            scheduler=DDIMScheduler.from_pretrained(root / "scheduler", local_files_only=True),
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(device)


def tiny_random_pipeline(seed: int = 0) -> ToyTextToImagePipeline:
    """Build an untrained pipeline of the same classes with a tiny config (milliseconds; for tests).

    Args:
        seed: seed of the random initialisation.

    Returns:
        A float32 CPU pipeline (UNet widths 8/16, text encoder hidden 16, one layer).
    """
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_encoder_config(tokenizer, hidden=16, layers=1, heads=2))
        unet = UNet2DConditionModel(**unet_config(tiny=True, cross_attention_dim=16))
    pipe = ToyTextToImagePipeline(unet=unet.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                  scheduler=sampling_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
