"""The vLLM hooks' arithmetic without vLLM (:mod:`acttransport.serve.rows`): affine maps on whole
outputs steer every token at once (per-token λ column); they must give the bits of the row-group
path (select rows, the map's kernel, write back) on steered tokens and leave every other token's
bits alone (every finite value, -0.0 and subnormals included; an infinite one may turn nan), for
bounded and unbounded supports, one or several maps on a module, quantile maps, fused slices and
layer sums beside them."""

import pytest
import torch

import acttransport as at
from acttransport.errors import MapFormatError
from acttransport.serve.registry import Registry
from acttransport.serve.rows import ModuleSteer, Pass

CFG = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
       "num_hidden_layers": 30}
D = 576
NORM0, NORM1, QKV, LAYER = ("model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm",
                            "model.layers.3.self_attn.q_proj", "model.layers.2")
INF = float("inf")


def _affine(seed: int, d: int = D, bounded: bool = False) -> at.ModuleMap:
    g = torch.Generator().manual_seed(seed)
    scale, shift = 0.5 + torch.rand(d, generator=g), 0.3 * torch.randn(d, generator=g)
    if bounded:
        lo, hi = -1.0 - torch.rand(d, generator=g), 1.0 + torch.rand(d, generator=g)
    else:
        lo, hi = torch.full((d,), -INF), torch.full((d,), INF)
    return at.ModuleMap(scale, shift, lo, hi)


def _quantile(seed: int, d: int = D) -> at.ModuleMap:
    g = torch.Generator().manual_seed(seed)
    kx = torch.sort(torch.randn(5, d, generator=g), dim=0).values
    return at.ModuleMap(torch.ones(d), torch.zeros(d), torch.full((d,), -INF), torch.full((d,), INF), kx, kx + 0.2)


def _registry() -> Registry:
    """Five maps: on NORM0 two unbounded affine (a, c), two bounded affine (b, e) and a quantile
    one (q); a also on NORM1, on a q_proj slice and on a layer output (hidden + residual)."""
    tm = lambda mm: at.TransportMap(mm, at.TransportConfig())  # noqa: E731
    maps = {"a": tm({NORM0: _affine(1), NORM1: _affine(2), QKV: _affine(3), LAYER: _affine(4)}),
            "b": tm({NORM0: _affine(5, bounded=True)}), "c": tm({NORM0: _affine(6)}), "e": tm({NORM0: _affine(7, bounded=True)}),
            "q": tm({NORM0: _quantile(8)})}
    return Registry(maps, CFG)


def _targets(reg: Registry, module: str) -> list:
    return [(name, t) for name, e in reg.entries.items() for t in e.targets.values() if t.module == module]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[x.dtype])


