"""The runner seam: the engine estimates through any Runner, with no tokenizer, including one
whose modules run once per "denoising step" (each call is its own site) on conv maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import acttransport as at
from acttransport.engine import collect_sites, execution_order, fit_causal_one_pass
from acttransport.errors import ConfigError, ModuleMatchError
from acttransport.methods import fit_linear
from acttransport.runners import Batch, CausalLMRunner, Runner, runner_for
from acttransport.targets import add_hooks, apply_map, pick_output, pool, remove_hooks, replace_output
from acttransport.transport import ModuleMap, support_bounds


class Denoiser(nn.Module):
    """A toy "UNet": the conditioning vector is painted on a 4×4 map that goes through the
    same conv block ``steps`` times (like a denoising loop), so ``block.norm`` runs once per step."""

    def __init__(self, steps: int = 3, c: int = 5) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.steps = steps
        self.embed = nn.Linear(3, c)
        self.block = nn.Module()
        self.block.conv = nn.Conv2d(c, c, 3, padding=1)
        self.block.norm = nn.GroupNorm(1, c)
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:  # cond [B, 3]
        x = self.embed(cond)[:, :, None, None].expand(-1, -1, 4, 4).contiguous()
        for _ in range(self.steps):
            x = x + torch.tanh(self.block.norm(self.block.conv(x)))
        return self.out(x)


class PromptRunner:
    """Prompts are strings of three numbers; each becomes a conditioning vector. No tokenizer."""

    repeated = True
    model_id = "toy-denoiser"

    def __init__(self, model: nn.Module, batch_size: int = 4) -> None:
        self.model, self.batch_size = model, batch_size

    def batches(self, items):
        vecs = [torch.tensor([float(v) for v in s.split()]) for s in items]
        return [Batch(list(range(i, min(i + self.batch_size, len(items)))), torch.stack(vecs[i : i + self.batch_size]))
                for i in range(0, len(items), self.batch_size)]

    def forward(self, batch: Batch) -> None:
        self.model(batch.inputs)

    def pool(self, x, batch, how):
        return pool(x, None, how)  # [B, C, H, W] -> [B, C] over H×W

    def probe(self) -> Batch:
        return self.batches(["0 0 0"])[0]


def _prompts(n: int, shift: float, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"{v:.3f}" for v in (torch.randn(3, generator=g) + shift).tolist()) for _ in range(n)]


SRC, TGT = _prompts(10, 0.0, 1), _prompts(10, 1.5, 2)


def test_a_plain_runner_is_recognised_and_an_lm_needs_its_tokenizer():
    runner = PromptRunner(Denoiser())
    assert isinstance(runner, Runner) and runner_for(runner) is runner
    with pytest.raises(ConfigError, match="tokenizer"):
        runner_for(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="cannot run"):
        runner_for("not a model")


def test_repeated_module_gives_one_site_per_step_and_collect_stacks_them():
    runner = PromptRunner(Denoiser(steps=3))
    assert execution_order(runner, ["block.norm", "embed"]) == [("embed", 0), ("block.norm", 0), ("block.norm", 1), ("block.norm", 2)]
    acts = at.collect(runner, texts=SRC, modules=["embed", "block.norm"], progress=False)
    assert acts["embed"].shape == (10, 1, 5) and acts["block.norm"].shape == (10, 3, 5)  # [n, S, d]: one slice per call
    assert not torch.allclose(acts["block.norm"][:, 0], acts["block.norm"][:, 2])


def test_causal_one_pass_over_steps_equals_the_naive_loop():
    """Per-step sites through the same engine as a causal LM: site k is fitted with the maps of
    sites 0..k-1 applied at their own step, in one forward call per batch."""
    model = Denoiser(steps=3)
    runner = PromptRunner(model, batch_size=3)
    sites = execution_order(runner, ["block.norm"])
    texts = SRC + TGT

    def fit(site, acts):
        f = fit_linear(acts[:10], acts[10:])
        lo, hi = support_bounds(acts[:10], "observed")
        return ModuleMap(f.scale, f.shift, lo, hi)

    one_pass = fit_causal_one_pass(runner, runner.batches(texts), sites, "mean", fit)

    naive: dict = {}
    for site in sites:  # re-run everything with the earlier steps' maps applied, pool at `site`
        calls = {"n": 0}

        def hook(module, args, output):
            k = calls["n"]
            calls["n"] += 1
            m = naive.get(("block.norm", k))
            return replace_output(output, "block.norm", apply_map(pick_output(output, "block.norm"), m, 1.0)) if m else None

        handles = add_hooks(model, ["block.norm"], lambda spec: hook)
        try:
            pooled = []
            for batch in runner.batches(texts):
                calls["n"] = 0
                got = collect_sites(runner, [texts[i] for i in batch.rows], [site], "mean", progress=False)
                pooled.append(got[site])
        finally:
            remove_hooks(handles)
        naive[site] = fit(site, torch.cat(pooled))
    assert list(one_pass) == sites
    for site in sites:
        for key, t in naive[site].tensors().items():
            assert torch.equal(one_pass[site].tensors()[key], t), (site, key)
    assert not torch.equal(one_pass[sites[0]].shift, one_pass[sites[2]].shift)  # the steps got maps of their own


def test_estimate_through_a_runner_needs_no_tokenizer_for_single_call_modules():
    runner = PromptRunner(Denoiser(steps=1))
    tmap = at.estimate(runner, source=SRC, target=TGT, modules=["embed", "block.norm"], support="all", progress=False)
    assert tmap.modules == ["embed", "block.norm"] and tmap.config.model == "toy-denoiser"
    with at.steer(runner.model, tmap, 1.0):
        moved = at.collect(runner, texts=SRC, modules="embed", progress=False)["embed"][:, 0]
    target = at.collect(runner, texts=TGT, modules="embed", progress=False)["embed"][:, 0]
    torch.testing.assert_close(moved.mean(0), target.mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", ["each", "first", "all"])
@pytest.mark.parametrize("causal", [True, False])
def test_estimate_relates_maps_to_steps(steps, causal):
    runner = PromptRunner(Denoiser(steps=3))
    tmap = at.estimate(runner, source=SRC, target=TGT, modules="block.norm", steps=steps, causal=causal, progress=False)
    m = tmap.maps["block.norm"]
    assert m.steps == (3 if steps == "each" else None) and m.width == 5
    assert tmap.config.steps == steps and tmap.config.spatial == "mean"
    if steps == "each":  # step k's map equals the per-site fit (causal: the engine's one pass)
        assert not torch.equal(m.at(0).shift, m.at(2).shift)
    if steps == "all" and not causal:  # one map from the three steps' activations pooled
        acts = at.collect(runner, texts=SRC + TGT, modules="block.norm", progress=False)["block.norm"]  # [20, 3, 5]
        a, b = acts[:10].transpose(0, 1).reshape(30, 5), acts[10:].transpose(0, 1).reshape(30, 5)
        f = fit_linear(a, b)
        torch.testing.assert_close(m.scale, f.scale)


def test_lm_runner_batches_by_length_with_a_mask_and_positions(llama, tok):
    runner = CausalLMRunner(llama, tok, batch_size=2)
    batches = runner.batches(["w2 w3 w4", "w5", "w6 w7"])
    assert [b.rows for b in batches] == [[1, 2], [0]]  # sorted by length, original positions kept
    b = batches[0]
    assert b.mask.tolist() == [[1, 0], [1, 1]] and b.inputs["position_ids"].tolist() == [[0, 0], [0, 1]]
    with pytest.raises(ModuleMatchError, match="never run"):
        llama.add_module("unused", nn.Linear(2, 2))
        execution_order(runner, ["unused"])


def test_steer_rows_picks_source_rows_and_the_conditional_half():
    from acttransport.engine.collect import steer_rows

    x = torch.zeros(6, 3)  # a guidance batch [uncond, cond] of 3 inputs
    assert steer_rows([0, 1, 2], None, "both", x) is None
    cond = steer_rows([0, 1, 2], None, "cond", x).flatten().tolist()
    assert cond == [False] * 3 + [True] * 3
    src = steer_rows([4, 1, 2], 2, "both", x).flatten().tolist()  # inputs 0..1 are the source set
    assert src == [False, True, False] * 2
    assert steer_rows([4, 1, 2], 2, "cond", x).flatten().tolist() == [False, False, False, False, True, False]
    assert steer_rows([0, 1, 2], None, "cond", torch.zeros(3, 3)) is None  # no guidance: nothing to spare
    with pytest.raises(ModuleMatchError, match="cannot tell"):
        steer_rows([0, 1, 2], 1, "both", torch.zeros(4, 3))
