"""Diffusion pipelines: estimate → save → load → steer on tiny random-config diffusers pipelines
(a UNet one and a DiT one), per-step maps at the right step, the classifier-free-guidance halves."""

from __future__ import annotations

import contextlib

import pytest
import torch

import acttransport as at
from acttransport.artifact import TransportConfig, TransportMap
from acttransport.errors import ConfigError, MapFormatError
from acttransport.runners import DiffusionRunner
from acttransport.targets import add_hooks, pick_output, remove_hooks
from acttransport.transport import ModuleMap
from tiny_pipelines import SIZE, tiny_sd, tiny_sd3, tiny_sdxl

SRC = ["a red circle", "a red square", "a blue circle", "a green triangle", "a cat", "a dog"]
TGT = [p + " striped style" for p in SRC]
PROMPTS = ["a red circle", "a photo of a dog"]
STEPS = 3


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("sdtok"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_sd3(tmp_path_factory.mktemp("sd3tok"))


def images(pipe, prompts=PROMPTS, guidance=3.0):
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=guidance, generator=gens, output_type="pt", **SIZE).images


def no_hooks(pipe) -> bool:
    """No hook on the denoiser (transformers' text encoders keep output-recording hooks of their own)."""
    den = pipe.components.get("unet") or pipe.components.get("transformer")
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in den.modules())


def runner(pipe, **kw):
    return DiffusionRunner(pipe, num_inference_steps=STEPS, guidance_scale=3.0, batch_size=4, **SIZE, **kw)


@pytest.fixture(scope="module")
def sd_map(sd):
    return at.estimate(runner(sd), source=SRC, target=TGT, modules="@all-norms", support="all", steps="each", progress=False)


def test_estimate_save_load_steer_on_a_unet_pipeline(sd, sd_map, tmp_path):
    assert len(sd_map.maps) == 21 and all(m.steps == STEPS for m in sd_map.maps.values())  # every GroupNorm, one map per step
    c = sd_map.config
    assert c.steps == "each" and c.denoiser == "unet" and len(c.timesteps) == STEPS and c.runner["num_inference_steps"] == STEPS
    sd_map.save(tmp_path / "m")
    loaded = at.load(tmp_path / "m", model=sd)
    assert loaded.config.timesteps == c.timesteps and loaded.modules == sd_map.modules
    for name in sd_map.modules:
        assert torch.equal(loaded.maps[name].scale, sd_map.maps[name].scale)
    base = images(sd)
    with at.steer(sd, loaded, 0.0):
        assert torch.equal(images(sd), base)  # λ = 0: bit-identical images
    with at.steer(sd, loaded, 1.0):
        steered = images(sd)
        assert not no_hooks(sd)
    assert no_hooks(sd) and not torch.equal(steered, base)
    assert torch.equal(images(sd), base)
    with pytest.raises(KeyError, match="boom"):
        with at.steer(sd, loaded, 1.0):
            raise KeyError("boom")
    assert no_hooks(sd) and torch.equal(images(sd), base)


def test_source_only_causal_maps_land_every_site_on_the_unsteered_target(sd):
    """In sample, with condition='source', support 'all' and the same seeds, the steered
    source's pooled means equal the UNSTEERED target's at every module and step (with
    condition='both' the target itself drifts through the earlier maps, and they do not)."""
    fit_runner = lambda seed: DiffusionRunner(sd, num_inference_steps=STEPS, guidance_scale=3.0, batch_size=12, seed=seed, **SIZE)  # noqa: E731
    src, tgt = SRC, TGT
    worst = {}
    for condition in ("source", "both"):
        tmap = at.estimate(fit_runner(0), source=src, target=tgt, modules="@all-norms", support="all", condition=condition, steps="each",
                           progress=False)
        assert tmap.config.condition == condition
        target = at.collect(fit_runner(len(src)), texts=tgt, modules=tmap.modules, progress=False)  # the target rows' seeds
        with at.steer(sd, tmap, 1.0):
            moved = at.collect(fit_runner(0), texts=src, modules=tmap.modules, progress=False)
        worst[condition] = max(float((moved[m][:, k].mean(0) - target[m][:, k].mean(0)).abs().max()) for m in tmap.modules for k in range(STEPS))
    assert worst["source"] < 1e-5 < 1e-2 < worst["both"]


