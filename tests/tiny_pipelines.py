"""Tiny randomly initialised diffusers pipelines of the real classes, built in milliseconds:
Stable Diffusion (UNet2DConditionModel + AutoencoderKL + CLIP), Stable Diffusion 3
(SD3Transformer2DModel, dual-stream blocks, two CLIP encoders, no T5), SDXL, FLUX
(FluxTransformer2DModel: dual- and single-stream blocks, CLIP + T5) and PixArt-Σ
(PixArtTransformer2DModel, T5, cross-attention to the text)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "an", "red", "blue", "green", "circle", "square", "triangle", "striped", "dotted", "plain", "style", "photo", "of", "cat", "dog"]


def clip_tokenizer(folder: Path):
    """A CLIPTokenizer over a hand-written vocabulary (no merges: words split into letters)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz,.":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=48)


def _clip(tok, seed: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=48, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, sample_size=16, layers_per_block=1, shift_factor=0.0, scaling_factor=1.0).eval()


def tiny_sd(folder: Path, seed: int = 0):
    """A StableDiffusionPipeline with an 8×8-latent UNet (2 blocks, 19 GroupNorms); images 16×16."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok = clip_tokenizer(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                layers_per_block=1, attention_head_dim=4, norm_num_groups=4, cross_attention_dim=16).eval()
    sched = DDIMScheduler(clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_vae(seed + 1), text_encoder=_clip(tok, seed + 2), tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3(folder: Path, seed: int = 0):
    """A StableDiffusion3Pipeline with a 2-block SD3Transformer2DModel (blocks return (text, image) tuples)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = clip_tokenizer(folder)
    torch.manual_seed(seed)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                               joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                               pos_embed_max_size=16).eval()
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(seed + 1),
                                    text_encoder=_clip(tok, seed + 2, True), tokenizer=tok, text_encoder_2=_clip(tok, seed + 3, True),
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SIZE = {"height": 16, "width": 16}


def tiny_sdxl(folder: Path, seed: int = 0):
    """A StableDiffusionXLPipeline: two CLIP encoders (the second with projection), a UNet with
    SDXL's text-time conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = clip_tokenizer(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                layers_per_block=1, attention_head_dim=4, norm_num_groups=4, cross_attention_dim=32,
                                addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16).eval()
    pipe = StableDiffusionXLPipeline(vae=_vae(seed + 1), text_encoder=_clip(tok, seed + 2), text_encoder_2=_clip(tok, seed + 3, True),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t5_tokenizer():
    """A real T5Tokenizer (a Unigram model built offline): every word of WORDS whole, anything else in letters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,.\u2581"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _t5(tok, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


#: FLUX's T5 prompt length in the tiny pipeline (the real one pads to 512 tokens).
FLUX_KW = {**SIZE, "max_sequence_length": 16}
#: PixArt: no resolution binning (its bins are for 256..2048-pixel images), no caption cleaning.
PIXART_KW = {**SIZE, "use_resolution_binning": False, "clean_caption": False, "max_sequence_length": 16}


def tiny_flux(folder: Path, seed: int = 0):
    """A FluxPipeline with one dual-stream and two single-stream blocks (both kinds return
    ``(text, image)`` tuples); images 16×16 are 16 packed latent tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok = clip_tokenizer(folder)
    torch.manual_seed(seed)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                                joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(seed + 1), text_encoder=_clip(tok, seed + 2), tokenizer=tok,
                        text_encoder_2=_t5(t5_tokenizer(), seed + 3), tokenizer_2=t5_tokenizer(), transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart(folder: Path, seed: int = 0):
    """A PixArtSigmaPipeline with a 2-block PixArtTransformer2DModel (blocks return image tokens only)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    tr = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
                                  patch_size=2, cross_attention_dim=16, caption_channels=16).eval()
    pipe = PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5(t5_tokenizer(), seed + 2), vae=_vae(seed + 1), transformer=tr,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
