"""Steering vectors from other tools: llama.cpp control-vector GGUF files (repeng's
``export_gguf``, llama.cpp, ``acttransport export``) read into maps on the decoder layers.

The fast tests use a tiny random Llama and hand-written files; the slow one trains a real
repeng ControlVector on SmolLM2-135M with repeng's own API, exports it with repeng's
``export_gguf``, imports it, and checks that steering equals repeng's ``ControlModel``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import acttransport as at
from acttransport import cli
from acttransport.bake.control_vector import control_vectors, import_vector, read_control_vector, write_control_vector
from acttransport.errors import MapFormatError, ModuleMatchError
from conftest import HIDDEN, make_llama, make_tokenizer

IDS = torch.tensor([[2, 5, 9, 14, 3, 7], [8, 8, 21, 4, 11, 30]])


def _write(path, tensors: dict[str, np.ndarray], arch: str = "controlvector", hint: str = "llama"):
    """A GGUF file with the given tensors, as llama.cpp's cvector-generator lays it out."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_string(f"{arch}.model_hint", hint)
    w.add_uint32(f"{arch}.layer_count", len(tensors))
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _directions(layers=(1, 2), width=HIDDEN, seed=0) -> dict[int, np.ndarray]:
    g = np.random.default_rng(seed)
    return {n: g.standard_normal(width).astype(np.float32) for n in layers}


def _by_hand(model, directions: dict[int, np.ndarray], coeff: float):
    """Logits with ``coeff·direction.N`` added to the output of model.layers[N] by plain hooks."""
    handles = [model.model.layers[n].register_forward_hook(lambda m, a, out, v=torch.from_numpy(v): out + coeff * v)
               for n, v in directions.items()]
    try:
        with torch.no_grad():
            return model(IDS).logits
    finally:
        for h in handles:
            h.remove()


def test_a_control_vector_becomes_a_mean_map_on_the_decoder_layers(tmp_path):
    model = make_llama()
    dirs = _directions()
    tmap = import_vector(_write(tmp_path / "cv.gguf", {f"direction.{n}": v for n, v in dirs.items()}), model)
    assert tmap.modules == ["model.layers.1", "model.layers.2"]
    for n, v in dirs.items():
        m = tmap.maps[f"model.layers.{n}"]
        assert torch.equal(m.shift, torch.from_numpy(v)) and torch.equal(m.scale, torch.ones(HIDDEN)) and not m.bounded
    c = tmap.config
    assert (c.method, c.support, c.unbounded) == ("mean", "all", True) and "cv.gguf" in c.data
    with torch.no_grad():
        base = model(IDS).logits
    for coeff in (0.0, 0.7, -1.5, 3.0):  # any real coefficient, as repeng's coeff and llama.cpp's scale
        with at.steer(model, tmap, coeff), torch.no_grad():
            steered = model(IDS).logits
        torch.testing.assert_close(steered, _by_hand(model, dirs, coeff), rtol=0, atol=1e-6)
        assert torch.equal(steered, base) == (coeff == 0.0)


def test_export_then_import_round_trips(tmp_path):
    model = make_llama()
    dirs = _directions(layers=(1, 2))
    tmap = import_vector(_write(tmp_path / "cv.gguf", {f"direction.{n}": v for n, v in dirs.items()}), model)
    again = write_control_vector(tmp_path / "again.gguf", control_vectors(tmap, 1.0), "llama")
    vectors, hint = read_control_vector(again)
    assert hint == "llama" and sorted(vectors) == [1, 2]
    assert all(torch.equal(vectors[n], torch.from_numpy(dirs[n])) for n in dirs)
    back = import_vector(again, model)
    assert back.modules == tmap.modules and all(torch.equal(back.maps[s].shift, tmap.maps[s].shift) for s in tmap.modules)
    tmap.save(tmp_path / "map")  # a saved import loads and steers like any map
    loaded = at.load(tmp_path / "map", model=model)
    with at.steer(model, loaded, -2.0), torch.no_grad():
        steered = model(IDS).logits
    torch.testing.assert_close(steered, _by_hand(model, dirs, -2.0), rtol=0, atol=1e-6)


def test_f16_directions_are_read(tmp_path):
    dirs = _directions(layers=(2,))
    path = _write(tmp_path / "cv.gguf", {"direction.2": dirs[2].astype(np.float16)})
    vectors, _ = read_control_vector(path)
    assert vectors[2].dtype == torch.float32 and torch.equal(vectors[2], torch.from_numpy(dirs[2].astype(np.float16).astype(np.float32)))


@pytest.mark.parametrize("case, match", [
    ("width", "width 16, but the model's hidden width is 32"),
    ("layer", r"layer\(s\) \[5\], but the model has layers 0..2"),
    ("arch", "not a llama.cpp control vector"),
    ("name", "'token_embd.weight' is not a control vector's direction.N"),
    ("empty", "without any direction"),
    ("nan", "NaN or infinite"),
    ("matrix", "a direction is one vector"),
    ("text", "not a readable GGUF file"),
    ("missing", "no such file"),
])
def test_bad_files_get_one_clear_error(tmp_path, case, match):
    path = tmp_path / "cv.gguf"
    v = _directions(layers=(1,))[1]
    if case == "width":
        _write(path, {"direction.1": v[:16]})
    elif case == "layer":
        _write(path, {"direction.1": v, "direction.5": v})
    elif case == "arch":
        _write(path, {"token_embd.weight": v}, arch="llama")
    elif case == "name":
        _write(path, {"direction.1": v, "token_embd.weight": v})
    elif case == "empty":
        _write(path, {})
    elif case == "nan":
        _write(path, {"direction.1": np.full_like(v, np.nan)})
    elif case == "matrix":
        _write(path, {"direction.1": np.stack([v, v])})
    elif case == "text":
        path.write_text("direction.1 = [0.1, 0.2]\n")
    with pytest.raises(MapFormatError, match=match):
        import_vector(path, make_llama())


