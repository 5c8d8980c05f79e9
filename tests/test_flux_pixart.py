"""FLUX and PixArt proven on tiny random pipelines of the real diffusers classes: the default
``@blocks`` preset, estimate → save → load → steer, per-step maps, λ = 0 bit-exact, and (FLUX)
single-stream blocks steered on their image tokens only."""

from __future__ import annotations

import pytest
import torch

import acttransport as at
from acttransport.artifact import TransportConfig, TransportMap
from acttransport.errors import ConfigError
from acttransport.runners import DiffusionRunner
from acttransport.targets import add_hooks, remove_hooks
from acttransport.transport import ModuleMap
from tiny_pipelines import FLUX_KW, PIXART_KW, tiny_flux, tiny_pixart

SRC = ["a red circle", "a red square", "a blue circle", "a green triangle", "a cat", "a dog"]
TGT = [p + " striped style" for p in SRC]
PROMPTS = ["a red circle", "a photo of a dog"]
STEPS = 3
KINDS = {"flux": (tiny_flux, FLUX_KW), "pixart": (tiny_pixart, PIXART_KW)}
BLOCKS = {
    "flux": ["transformer.transformer_blocks.0:1", "transformer.single_transformer_blocks.0:1", "transformer.single_transformer_blocks.1:1"],
    "pixart": ["transformer.transformer_blocks.0", "transformer.transformer_blocks.1"],
}


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request, tmp_path_factory):
    build, kw = KINDS[request.param]
    return request.param, build(tmp_path_factory.mktemp(request.param)), kw


def images(pipe, kw, prompts=PROMPTS):
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=3.0, generator=gens, output_type="pt", **kw).images


def no_hooks(pipe) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in pipe.transformer.modules())


def runner(pipe, kw, batch_size=4):
    return DiffusionRunner(pipe, num_inference_steps=STEPS, guidance_scale=3.0, batch_size=batch_size, **kw)


def test_estimate_save_load_steer_per_step(kind, tmp_path):
    name, pipe, kw = kind
    assert at.match_modules(pipe, "@blocks") == BLOCKS[name]
    tmap = at.estimate(runner(pipe, kw), source=SRC, target=TGT, support="all", steps="each", progress=False)  # default: @blocks
    assert tmap.modules == BLOCKS[name] and tmap.config.denoiser == "transformer"
    assert all(m.steps == STEPS for m in tmap.maps.values()) and len(tmap.config.timesteps) == STEPS
    assert tmap.config.runner["pipeline"] == type(pipe).__name__
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    assert all(m.width == width for m in tmap.maps.values())
    tmap.save(tmp_path / "m")
    loaded = at.load(tmp_path / "m", model=pipe)
    assert loaded.config.timesteps == tmap.config.timesteps
    for spec in tmap.modules:
        assert torch.equal(loaded.maps[spec].shift, tmap.maps[spec].shift)
    base = images(pipe, kw)
    with at.steer(pipe, loaded, 0.0):
        assert torch.equal(images(pipe, kw), base)  # λ = 0: bit-identical images
    with at.steer(pipe, loaded, 1.0):
        steered = images(pipe, kw)
        assert not no_hooks(pipe)
    assert no_hooks(pipe) and not torch.equal(steered, base)
    assert torch.equal(images(pipe, kw), base)
    with pytest.raises(KeyError, match="boom"):
        with at.steer(pipe, loaded, 1.0):
            raise KeyError("boom")
    assert no_hooks(pipe) and torch.equal(images(pipe, kw), base)


def _outputs(pipe, kw, spec_name):
    """Every output of module ``spec_name`` over one image call (whole tuples, cloned)."""
    seen = []

    def hook(m, a, out):
        seen.append(tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone())

    handles = add_hooks(pipe, [spec_name], lambda s: hook)
    try:
        images(pipe, kw)
    finally:
        remove_hooks(handles)
    return seen