def test_per_step_maps_act_at_their_own_step_only(sd):
    """A map that is the identity at every step but one changes the module's output at that
    step, and at no step before it."""
    spec, k = "unet.mid_block.resnets.0.norm2", 1
    width = sd.unet.mid_block.resnets[0].norm2.num_channels
    ident = ModuleMap(torch.ones(width), torch.zeros(width), torch.full((width,), -torch.inf), torch.full((width,), torch.inf))
    moved = ModuleMap(torch.ones(width), torch.full((width,), 0.5), ident.lower, ident.upper)
    probe = runner(sd)
    probe.forward(probe.probe())
    tmap = TransportMap({spec: ModuleMap.stack([moved if s == k else ident for s in range(STEPS)])},
                        TransportConfig(steps="each", timesteps=tuple(probe.timesteps), denoiser="unet"))

    def record():
        seen = []
        handles = add_hooks(sd, [spec], lambda s: lambda m, a, out: seen.append(pick_output(out, s).clone()))
        try:
            images(sd)
        finally:
            remove_hooks(handles)
        return seen

    # the steering hook is registered first, so the recording hook sees the steered output
    plain = record()
    with at.steer(sd, tmap, 1.0):
        steered = record()
    assert len(plain) == len(steered) == STEPS
    for s in range(k):
        assert torch.equal(plain[s], steered[s])
    torch.testing.assert_close(steered[k], plain[k] + 0.5)
    with pytest.raises(MapFormatError, match="not a step of the schedule"):
        with at.steer(sd, tmap, 1.0):
            sd(PROMPTS, num_inference_steps=STEPS + 2, generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE)
    assert no_hooks(sd)


def test_fit_uses_the_conditional_half_and_steering_can_spare_the_unconditional_one(sd):
    spec = "unet.down_blocks.0.resnets.0.norm1"
    with_cfg = at.collect(runner(sd), texts=SRC, modules=spec, progress=False)[spec]  # [n, S, d]
    no_cfg = at.collect(DiffusionRunner(sd, num_inference_steps=STEPS, guidance_scale=1.0, **SIZE), texts=SRC, modules=spec, progress=False)[spec]
    torch.testing.assert_close(with_cfg[:, 0], no_cfg[:, 0], rtol=1e-4, atol=1e-5)  # step 0: same latents, the cond half
    width = with_cfg.shape[-1]
    shared = TransportMap({spec: ModuleMap(torch.ones(width), torch.ones(width), torch.full((width,), -torch.inf), torch.full((width,), torch.inf))},
                          TransportConfig(denoiser="unet"))

    def first_call(halves=None):
        seen = []
        with at.steer(sd, shared, 1.0, halves=halves) if halves else contextlib.nullcontext():
            handles = add_hooks(sd, [spec], lambda s: lambda m, a, out: seen.append(pick_output(out, s).clone()))  # after the steering hook
            try:
                images(sd)
            finally:
                remove_hooks(handles)
        return seen[0]

    plain, both, cond = first_call(), first_call("both"), first_call("cond")
    b = len(PROMPTS)
    assert plain.shape[0] == 2 * b  # diffusers stacks [uncond, cond]
    assert torch.equal(cond[:b], plain[:b]) and not torch.equal(cond[b:], plain[b:])
    assert not torch.equal(both[:b], plain[:b])
    with pytest.raises(ConfigError, match="halves"):
        with at.steer(sd, shared, 1.0, halves="uncond"):
            pass


def test_per_image_seeds_do_not_depend_on_the_batching(sd):
    spec = "unet.conv_norm_out"
    one = at.collect(DiffusionRunner(sd, num_inference_steps=STEPS, batch_size=1, **SIZE), texts=SRC[:3], modules=spec, progress=False)[spec]
    three = at.collect(DiffusionRunner(sd, num_inference_steps=STEPS, batch_size=3, **SIZE), texts=SRC[:3], modules=spec, progress=False)[spec]
    torch.testing.assert_close(one, three, rtol=1e-4, atol=1e-5)
    other = at.collect(DiffusionRunner(sd, num_inference_steps=STEPS, batch_size=3, seed=5, **SIZE), texts=SRC[:3], modules=spec, progress=False)[spec]
    assert not torch.allclose(one, other)


@pytest.mark.parametrize("steps", ["first", "all"])
def test_shared_maps_apply_at_any_schedule(sd, steps):
    tmap = at.estimate(runner(sd), source=SRC, target=TGT, modules="unet.mid_block.resnets.0.norm1", steps=steps, support="all", progress=False)
    assert all(m.steps is None for m in tmap.maps.values()) and tmap.config.steps == steps and tmap.config.timesteps == ()
    with at.steer(sd, tmap, 1.0):  # a shared map needs no timestep: another number of steps is fine
        sd(PROMPTS, num_inference_steps=STEPS + 1, generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE)


def test_dit_pipeline_with_dual_stream_blocks(sd3):
    names = at.match_modules(sd3, "@blocks")
    assert names == ["transformer.transformer_blocks.0:1", "transformer.transformer_blocks.1:1"]  # image stream of each block
    tmap = at.estimate(runner(sd3), source=SRC, target=TGT, support="all", steps="each", progress=False)  # default preset: @blocks
    assert tmap.modules == names and tmap.config.denoiser == "transformer" and tmap.maps[names[0]].steps == STEPS
    assert any("@blocks" in n for n in tmap.config.notes)
    base = images(sd3)
    with at.steer(sd3, tmap, 0.0):
        assert torch.equal(images(sd3), base)
    with at.steer(sd3, tmap, 1.0):
        assert not torch.equal(images(sd3), base)
    assert no_hooks(sd3)