def test_a_model_without_decoder_layers_or_with_two_stacks_is_refused(tmp_path):
    path = _write(tmp_path / "cv.gguf", {"direction.1": _directions(layers=(1,))[1]})
    with pytest.raises(ModuleMatchError, match="no decoder layers"):
        import_vector(path, torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN)))

    class TwoStacks(torch.nn.Module):  # no preset: every ….layers.N counts, and two stacks share numbers
        def __init__(self):
            super().__init__()
            self.text, self.vision = make_llama(), make_llama()

    with pytest.raises(ModuleMatchError, match="cannot tell which stack"):
        import_vector(path, TwoStacks())


def test_cli_import(tmp_path, capsys):
    model, tok = make_llama(), make_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    dirs = _directions(layers=(1, 2))
    path = _write(tmp_path / "cv.gguf", {f"direction.{n}": v for n, v in dirs.items()})
    rc = cli.main(["import", str(path), "--model", str(tmp_path / "model"), "-o", str(tmp_path / "map")])
    out = capsys.readouterr().out
    assert rc == 0 and "2 directions (layers 1..2, width 32)" in out and "map written to" in out
    tmap = at.load(tmp_path / "map", model=model)
    assert torch.equal(tmap.maps["model.layers.2"].shift, torch.from_numpy(dirs[2]))
    # the imported map steers at any real strength from the command line too (unbounded like repeng's coeff)
    rc = cli.main(["generate", str(tmp_path / "model"), "--map", str(tmp_path / "map"), "--prompt", "w3 w4", "--strengths", "0,-2",
                   "--max-new-tokens", "3", "--json"])
    assert rc == 0 and '"strength=-2"' in capsys.readouterr().out
    bad = _write(tmp_path / "bad.gguf", {"direction.9": dirs[1]})
    assert cli.main(["import", str(bad), "--model", str(tmp_path / "model"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.splitlines()  # transformers' loading bar, then the error
    assert err[-1].startswith("acttransport: error: bad.gguf: direction(s) for layer(s) [9]") and "Traceback" not in "".join(err)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ against repeng itself

PAIRS = [
    ("I feel wonderful and full of joy today.", "I feel miserable and full of sorrow today."),
    ("What a delightful, happy morning!", "What a dreadful, gloomy morning!"),
    ("She smiled brightly at the good news.", "She wept bitterly at the bad news."),
    ("Everything is going great for us.", "Everything is going terribly for us."),
    ("The party was fun and cheerful.", "The party was dull and depressing."),
    ("I love this sunny, lovely place.", "I hate this grey, awful place."),
]


@pytest.fixture(scope="module")
def repeng():
    """repeng 0.4.0 (installed by the Makefile with --no-deps: it pins numpy<2). Its annotations
    name ``np.float_``, gone in NumPy 2 (an alias of float64 before): restored for its import."""
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    import repeng

    return repeng


def test_repeng_vector_steers_the_same_through_acttransport(repeng, tmp_path):
    from acttransport.assets import load_model

    model, tok = load_model("smollm2-135m")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dataset = [repeng.DatasetEntry(positive=p, negative=n) for p, n in PAIRS]
    vector = repeng.ControlVector.train(model, tok, dataset, batch_size=12)  # repeng's defaults: layers n-1..1, pca_diff
    n_layers = model.config.num_hidden_layers
    assert sorted(vector.directions) == list(range(1, n_layers))
    path = tmp_path / "happy.gguf"
    vector.export_gguf(str(path))

    tmap = import_vector(path, model)
    assert tmap.modules == [f"model.layers.{n}" for n in range(1, n_layers)]
    # one prompt per call: repeng 0.4.0 reshapes position_ids [1, T] to the batch's [B, T, 1], which
    # fails for B > 1 under transformers 5 (it shares one position row across the batch)
    prompts = [tok(p, return_tensors="pt") for p in ("The weather today is", "My week has been so")]

    def logits(m):
        with torch.no_grad():
            return [m(**ids).logits for ids in prompts]

    base = logits(model)
    ours = {}
    for coeff in (1.5, -2.0):
        with at.steer(model, tmap, coeff):
            ours[coeff] = logits(model)
    cmodel = repeng.ControlModel(model, list(range(1, n_layers)))  # wraps model.layers in place
    try:
        for coeff in (1.5, -2.0):
            cmodel.set_control(vector, coeff)
            theirs = logits(cmodel)
            for b, o, t in zip(base, ours[coeff], theirs):
                assert (t - b).abs().mean() > 0.5  # the vector moves the logits: there is something to agree on
                torch.testing.assert_close(o, t, rtol=0, atol=1e-5)  # bit-identical here: both add coeff·direction in float32
        cmodel.reset()
    finally:
        cmodel.unwrap()
    assert all(torch.equal(a, b) for a, b in zip(logits(model), base))  # unwrapped: the model is its own again