def _shift_and_identity(pipe, shift=0.5):
    """Two maps of the transformer's width: every unit moved by ``shift``, and the identity."""
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    lo, hi = torch.full((width,), -torch.inf), torch.full((width,), torch.inf)
    ident, moved = ModuleMap(torch.ones(width), torch.zeros(width), lo, hi), ModuleMap(torch.ones(width), torch.full((width,), shift), lo, hi)
    return moved, ident


def test_flux_single_stream_blocks_steer_the_image_tokens_only(tmp_path):
    """A single-stream block attends over [text; image] tokens and returns both parts; a map on
    it moves the image part by exactly its shift and leaves the text part bit for bit, at the
    step it is for, and nothing at the steps before it (after it the latents differ, so both
    parts do)."""
    pipe, kw = tiny_flux(tmp_path), FLUX_KW
    spec, k = "transformer.single_transformer_blocks.1:1", 1
    probe = runner(pipe, kw)
    probe.forward(probe.probe())
    moved, ident = _shift_and_identity(pipe)
    tmap = TransportMap({spec: ModuleMap.stack([moved if s == k else ident for s in range(STEPS)])},
                        TransportConfig(steps="each", timesteps=tuple(probe.timesteps), denoiser="transformer"))
    block = "transformer.single_transformer_blocks.1"
    plain = _outputs(pipe, kw, block)
    with at.steer(pipe, tmap, 1.0):
        steered = _outputs(pipe, kw, block)  # the recording hook runs after the steering one
    assert len(plain) == len(steered) == STEPS
    text_len, image_len = plain[0][0].shape[1], plain[0][1].shape[1]
    assert text_len == FLUX_KW["max_sequence_length"] and image_len == 16  # 16×16 pixels → 8×8 latents → 4×4 packed tokens
    for s in range(k):
        assert torch.equal(steered[s][0], plain[s][0]) and torch.equal(steered[s][1], plain[s][1])
    assert torch.equal(steered[k][0], plain[k][0])  # the text tokens of the steered output: bit for bit
    torch.testing.assert_close(steered[k][1], plain[k][1] + 0.5)  # the image tokens: moved by the shift
    assert not torch.equal(steered[k + 1][1], plain[k + 1][1])  # later steps start from other latents
    assert no_hooks(pipe)


def test_flux_fit_pools_the_image_tokens_only(tmp_path):
    """What estimation collects at a single-stream block is the mean over its image tokens."""
    pipe, kw = tiny_flux(tmp_path), FLUX_KW
    spec = "transformer.single_transformer_blocks.0:1"
    got = at.collect(runner(pipe, kw, batch_size=2), texts=PROMPTS, modules=spec, progress=False)[spec]  # [n, S, d]
    outs = _outputs(pipe, kw, "transformer.single_transformer_blocks.0")
    want = torch.stack([o[1].float().mean(1) for o in outs], 1)  # [n, S, d]: image tokens pooled, text left out
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    text_pooled = torch.stack([o[0].float().mean(1) for o in outs], 1)
    assert not torch.allclose(got, text_pooled)


def _pixart_first_outputs(pipe, halves):
    """Block 0's first output (step 0, [uncond; cond] rows) plain and under a map that adds 1 to every unit."""
    spec = "transformer.transformer_blocks.0"
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    lo, hi = torch.full((width,), -torch.inf), torch.full((width,), torch.inf)
    shared = TransportMap({spec: ModuleMap(torch.ones(width), torch.ones(width), lo, hi)}, TransportConfig(denoiser="transformer"))
    plain = _outputs(pipe, PIXART_KW, spec)[0]
    with at.steer(pipe, shared, 1.0, halves=halves):
        steered = _outputs(pipe, PIXART_KW, spec)[0]
    assert plain.shape[0] == 2 * len(PROMPTS)  # PixArt batches [unconditional, conditional] like SD
    return plain, steered


def test_pixart_blocks_carry_image_tokens_and_both_halves_are_steered(tmp_path):
    plain, steered = _pixart_first_outputs(tiny_pixart(tmp_path), "both")
    assert plain.shape[1:] == (16, 16)  # 8×8 latents, patch 2 → 16 image tokens of width 16; no text tokens
    torch.testing.assert_close(steered, plain + 1.0)


