"""Maps served by llama.cpp (llama-cpp-python, built by `make llama-cpp`): a control vector on the
shipped SmolLM2 GGUF, and a baked checkpoint converted with llama.cpp's own converter, each
against the transformers model steered by hooks on the same tokens.

What is compared: the per-token change of the logits that steering causes (steered − unsteered,
every position, every vocabulary entry), llama.cpp's against transformers'. The raw logits differ
a little (llama.cpp multiplies Q4_1 weights with 8-bit-quantised activations; transformers runs
the de-quantised float32 copy), so the change is what must agree: correlation ≥ 0.99.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import acttransport as at
from acttransport import assets
from acttransport.bake import bake, save_baked
from acttransport.bake.control_vector import control_vectors, write_control_vector

if os.environ.get("ACTTRANSPORT_NEED_LLAMA_CPP") == "1":  # `make test` builds it: missing there is a failure
    import llama_cpp
else:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run `make llama-cpp`")

CONVERTER = Path(os.environ.get("LLAMA_CPP_CONVERTER", Path(__file__).resolve().parents[1] / ".cache/llama-cpp/convert_hf_to_gguf.py"))
PROMPTS = ["You are such an idiot and everyone", "The weather in Paris today is", "I will never forgive you, you stupid"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ACTTRANSPORT_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("HF_HUB_OFFLINE", "1")
    model, tok = assets.load_model("smollm2-135m")
    data = assets.load_pair_dataset("toxicity").sample(64, 0)
    yield model, tok, data
    mp.undo()


def _ids(tok) -> list[list[int]]:
    return [tok(p)["input_ids"] for p in PROMPTS]


def _hf_logits(model, ids: list[list[int]]) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model(input_ids=torch.tensor([x])).logits[0].float().numpy() for x in ids])


def _cpp(path: Path):
    """A llama.cpp model on its plain CPU weight buffers (use_extra_bufts off, which `Llama()` does not
    expose). With extra buffers on, a llama.cpp built on an AMX CPU (Sapphire Rapids: this project's
    CI) moves the Q4_1 weights into its AMX buffer, and its AMX matmul segfaulted in CI's first decode
    (the upstream report: ggml-org/llama.cpp#20824). The comparison needs llama.cpp's arithmetic, not
    its repacked kernels."""
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama_cpp.llama_cpp, "llama_model_default_params", params)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    assert not llm.model_params.use_extra_bufts
    return llm


def _cpp_logits(llm, ids: list[list[int]]) -> np.ndarray:
    out = []
    for x in ids:
        llm.reset()
        llm.eval(x)
        out.append(np.array(llm.scores[: len(x)], dtype=np.float32))
    return np.concatenate(out)


def _load_cvec(llm, path: Path) -> None:
    """What llama.cpp's common_control_vector_load does with a file, then set on the context."""
    import gguf

    r = gguf.GGUFReader(str(path))
    vecs = {int(t.name.split(".")[1]): np.asarray(t.data, dtype=np.float32) for t in r.tensors}
    n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)
    data = np.zeros(n_embd * max(vecs), dtype=np.float32)  # layer 1 at [0]: layer 0 has none
    for k, v in vecs.items():
        data[(k - 1) * n_embd: k * n_embd] += v
    ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, data.size, n_embd, 1, n_layer) == 0
    llm._cvec_keepalive = data


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.slow
def test_control_vector_in_llama_cpp_matches_hooks(smollm2, tmp_path):
    model, tok, data = smollm2
    tmap = at.estimate(model, tok, data.source, data.target, modules=r"model\.layers\.([1-9]|[12][0-9])", method="mean",
                       max_length=32, progress=False)
    path = write_control_vector(tmp_path / "cv.gguf", control_vectors(tmap, 1.0))
    ids = _ids(tok)
    base = _hf_logits(model, ids)
    with at.steer(model, tmap, 1.0):
        hooked = _hf_logits(model, ids)
    llm = _cpp(assets.gguf_path(assets.EMBEDDED_MODELS["smollm2-135m"]))
    plain = _cpp_logits(llm, ids)
    _load_cvec(llm, path)
    steered = _cpp_logits(llm, ids)
    d_hf, d_cpp = hooked - base, steered - plain
    print(f"\ncontrol vector: mean |Δ logits| {np.abs(d_hf).mean():.3f}, correlation llama.cpp vs hooks {_corr(d_hf, d_cpp):.4f}, "
          f"argmax agreement {np.mean(d_hf.argmax(-1) == d_cpp.argmax(-1)):.3f}, steered argmax agreement {np.mean(hooked.argmax(-1) == steered.argmax(-1)):.3f}")
    assert np.abs(d_hf).mean() > 0.1  # steering moves the logits: there is something to agree on
    assert _corr(d_hf, d_cpp) >= 0.99, _corr(d_hf, d_cpp)


@pytest.mark.slow
def test_baked_checkpoint_converted_by_llama_cpp_matches_hooks(smollm2, tmp_path):
    assert CONVERTER.is_file(), f"{CONVERTER} missing: run `make llama-cpp`"
    model, tok, data = smollm2
    tmap = at.estimate(model, tok, data.source, data.target, modules="@all-norms", support="all", max_length=32, progress=False)
    ids = _ids(tok)
    base = _hf_logits(model, ids)
    with at.steer(model, tmap, 1.0):
        hooked = _hf_logits(model, ids)
    ggufs = {}
    for name, lam in (("plain", 0.0), ("baked", 1.0)):
        baked, p = bake(model, tmap, lam)
        save_baked(baked, tok, tmp_path / name, tmap, lam, p)
        ggufs[name] = tmp_path / f"{name}.gguf"
        subprocess.run([sys.executable, str(CONVERTER), str(tmp_path / name), "--outtype", "f32", "--outfile", str(ggufs[name])],
                       check=True, capture_output=True)
        del baked
    plain = _cpp_logits(_cpp(ggufs["plain"]), ids)
    steered = _cpp_logits(_cpp(ggufs["baked"]), ids)
    d_hf, d_cpp = hooked - base, steered - plain
    print(f"\nbaked GGUF: mean |Δ logits| {np.abs(d_hf).mean():.3f}, correlation llama.cpp vs hooks {_corr(d_hf, d_cpp):.6f}, "
          f"max |logits llama.cpp − hooks| {np.abs(steered - hooked).max():.2e}")
    assert np.abs(d_hf).mean() > 0.1
    assert _corr(d_hf, d_cpp) >= 0.99, _corr(d_hf, d_cpp)
    assert np.abs(steered - hooked).max() < 1e-2 * np.abs(hooked).max()  # float32 both sides: the logits themselves agree
