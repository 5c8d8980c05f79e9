"""Tests for the estimators of fit.METHODS: closed forms on hand-made data, the quantile map's
invariants, save→load, error messages, and one end-to-end fit per method on a tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acttransport.methods import baselines
from acttransport.errors import ConfigError, DataError
from acttransport.methods import METHODS, fit_linear, fit_quantile, method_info
from acttransport.transport import support_bounds
from acttransport.targets import apply_map
from acttransport import load
from acttransport.artifact import TransportConfig, TransportMap
from acttransport.transport import ModuleMap, piecewise_linear

NEW = ["quantile", "actadd", "caa", "itic", "aura", "detzero"]
TWO_CLASS = ["itic", "aura", "detzero"]


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _gauss(n: int, d: int, seed: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, d, generator=g)


def _as_map(f, a: torch.Tensor, support: str = "all") -> ModuleMap:
    lo, hi = support_bounds(a, support)
    return ModuleMap(f.scale, f.shift, lo, hi, f.knots_x, f.knots_y)


# ------------------------------------------------------------------ registry


def test_registry_defaults():
    expect = {"quantile": ("mean", False), "actadd": ("last", True), "caa": ("last", True), "itic": ("last", True),
              "aura": ("max", False), "detzero": ("max", False)}
    for name, (pooling, unbounded) in expect.items():
        info = method_info(name)
        assert (info.pooling, info.unbounded) == (pooling, unbounded), name
        assert info.paper and info.fit.__doc__


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        method_info("nope")
    for name in METHODS:
        assert name in str(e.value)


@pytest.mark.parametrize("method", list(METHODS))
def test_unknown_option_is_a_type_error_naming_it(method):
    a, b = _gauss(6, 3, 0), _gauss(6, 3, 1, mean=2.0)
    with pytest.raises(TypeError, match="bogus"):
        METHODS[method].fit(a, b, bogus=1)


@pytest.mark.parametrize("method", list(METHODS))
def test_output_dtypes_and_shapes(method):
    a, b = _gauss(20, 5, 0), _gauss(20, 5, 1, mean=1.0, std=2.0)
    f = METHODS[method].fit(a, b)
    assert f.scale.dtype == f.shift.dtype == torch.float32 and f.scale.shape == f.shift.shape == (5,)
    assert f.degenerate.dtype == torch.bool and f.degenerate.shape == (5,)
    if f.knots_x is not None:
        assert f.knots_x.dtype == f.knots_y.dtype == torch.float32 and f.knots_x.shape[1] == 5


# ------------------------------------------------------------------ closed forms


def test_actadd_uses_one_pair():
    a = _t([[0.0, 1.0], [2.0, 5.0], [4.0, 0.0]])
    b = _t([[1.0, 3.0], [0.0, 0.0], [7.0, 1.0]])
    f = METHODS["actadd"].fit(a, b)
    assert torch.equal(f.scale, torch.ones(2)) and torch.equal(f.shift, _t([1.0, 2.0]))
    f2 = METHODS["actadd"].fit(a, b, pair_index=2)
    assert torch.equal(f2.shift, _t([3.0, 1.0]))


def test_actadd_single_pair_is_not_degenerate():
    f = METHODS["actadd"].fit(_t([[1.0, 2.0]]), _t([[4.0, 0.5]]))
    assert not f.degenerate.any() and torch.equal(f.shift, _t([3.0, -1.5]))


def test_actadd_bad_pair_index():
    a = b = _gauss(3, 2, 0)
    for bad in (3, -1, 1.0, True):
        with pytest.raises(ConfigError, match="pair_index"):
            METHODS["actadd"].fit(a, b, pair_index=bad)


def test_caa_is_mean_difference_and_constant_units_identity():
    a = _t([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])  # unit 1 constant in A
    b = _t([[1.0, 0.0], [3.0, 1.0], [8.0, 2.0]])
    f = METHODS["caa"].fit(a, b)
    assert torch.equal(f.scale, torch.ones(2))
    assert torch.allclose(f.shift, _t([2.0, 0.0])) and f.degenerate.tolist() == [False, True]


def test_caa_n2():
    f = METHODS["caa"].fit(_t([[0.0], [2.0]]), _t([[5.0], [7.0]]))
    assert torch.equal(f.shift, _t([5.0]))


def test_itic_symmetric_case():
    # Unit 1 is mirror-symmetric, so the boundary normal is e0; projections 0,0,1,1,3,3,4,4 -> std sqrt(20/7).
    a = _t([[0.0, 1.0], [0.0, -1.0], [1.0, 1.0], [1.0, -1.0]])
    b = _t([[3.0, 1.0], [3.0, -1.0], [4.0, 1.0], [4.0, -1.0]])
    f = METHODS["itic"].fit(a, b)
    assert torch.equal(f.scale, torch.ones(2)) and not f.degenerate.any()
    assert torch.allclose(f.shift, _t([(20 / 7) ** 0.5, 0.0]), atol=1e-5)


def test_itic_equals_its_formula():
    from sklearn.linear_model import LogisticRegression

    a, b = _gauss(40, 4, 0, std=1.0), _gauss(40, 4, 1, mean=0.7, std=2.0)
    f = METHODS["itic"].fit(a, b, C=0.5)
    x = torch.cat([a, b]).double().numpy()
    y = np.r_[np.zeros(40), np.ones(40)]
    sd = x.std(0)
    w = LogisticRegression(C=0.5, max_iter=1000).fit((x - x.mean(0)) / sd, y).coef_[0] / sd
    u = w / np.linalg.norm(w)
    expect = (x @ u).std(ddof=1) * u
    assert np.allclose(f.shift.numpy(), expect, atol=1e-5)
    assert float((b.mean(0) - a.mean(0)) @ f.shift) > 0  # oriented from A towards B


def test_itic_degenerate_unit_gets_no_shift():
    a, b = _gauss(10, 3, 0), _gauss(10, 3, 1, mean=1.0)
    a[:, 1] = 2.0
    f = METHODS["itic"].fit(a, b)
    assert f.degenerate.tolist() == [False, True, False] and f.shift[1] == 0 and f.shift.abs().sum() > 0


def test_aura_formula_with_ties_and_constant_unit():
    # unit 0: A all above B -> AUROC 1 -> ω 0; unit 1: a tie, AUROC (1 + 0.5 + 1 + 1)/4 = 0.875
    # -> ω 0.25; unit 2: A below B -> AUROC 0 -> identity; unit 3: constant -> identity.
    a = _t([[5.0, 1.0, 0.0, 3.0], [6.0, 2.0, 1.0, 3.0]])
    b = _t([[0.0, 0.0, 5.0, 3.0], [1.0, 1.0, 6.0, 3.0]])
    f = METHODS["aura"].fit(a, b)
    assert torch.allclose(f.scale, _t([0.0, 0.25, 1.0, 1.0])) and torch.equal(f.shift, torch.zeros(4))
    assert f.degenerate.tolist() == [False, False, False, True]


def test_detzero_formula_and_threshold():
    # unit 0 perfect detector (AP 1); unit 1 AP = (1/2)(1/1 + 2/4) = 0.75; unit 2 A below B.
    a = _t([[5.0, 9.0, 0.0], [6.0, 1.0, 1.0]])
    b = _t([[0.0, 2.0, 5.0], [1.0, 3.0, 7.0]])
    f = METHODS["detzero"].fit(a, b)
    assert f.scale.tolist() == [0.0, 1.0, 1.0] and torch.allclose(f.shift, _t([0.5, 0.0, 0.0]))
    f = METHODS["detzero"].fit(a, b, threshold=0.7)
    assert f.scale.tolist() == [0.0, 0.0, 1.0] and torch.allclose(f.shift, _t([0.5, 2.5, 0.0]))
    with pytest.raises(ConfigError, match="threshold"):
        METHODS["detzero"].fit(a, b, threshold=1.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_metrics_equal_sklearn(seed):
    from sklearn.metrics import average_precision_score, roc_auc_score

    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 5, (7, 30), generator=g).float()  # many ties
    b = torch.randint(0, 4, (11, 30), generator=g).float()
    a[:, :10] += torch.randn(7, 10, generator=g)  # some continuous units too
    x, y = torch.cat([a, b]).double().numpy(), np.r_[np.ones(7), np.zeros(11)]
    auc = [roc_auc_score(y, x[:, j]) for j in range(30)]
    ap = [average_precision_score(y, x[:, j]) for j in range(30)]
    assert np.allclose(baselines.auroc(a.double(), b.double()).numpy(), auc, atol=1e-12, rtol=0)
    assert np.allclose(baselines.average_precision(a.double(), b.double()).numpy(), ap, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", TWO_CLASS)
@pytest.mark.parametrize("n_a,n_b", [(5, 0), (0, 5), (1, 5), (5, 1)])
def test_two_class_methods_refuse_single_class(method, n_a, n_b):
    with pytest.raises(DataError, match="two classes"):
        METHODS[method].fit(torch.randn(n_a, 3), torch.randn(n_b, 3))


@pytest.mark.parametrize("method", list(METHODS))
def test_all_constant_is_identity(method):
    a, b = torch.full((4, 3), 2.0), torch.full((4, 3), 2.0)
    f = METHODS[method].fit(a, b)
    x = torch.linspace(-3, 3, 13).unsqueeze(1).expand(13, 3)
    assert f.degenerate.all()
    assert torch.equal(_as_map(f, a).transport(x), x)


# ------------------------------------------------------------------ quantile


def test_quantile_knots_are_quantiles_and_map_levels_exactly():
    a, b = _gauss(101, 3, 0), _gauss(101, 3, 1, mean=1.0, std=0.5) ** 3
    f = fit_quantile(a, b, knots=11)
    levels = torch.linspace(0, 1, 11, dtype=torch.float64)
    qa, qb = torch.quantile(a.double(), levels, dim=0), torch.quantile(b.double(), levels, dim=0)
    assert torch.allclose(f.knots_x.double(), qa, atol=1e-6) and torch.allclose(f.knots_y.double(), qb, atol=1e-6)
    mapped = _as_map(f, a).transport(f.knots_x)
    assert torch.allclose(mapped, f.knots_y, rtol=1e-6, atol=1e-6)


def test_quantile_is_monotone_with_ties():
    a = _t([[0.0], [0.0], [0.0], [1.0], [1.0], [2.0], [5.0], [5.0]])
    b = _t([[-3.0], [-1.0], [0.0], [0.5], [4.0], [4.0], [9.0], [10.0]])
    f = fit_quantile(a, b)
    assert f.knots_x.shape == (8, 1) and (f.knots_x[1:] >= f.knots_x[:-1]).all()
    x = torch.linspace(-5, 10, 3001).unsqueeze(1)
    y = _as_map(f, a).transport(x)
    assert (y[1:] >= y[:-1]).all()
    assert y[0, 0] == pytest.approx(-5.0 - 3.0) and y[-1, 0] == pytest.approx(10.0 + 5.0)  # translations outside


def test_quantile_constant_unit_identity_and_n2():
    a = _t([[1.0, 0.0], [1.0, 2.0]])
    b = _t([[3.0, 10.0], [4.0, 20.0]])
    f = fit_quantile(a, b)
    assert f.knots_x.shape == (2, 2) and f.degenerate.tolist() == [True, False]
    assert torch.equal(f.knots_x[:, 0], f.knots_y[:, 0])
    assert torch.equal(f.knots_y[:, 1], _t([10.0, 20.0]))
    x = _t([[0.5, 1.0]])
    assert torch.allclose(_as_map(f, a).transport(x), _t([[0.5, 15.0]]))


def test_quantile_equals_linear_on_affine_image():
    a = _gauss(200, 4, 0, std=1.5)
    b = 0.4 * a + torch.tensor([1.0, -2.0, 0.0, 3.0])
    fq, fl = fit_quantile(a, b), fit_linear(a, b)
    x = torch.rand(500, 4, generator=torch.Generator().manual_seed(3)) * (a.max(0).values - a.min(0).values) + a.min(0).values
    mq, ml = _as_map(fq, a, "observed"), _as_map(fl, a, "observed")
    assert torch.allclose(mq.transport(x), ml.transport(x), atol=1e-5)
    assert torch.allclose(fq.scale, fl.scale) and torch.allclose(fq.shift, fl.shift)


def test_quantile_bad_knots():
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ConfigError, match="knots"):
            fit_quantile(_gauss(5, 2, 0), _gauss(5, 2, 1), knots=bad)


def test_piecewise_linear_reference():
    kx, ky = _t([[0.0], [1.0], [3.0]]), _t([[0.0], [2.0], [3.0]])
    x = _t([[-1.0], [0.5], [2.0], [4.0]])
    assert torch.allclose(piecewise_linear(x, kx, ky), _t([[-1.0], [1.0], [2.5], [4.0]]))


# ------------------------------------------------------------------ save / load


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_bit_exact(method, tmp_path):
    a, b = _gauss(30, 6, 0), _gauss(30, 6, 1, mean=1.0, std=2.0)
    a[:, 2] = 1.0  # a degenerate unit
    f = METHODS[method].fit(a, b)
    info = method_info(method)
    tmap = TransportMap({"m": _as_map(f, a, "observed")}, TransportConfig(method=method, pooling=info.pooling, unbounded=info.unbounded))
    back = load(tmap.save(tmp_path / method))
    assert back.config == tmap.config.replace(version=back.config.version)
    for k, t in tmap.maps["m"].tensors().items():
        assert torch.equal(back.maps["m"].tensors()[k], t), k
    assert back.maps["m"].kind == ("quantile" if method == "quantile" else "affine")
    x = _gauss(50, 6, 5)
    assert torch.equal(apply_map(x, back.maps["m"], 1.0), apply_map(x, tmap.maps["m"], 1.0))


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_lm():
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    # Words start at id 2 so [UNK]=0 and [PAD]=1 keep their ids (else they are appended as 300, 301).
    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(2, 300)} | {"[UNK]": 0, "[PAD]": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")
    assert len(tok) == 300 and tok.pad_token_id == 1
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval(), tok


def _sentences(lo: int, hi: int, n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(lo, hi, (int(l),), generator=g)) for l in torch.randint(3, 8, (n,), generator=g)]


@pytest.mark.parametrize("method", list(METHODS))
def test_estimate_end_to_end(method, tiny_lm):
    import acttransport as at

    model, tok = tiny_lm
    source, target = _sentences(2, 150, 12, 0), _sentences(150, 300, 12, 1)
    options = {"threshold": 0.6} if method == "detzero" else {}  # 12 sentences: no unit reaches AP 0.8
    tmap = at.estimate(model, tok, source, target, r"model\.layers\.\d+\.post_attention_layernorm", method=method, support="all", progress=False, **options)
    assert tmap.config.method == method and tmap.config.pooling == method_info(method).pooling
    assert tmap.config.unbounded == method_info(method).unbounded
    assert len(tmap.maps) == 2
    for m in tmap.maps.values():
        assert all(torch.isfinite(t).all() for k, t in m.tensors().items() if k not in ("lower", "upper"))
    changes = any((m.scale != 1).any() or (m.shift != 0).any() or (m.knots_x is not None and not torch.equal(m.knots_x, m.knots_y)) for m in tmap.maps.values())
    assert changes
    batch = tok(source[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**batch).logits
        with at.steer(model, tmap, 1.0):
            steered = model(**batch).logits
    assert torch.isfinite(steered).all()
    if changes:
        assert not torch.allclose(plain, steered)
    else:
        assert torch.equal(plain, steered)


def test_estimate_unknown_option_is_config_error(tiny_lm):
    import acttransport as at

    model, tok = tiny_lm
    with pytest.raises(ConfigError, match="bogus"):
        at.estimate(model, tok, _sentences(2, 150, 4, 0), _sentences(150, 300, 4, 1), r"model\.norm", method="quantile", bogus=3, progress=False)


def test_estimate_passes_options(tiny_lm):
    import acttransport as at

    model, tok = tiny_lm
    src, tgt = _sentences(2, 150, 4, 0), _sentences(150, 300, 4, 1)
    t0 = at.estimate(model, tok, src, tgt, r"model\.norm", method="actadd", progress=False)
    t2 = at.estimate(model, tok, src, tgt, r"model\.norm", method="actadd", pair_index=2, progress=False)
    assert t2.config.options == {"pair_index": 2}
    assert not torch.equal(t0.maps["model.norm"].shift, t2.maps["model.norm"].shift)


def test_nucleus_filter_matches_transformers_top_p():
    from transformers.generation.logits_process import TopPLogitsWarper

    from acttransport.generation import NucleusFilter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 500, generator=g) * torch.tensor([4.0, 2.0, 1.0, 0.3, 0.05, 8.0])[:, None]  # peaked to flat rows
    for p in (0.05, 0.3, 0.9):
        ref = torch.isinf(TopPLogitsWarper(p)(None, x.clone()))
        for k in (1, 8, 500):  # k=1: nearly every row takes the full-sort path
            got = NucleusFilter(p, k=k)(None, x.clone())
            assert torch.equal(torch.isinf(got), ref), (p, k)
            assert torch.equal(got[~ref], x[~ref]) and (~torch.isinf(got)).sum(1).min() >= 1
    assert torch.equal(NucleusFilter(1.0)(None, x), x)