def test_pixart_halves_cond_spares_the_unconditional_half(tmp_path):
    """PixArt has no ``do_classifier_free_guidance`` (guidance is a local variable of its call):
    guidance is read from the denoiser's batch, whose two halves carry the same latents."""
    plain, steered = _pixart_first_outputs(tiny_pixart(tmp_path), "cond")
    b = len(PROMPTS)
    assert torch.equal(steered[:b], plain[:b])
    torch.testing.assert_close(steered[b:], plain[b:] + 1.0)


def test_pixart_halves_cond_without_guidance_steers_every_image_and_refuses_a_batch_it_cannot_tell(tmp_path):
    pipe = tiny_pixart(tmp_path)
    spec = "transformer.transformer_blocks.0"
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    lo, hi = torch.full((width,), -torch.inf), torch.full((width,), torch.inf)
    shared = TransportMap({spec: ModuleMap(torch.ones(width), torch.ones(width), lo, hi)}, TransportConfig(denoiser="transformer"))

    def first(prompts, seeds):
        seen = []
        handles = add_hooks(pipe, [spec], lambda s: lambda m, a, out: seen.append(out.clone()))
        try:
            pipe(prompts, num_inference_steps=STEPS, guidance_scale=1.0, generator=[torch.Generator().manual_seed(i) for i in seeds],
                 output_type="pt", **PIXART_KW)
        finally:
            remove_hooks(handles)
        return seen[0]

    plain = first(PROMPTS, [0, 1])
    with at.steer(pipe, shared, 1.0, halves="cond"):
        steered = first(PROMPTS, [0, 1])
    assert plain.shape[0] == len(PROMPTS)  # guidance 1: no unconditional half, every row is an image's conditional row
    torch.testing.assert_close(steered, plain + 1.0)
    # two identical images (same prompt, same noise) without guidance look like [uncond; cond] of one: refused, not guessed
    with at.steer(pipe, shared, 1.0, halves="cond"), pytest.raises(ConfigError, match="halves='both'"):
        first(["a cat", "a cat"], [0, 0])
    assert no_hooks(pipe)


def test_a_pixart_gate_reads_each_image_from_the_conditional_half(tmp_path):
    """The gate scores each image once, from the conditional half of the guided batch, and its
    value scales both halves of that image's rows (PixArt has no ``do_classifier_free_guidance``)."""
    from acttransport.steer import gate_history
    from acttransport.transport.gate import Gate

    pipe = tiny_pixart(tmp_path)
    spec = "transformer.transformer_blocks.0"
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    plain = _outputs(pipe, PIXART_KW, spec)[0]  # [uncond; cond] rows, [2B, N, d]
    b = len(PROMPTS)
    gate = Gate("probe", spec, {"weight": torch.linspace(-1, 1, width), "bias": torch.tensor(0.0)}, threshold=0.0)
    scores = gate.score(plain[b:].mean(1))  # each image's conditional rows, pooled
    gate = gate.replace(threshold=float(scores.mean()))  # between the two images: the higher one opens
    lo, hi = torch.full((width,), -torch.inf), torch.full((width,), torch.inf)
    tmap = TransportMap({spec: ModuleMap(torch.ones(width), torch.ones(width), lo, hi)}, TransportConfig(denoiser="transformer"), gate=gate)
    with at.steer(pipe, tmap, 1.0, halves="both"):
        steered = _outputs(pipe, PIXART_KW, spec)[0]
        hist = gate_history(pipe)
    assert len(hist) == 1 and hist[0]["score"].shape == (b,)
    torch.testing.assert_close(hist[0]["score"], scores, atol=1e-5, rtol=1e-5)
    opened = (scores > gate.threshold).tolist()
    assert sorted(opened) == [False, True]
    for i, o in enumerate(opened):
        for row in (i, b + i):  # both halves of image i
            if o:
                torch.testing.assert_close(steered[row], plain[row] + 1.0)
            else:
                assert torch.equal(steered[row], plain[row])
