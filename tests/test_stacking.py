"""Stacked steering (issue 24): several named maps at once, each at its own strength (and gate);
nested ``steer`` blocks; the registry of hooks on the model (list, remove by name).

The expected outputs are computed by hand: the unsteered activation, then map 1, then map 2,
with the pure functions of :mod:`acttransport.transport`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import acttransport as at
from acttransport.artifact import TransportMap
from acttransport.errors import ConfigError
from acttransport.steer import detach, gate_history, is_steered, steering
from acttransport.transport import ModuleMap, apply_units
from test_gate import SRC, TGT, Separable, _run
from conftest import sentences

D = 6


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D)).eval()


def affine(seed: int, bounded: bool = False) -> ModuleMap:
    g = torch.Generator().manual_seed(seed)
    scale, shift = torch.rand(D, generator=g) * 2 - 0.5, torch.randn(D, generator=g)
    if bounded:
        lo = -torch.rand(D, generator=g)
        return ModuleMap(scale, shift, lo, lo + 1.5)
    return ModuleMap(scale, shift, torch.full((D,), -torch.inf), torch.full((D,), torch.inf))


# map 1 acts on the first Linear ("0"); map 2 on the same module and on the second ("2")
T1 = TransportMap({"0": affine(1, bounded=True)})
T2 = TransportMap({"0": affine(2), "2": affine(3, bounded=True)})
X = torch.randn(5, D, generator=torch.Generator().manual_seed(9))


def by_hand(model: nn.Sequential, x: torch.Tensor, stack: list[tuple[TransportMap, object]]) -> torch.Tensor:
    """The model's output with each map applied in turn to each module's output; a strength is
    a float or one per row."""

    def apply(h: torch.Tensor, spec: str) -> torch.Tensor:
        for tmap, lam in stack:
            if spec in tmap.maps:
                if isinstance(lam, (list, tuple)):
                    h = torch.stack([apply_units(h[i], tmap.maps[spec], float(v)) for i, v in enumerate(lam)])
                else:
                    h = apply_units(h, tmap.maps[spec], lam)
        return h

    with torch.no_grad():
        h = apply(model[0](x), "0")
        return apply(model[2](model[1](h)), "2")


def run(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_two_maps_on_shared_and_disjoint_modules_equal_applying_them_in_sequence():
    model = net()
    base = run(model)
    with at.steer(model, {"one": (T1, 0.8), "two": (T2, 0.5)}):
        got = run(model)
    want = by_hand(model, X, [(T1, 0.8), (T2, 0.5)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, base) and no_hooks(model)
    # the order given is the order applied: swapped, the result is the other composition
    with at.steer(model, {"two": (T2, 0.5), "one": (T1, 0.8)}):
        swapped = run(model)
    torch.testing.assert_close(swapped, by_hand(model, X, [(T2, 0.5), (T1, 0.8)]), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(swapped, got, atol=1e-4)
    # a map at λ = 0 in a stack adds nothing, bit for bit
    with at.steer(model, T2, 0.5):
        alone = run(model)
    with at.steer(model, {"one": (T1, 0.0), "two": (T2, 0.5)}):
        assert torch.equal(run(model), alone)


def test_nested_blocks_stack_and_unwind_in_order_even_when_the_inner_block_raises():
    model = net()
    base, want = run(model), by_hand(model, X, [(T1, 0.8), (T2, 0.5)])  # by hand outside the blocks: no hooks in it
    with at.steer(model, T1, 0.8):
        outer = run(model)
        with at.steer(model, T2, 0.5):
            torch.testing.assert_close(run(model), want, rtol=1e-6, atol=1e-6)
            assert [s["name"] for s in steering(model)] == ["map", "map-2"]
        assert torch.equal(run(model), outer) and [s["name"] for s in steering(model)] == ["map"]
        with pytest.raises(KeyError, match="boom"):
            with at.steer(model, T2, 0.5, name="inner"):
                assert [s["name"] for s in steering(model)] == ["map", "inner"]
                raise KeyError("boom")
        assert torch.equal(run(model), outer) and [s["name"] for s in steering(model)] == ["map"]
    assert torch.equal(run(model), base) and no_hooks(model) and not is_steered(model) and steering(model) == []
    assert not hasattr(model, "_acttransport_hooks")  # the registry goes with its last map


def test_per_row_strengths_per_map():
    model = net()
    r1, r2 = [0.0, 1.0, 0.5, 0.25, 0.0], [1.0, 0.0, 0.5, 0.75, 0.0]
    with at.steer(model, {"one": (T1, r1), "two": (T2, torch.tensor(r2))}):
        got = run(model)
        assert steering(model)[0]["strength"] == r1 and steering(model)[1]["strength"] == r2
    torch.testing.assert_close(got, by_hand(model, X, [(T1, r1), (T2, r2)]), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[4], run(model)[4])  # both λ = 0: the row is untouched, bit for bit
    # one map per row, the other scalar
    with at.steer(model, {"one": (T1, r1), "two": (T2, 0.5)}):
        got = run(model)
    torch.testing.assert_close(got, by_hand(model, X, [(T1, r1), (T2, 0.5)]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="per-row strengths, but"), at.steer(model, {"one": (T1, [1.0, 0.0]), "two": (T2, 0.5)}):
        run(model)
    assert no_hooks(model)


def test_steering_lists_what_is_attached_and_empties():
    model = net()
    assert steering(model) == [] and not is_steered(model)
    with at.steer(model, {"one": (T1, 0.8), "two": (T2, 0.5)}):
        assert steering(model) == [
            {"name": "one", "modules": ["0"], "gate": None, "method": T1.config.method, "strength": 0.8},
            {"name": "two", "modules": ["0", "2"], "gate": None, "method": T2.config.method, "strength": 0.5},
        ]
        assert is_steered(model)
    assert steering(model) == [] and not is_steered(model) and no_hooks(model)


def test_a_map_removed_by_name_leaves_the_other():
    model = net()
    with at.steer(model, T2, 0.5):
        alone = run(model)
    with at.steer(model, {"one": (T1, 0.8), "two": (T2, 0.5)}):
        detach(model, "one")
        assert torch.equal(run(model), alone) and [s["name"] for s in steering(model)] == ["two"]
        with pytest.raises(ConfigError, match="no map named 'one'"):
            detach(model, "one")
    assert no_hooks(model) and steering(model) == []


def test_same_map_or_name_twice_is_refused_and_nothing_stays_attached():
    model = net()
    with at.steer(model, {"one": (T1, 0.8)}):
        outer = run(model)
        with pytest.raises(ConfigError, match="already attached"), at.steer(model, T2, name="one"):
            pass
        with pytest.raises(ConfigError, match="already being steered"), at.steer(model, {"two": (T2, 0.5), "again": (T1, 0.3)}):
            pass
        assert torch.equal(run(model), outer) and [s["name"] for s in steering(model)] == ["one"]
    with pytest.raises(ConfigError, match="mapping name"), at.steer(model, {"one": T1.maps}):
        pass
    with pytest.raises(ConfigError, match="outside"), at.steer(model, {"one": (T1, 0.5), "two": (T2, 3.0)}):
        pass  # the second map's bad strength: the first one's hooks are removed again
    assert no_hooks(model) and steering(model) == []


def test_a_gated_map_stacked_with_an_ungated_one(tok):
    model = Separable().eval()
    gated = at.estimate(model, tok, SRC, TGT, ["first", "second"], gate="probe", progress=False)
    d = model.second.out_features
    g = torch.Generator().manual_seed(5)
    plain = TransportMap({"second": ModuleMap(torch.rand(d, generator=g) + 0.5, torch.randn(d, generator=g),
                                              torch.full((d,), -torch.inf), torch.full((d,), torch.inf))})
    src, tgt = sentences(4, 2, 100, seed=11), sentences(4, 150, 300, seed=12)
    enc = tok(src + tgt, return_tensors="pt", padding=True)
    with at.steer(model, {"gated": (gated, 0.9), "plain": (plain, 0.6)}):
        got = _run(model, tok, src + tgt)
        opened = gate_history(model)[0]["open"]
        assert gate_history(model, "gated")[0]["open"].tolist() == opened.tolist() and gate_history(model, "plain") == []
        assert [s["gate"] for s in steering(model)] == ["sequence", None]
    assert opened.tolist() == [1.0] * 4 + [0.0] * 4  # source rows open the gate, target rows do not
    with torch.no_grad():  # by hand: the gated map on open rows only, then the plain map on every row
        o = opened.reshape(-1, 1, 1)
        h = model.first(model.emb(enc["input_ids"]))
        h = torch.where(o != 0, apply_units(h, gated.maps["first"], 0.9), h)
        h = model.second(torch.tanh(h))
        h = torch.where(o != 0, apply_units(h, gated.maps["second"], 0.9), h)
        want = apply_units(h, plain.maps["second"], 0.6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with at.steer(model, plain, 0.6):
        assert torch.equal(_run(model, tok, tgt), got[4:])  # closed rows: only the plain map acted
    assert no_hooks(model) and not is_steered(model)


# ---------------------------------------------------------------- the command line: --map DIR[:λ] several times


def test_cli_generate_stacks_maps_each_at_its_own_strength(tmp_path, capsys, texts):
    import json

    from acttransport import cli
    from acttransport.generation import Sampling, generate
    from conftest import make_llama, make_tokenizer

    model, tok = make_llama(), make_tokenizer()
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    one = at.estimate(model, tok, texts[0], texts[1], "model.layers.0.post_attention_layernorm", method="mean", support="all", progress=False)
    two = at.estimate(model, tok, texts[0], texts[1], r"model\.layers\.[01]\.post_attention_layernorm", support="all", progress=False)
    one.save(tmp_path / "one")
    two.save(tmp_path / "two")
    prompts = ["w1 w2 w3", "w7 w8"]

    def cli_rows(*argv):
        args = ["generate", str(tmp_path / "lm"), *argv, "--max-new-tokens", "4", "--greedy", "--json", "--allow-unbounded"]
        assert cli.main(args + [x for p in prompts for x in ("--prompt", p)]) == 0
        return json.loads(capsys.readouterr().out)

    stacked = cli_rows("--map", f"{tmp_path / 'one'}:3", "--map", str(tmp_path / "two"), "--strengths", "0,0.5")
    with at.steer(model, {"one": (one, 1.5), "two": (two, 0.5)}, allow_unbounded=True):  # row 0.5: 0.5·3 and 0.5·1
        want = generate(model, tok, prompts, Sampling(4, 1.0, 0.3, 1.2, False), seed=0, batch_size=32)
    assert [r["strength=0.5"] for r in stacked] == want
    assert [r["strength=0"] for r in stacked] == generate(model, tok, prompts, Sampling(4, 1.0, 0.3, 1.2, False), seed=0, batch_size=32)
    # one map with :λ is that map with --strengths scaled by λ; the old single-map form is unchanged
    assert [r["strength=1"] for r in cli_rows("--map", f"{tmp_path / 'two'}:0.5")] == \
        [r["strength=0.5"] for r in cli_rows("--map", str(tmp_path / "two"), "--strengths", "0.5")]
    assert cli.main(["generate", str(tmp_path / "lm"), "--map", f"{tmp_path / 'one'}:lots", "--prompt", "w1"]) == 2
    assert "followed by :λ" in capsys.readouterr().err
    assert not is_steered(model)


# ---------------------------------------------------------------- a diffusion pipeline: a per-step map stacked with a shared one


def test_a_per_step_map_and_a_shared_map_stack_on_a_pipeline(tmp_path):
    from acttransport.artifact import TransportConfig
    from acttransport.runners import DiffusionRunner
    from acttransport.targets import add_hooks, apply_map, pick_output, remove_hooks
    from tiny_pipelines import SIZE, tiny_sd

    sd, steps, spec, k = tiny_sd(tmp_path), 3, "unet.mid_block.resnets.0.norm2", 1
    c = sd.unet.mid_block.resnets[0].norm2.num_channels
    free = (torch.full((c,), -torch.inf), torch.full((c,), torch.inf))
    ident, moved = ModuleMap(torch.ones(c), torch.zeros(c), *free), ModuleMap(torch.ones(c), torch.full((c,), 0.5), *free)
    probe = DiffusionRunner(sd, num_inference_steps=steps, guidance_scale=3.0, **SIZE)
    probe.forward(probe.probe())
    per_step = TransportMap({spec: ModuleMap.stack([moved if s == k else ident for s in range(steps)])},
                            TransportConfig(steps="each", timesteps=tuple(probe.timesteps), denoiser="unet"))
    g = torch.Generator().manual_seed(3)
    shared = TransportMap({spec: ModuleMap(torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g), *free)})
    raw, out = [], []
    with at.steer(sd, {"step": (per_step, 1.0), "shared": (shared, 0.7)}):
        handles = add_hooks(sd, [spec], lambda s: lambda m, a, o: out.append(pick_output(o, s).clone()))  # after the maps
        handles.append(sd.unet.get_submodule(spec[5:]).register_forward_hook(lambda m, a, o: raw.append(o.clone()), prepend=True))
        try:
            sd(["a red circle"], num_inference_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
               output_type="pt", **SIZE)
        finally:
            remove_hooks(handles)
        assert [s["name"] for s in steering(sd)] == ["step", "shared"]
    assert len(raw) == len(out) == steps
    for s in range(steps):  # by hand: step s's map, then the shared one, on the module's own output
        want = apply_map(apply_map(raw[s], per_step.maps[spec].at(s), 1.0), shared.maps[spec], 0.7)
        torch.testing.assert_close(out[s], want, rtol=1e-5, atol=1e-5)
    assert not is_steered(sd) and all(not m._forward_hooks and not m._forward_pre_hooks for m in sd.unet.modules())


def test_cli_images_stacks_maps_like_their_composition(tmp_path, capsys):
    from acttransport import cli
    from acttransport.artifact import compose
    from acttransport.evaluate.tasks.images import load_images
    from tiny_pipelines import tiny_sd

    sd = tiny_sd(tmp_path / "tok")
    sd.save_pretrained(tmp_path / "sd")
    spec = "unet.mid_block.resnets.0.norm2"
    c = sd.unet.mid_block.resnets[0].norm2.num_channels
    g = torch.Generator().manual_seed(7)
    free = (torch.full((c,), -torch.inf), torch.full((c,), torch.inf))
    a, b = (TransportMap({spec: ModuleMap(torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g), *free)}) for _ in range(2))
    for name, tmap in (("a", a), ("b", b), ("ab", compose(b, a))):
        tmap.save(tmp_path / name)

    def grid(*maps):
        out = tmp_path / f"{'+'.join(maps).replace(':', '@')}.png"
        args = ["images", str(tmp_path / "sd"), *[x for m in maps for x in ("--map", str(tmp_path / m))], "--prompt", "a red circle",
                "--per-prompt", "2", "--strengths", "1", "--height", "16", "--width", "16", "--num-inference-steps", "2",
                "-o", str(out), "--save-tensors"]
        assert cli.main(args) == 0, capsys.readouterr().err
        return load_images(out.with_suffix(".l1.safetensors"))

    stacked, folded, first = grid("a", "b"), grid("ab"), grid("a")
    assert (stacked - folded).abs().max() <= 1 / 255 + 1e-6  # b after a, as compose(b, a) folds them (up to uint8 rounding)
    assert (stacked - first).abs().max() > 4 / 255  # and b did act
    assert (grid("a:0.5", "b") - stacked).abs().max() > 4 / 255  # a's own λ is used