def _batch(n: int, width: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``[n, width]`` activations with -0.0, zeros, subnormals and large values everywhere;
    rows 1, 4 and n-1 (never steered below) also hold inf, -inf and nan."""
    g = torch.Generator().manual_seed(seed)
    y = 1.5 * torch.randn(n, width, generator=g, dtype=torch.float64)
    y[:, :8] = torch.tensor([-0.0, 0.0, 1e-40, -1e-40, 3e4, -3e4, 1.0, -1.0], dtype=torch.float64)
    y = y.to(dtype)
    for r in {1, 4, n - 1} & set(range(n)):
        y[r, 8:11] = torch.tensor([INF, -INF, float("nan")], dtype=dtype)
    return y


#: Flattened tokens of 6 requests (prefill-like spans of several tokens, single decode tokens)
#: and 2 padding rows; rows 1, 4 and 13 are never steered.
SPANS = [(0, 1, "a", 0.6), (2, 4, "c", 1.0), (5, 8, "b", 0.8), (8, 9, "q", 0.3), (9, 11, "e", 0.45), (11, 12, "a", 0.25)]
N = 14


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("module", [NORM0, NORM1, "model.layers.3.self_attn.qkv_proj", LAYER])
def test_all_token_path_gives_the_row_group_bits(module, dtype):
    reg = _registry()
    targets = _targets(reg, module)
    width = 576 + 192 + 192 if module.endswith("qkv_proj") else D
    y, res = _batch(N, width, dtype), _batch(N, width, dtype, seed=1)
    res[torch.isinf(res) | torch.isnan(res)] = 0  # a residual is finite
    fast, ref = ModuleSteer(targets, reg), ModuleSteer(targets, reg, fast=False)
    for out in (y, (y, res)):
        got, want = fast(out, Pass(SPANS)), ref(out, Pass(SPANS))
        g, w = (got[0], want[0]) if isinstance(out, tuple) else (got, want)
        assert g.dtype == dtype and g.shape == y.shape
        fin = torch.isfinite(w)
        assert torch.equal(_bits(g)[fin], _bits(w)[fin]), (module, dtype)
        assert (torch.isnan(g) | (g == w))[~fin].all()  # inf kept or nan, nan kept
        if isinstance(out, tuple):
            assert got[1] is res  # the residual passes through
    # the steered tokens did change; the never-steered ones kept every bit
    got = fast(y, Pass(SPANS))
    assert not torch.equal(got[0], y[0])
    fin = torch.isfinite(y)
    for r in (1, 4, 12, 13):
        assert torch.equal(_bits(got[r])[fin[r]], _bits(y[r])[fin[r]])


def test_norm0_takes_the_all_token_path_for_affine_maps_only():
    reg = _registry()
    ms = ModuleSteer(_targets(reg, NORM0), reg)
    assert [(g.names, g.bounded) for g in ms.fast] == [(("a", "c"), False), (("b", "e"), True)]
    assert [name for name, _, _ in ms.slow] == ["q"]
    assert [name for name, _, _ in ModuleSteer(_targets(reg, "model.layers.3.self_attn.qkv_proj"), reg).slow] == ["a"]
    assert not ModuleSteer(_targets(reg, LAYER), reg).fast  # hidden + residual: row groups


@pytest.mark.parametrize("bounded", [False, True])
def test_every_strength_matches_the_maps_kernel(bounded):
    """Against the map's own kernel (the transformers hooks' arithmetic), one λ per token, one
    map and two maps on the module."""
    m1, m2 = _affine(11, bounded=bounded), _affine(12, bounded=bounded)
    tm = lambda m: at.TransportMap({NORM0: m}, at.TransportConfig())  # noqa: E731
    reg = Registry({"x": tm(m1), "y": tm(m2)}, CFG)
    lams = torch.rand(64, generator=torch.Generator().manual_seed(0)).tolist() + [1.0]
    y = _batch(len(lams) + 1, D, torch.float32, seed=2)
    y[-1] = 0.5  # the last token unsteered
    for names in (["x"], ["x", "y"]):
        spans = [(i, i + 1, names[i % len(names)], lam) for i, lam in enumerate(lams) if i not in (1, 4)]
        got = ModuleSteer([(n, reg.entries[n].targets[NORM0]) for n in names], reg)(y, Pass(spans))
        for a, _, name, lam in spans:
            m = m1 if name == "x" else m2
            assert torch.equal(_bits(got[a]), _bits(m.kernel(lam, "cpu", torch.float32)(y[a:a + 1])[0])), (name, lam)
        for r in (1, 4, len(lams)):
            fin = torch.isfinite(y[r])
            assert torch.equal(_bits(got[r])[fin], _bits(y[r])[fin])


def test_no_token_of_the_modules_maps_leaves_the_output_alone():
    reg = _registry()
    y = _batch(6, D, torch.float32)
    assert ModuleSteer(_targets(reg, NORM1), reg)(y, Pass([(0, 2, "c", 0.5)])) is None  # only a is on NORM1
    assert ModuleSteer(_targets(reg, NORM0), reg)(y, Pass([(0, 2, "zzz", 0.5)])) is None
    with pytest.raises(MapFormatError, match="width 576"):
        ModuleSteer(_targets(reg, NORM1), reg)(torch.zeros(3, 64), Pass([(0, 1, "a", 0.5)]))


def test_unsteered_tokens_keep_their_bits_without_a_where():
    """Row 0 of the table and λ = −0.0: y·0 + 0 = +0.0, (+0.0)·(−0.0) = −0.0, y + (−0.0) = y."""
    reg = _registry()
    y = torch.tensor([[-0.0, 0.0, 1e-45, -1e-45, 1e-38, -3.4e38, 3.4e38, 7.0] * 72] * 3)
    got = ModuleSteer(_targets(reg, NORM1), reg)(y, Pass([(1, 2, "a", 0.5)]))
    assert torch.equal(_bits(got[0]), _bits(y[0])) and torch.equal(_bits(got[2]), _bits(y[2]))
    assert not torch.equal(got[1], y[1])


def test_bounded_supports_keep_even_infinite_unsteered_values():
    """Bounded maps have their where anyway: row 0's empty support keeps inf and nan too."""
    tm = lambda m: at.TransportMap({NORM0: m}, at.TransportConfig())  # noqa: E731
    reg = Registry({"b": tm(_affine(5, bounded=True)), "e": tm(_affine(7, bounded=True))}, CFG)
    y = _batch(6, D, torch.float32)  # inf, -inf, nan in rows 1, 4, 5
    for names in (["b"], ["b", "e"]):
        got = ModuleSteer([(n, reg.entries[n].targets[NORM0]) for n in names], reg)(y, Pass([(0, 1, "b", 0.5), (2, 4, names[-1], 0.7)]))
        for r in (1, 4, 5):
            assert torch.equal(_bits(got[r]), _bits(y[r]))
        assert not torch.equal(got[0], y[0])


def test_pass_columns_and_groups():
    p = Pass([(0, 2, "a", 0.5), (3, 4, "b", 0.25), (4, 6, "a", 0.5)])
    index, lam = p.columns(("b", "a"), 7, torch.float32)
    assert index.tolist() == [2, 2, 0, 1, 2, 2, 0]
    assert _bits(lam.squeeze(1)).tolist() == _bits(torch.tensor([0.5, 0.5, -0.0, 0.25, 0.5, 0.5, -0.0])).tolist()
    assert p.columns(("b",), 7, torch.float32)[0].tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert p.columns(("zzz",), 7, torch.float32) is None
    assert p.columns(("b", "a"), 7, torch.float32) is p.columns(("b", "a"), 7, torch.float32)  # built once per pass
    (lam_a, idx_a), = p.groups()["a"]
    assert lam_a == 0.5 and idx_a.tolist() == [0, 1, 4, 5]