def test_modules_outside_the_denoiser_are_refused_with_a_clear_error(sd):
    with pytest.raises(ConfigError, match="denoiser only"):
        at.estimate(runner(sd), source=SRC, target=TGT, modules=["unet.conv_norm_out", "text_encoder.final_layer_norm"], progress=False)
    with pytest.raises(ConfigError, match="brings its own tokenizer"):
        at.estimate(sd, sd.tokenizer, SRC, TGT, "unet.conv_norm_out")


def test_sdxl_with_a_stateful_scheduler_fits_the_same_maps_however_the_batches_interleave(tmp_path):
    """SDXL's Euler scheduler counts its steps; causal estimation runs every batch's pipeline
    call in its own thread, interleaved site by site, so each call gets its own scheduler copy:
    one batch of 12 or 12 batches of 1 give the same per-step maps."""
    pipe = tiny_sdxl(tmp_path)
    maps = [at.estimate(DiffusionRunner(pipe, num_inference_steps=STEPS, guidance_scale=3.0, batch_size=bs, **SIZE), source=SRC, target=TGT,
                        support="all", steps="each", progress=False) for bs in (12, 1)]
    assert sorted(maps[0].modules) == sorted(at.match_modules(pipe, "@norms-cross-attn")) and maps[0].config.runner["pipeline"] == "StableDiffusionXLPipeline"
    for name in maps[0].modules:
        torch.testing.assert_close(maps[0].maps[name].shift, maps[1].maps[name].shift, rtol=1e-3, atol=1e-4)
    base = images(pipe)
    with at.steer(pipe, maps[0], 0.0):
        assert torch.equal(images(pipe), base)
    with at.steer(pipe, maps[0], 1.0):
        assert not torch.equal(images(pipe), base)


def test_cli_fit_images_and_modules_on_a_saved_pipeline(sd, tmp_path, capsys):
    from acttransport import cli

    folder = tmp_path / "sd"
    sd.save_pretrained(folder)  # a real diffusers folder: model_index.json + components
    (tmp_path / "src.txt").write_text("\n".join(SRC) + "\n")
    (tmp_path / "tgt.txt").write_text("\n".join(TGT) + "\n")
    size = ["--height", "16", "--width", "16", "--num-inference-steps", str(STEPS)]
    assert cli.main(["modules", str(folder), "unet.conv_norm_out"]) == 0
    assert "unet.conv_norm_out" in capsys.readouterr().out
    rc = cli.main(["fit", str(folder), "--source", str(tmp_path / "src.txt"), "--target", str(tmp_path / "tgt.txt"),
                   "--modules", "@resnet-norms", "--support", "all", "--steps", "each", "-o", str(tmp_path / "map"), *size])
    assert rc == 0 and "step(s) x 3" in capsys.readouterr().out
    tmap = at.load(tmp_path / "map", model=sd)
    assert tmap.config.model == str(folder) and all(m.steps == STEPS for m in tmap.maps.values())
    rc = cli.main(["images", str(folder), "--map", str(tmp_path / "map"), "--prompt", "a red circle", "--per-prompt", "2",
                   "--strengths", "0,1", "-o", str(tmp_path / "grid.png"), *size])
    assert rc == 0 and (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    rc = cli.main(["fit", str(folder), "--data", "toxicity", "-o", str(tmp_path / "x")])
    assert rc == 2 and "--source FILE and --target FILE" in capsys.readouterr().err


def test_causal_fit_steers_the_halves_it_will_steer_at_inference(sd):
    kw = dict(source=SRC, target=TGT, modules="@all-norms", support="all", progress=False)
    cond, both = at.estimate(runner(sd), halves="cond", steps="each", **kw), at.estimate(runner(sd), halves="both", steps="each", **kw)
    assert cond.config.halves == "cond" and both.config.halves == "both"
    first, last = cond.modules[0], cond.modules[-1]
    assert torch.equal(cond.maps[first].scale[0], both.maps[first].scale[0])  # step 0, first module: nothing earlier
    # within a step the pooled conditional half does not depend on the other half, but guidance mixes
    # both into the next step's latents, so the later steps' fits differ
    assert not torch.equal(cond.maps[last].shift[-1], both.maps[last].shift[-1])
    # fitted on the first step only, the halves rule cannot change the fit (it matters when steering)
    kw["steps"] = "first"
    a, b = at.estimate(runner(sd), halves="cond", **kw), at.estimate(runner(sd), halves="both", **kw)
    assert all(torch.equal(a.maps[m].shift, b.maps[m].shift) for m in a.modules)
