"""The toy text-to-image stack: renderer, pipeline mechanics, shipped weights, training smoke run."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from acttransport.toy.judge import ToyJudge, load_toy_judge  # noqa: E402
from acttransport.toy.pipeline import (  # noqa: E402
    MAX_TOKENS, ToyTextToImagePipeline, build_tokenizer, load_toy_pipeline, tiny_random_pipeline,
)
from acttransport.toy.render import (  # noqa: E402
    COLOURS, SHAPES, STYLES, all_captions, caption, dataset, parse_caption, render,
)
from acttransport.toy.samples import generate_captions  # noqa: E402
from acttransport.toy.train import train_toy  # noqa: E402
from acttransport.toy.weights import RECREATE_COMMAND, ToyWeightsMissingError, default_weights_dir  # noqa: E402

TOY_DIR = default_weights_dir().parent


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---------------------------------------------------------------- renderer


def test_render_is_deterministic_and_in_range():
    a = render("circle", "red", "striped", 7)
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, render("circle", "red", "striped", 7))
    assert torch.equal(a, render("circle", "red", "striped", np.random.default_rng(7)))
    assert not torch.equal(a, render("circle", "red", "striped", 8))
    assert not torch.equal(a, render("circle", "red", "plain", 7))
    corner = (a[:, 0, 0] + 1) / 2  # light background
    assert corner.min() > 0.8
    with pytest.raises(ValueError, match="unknown shape"):
        render("hexagon", "red", "plain", 0)


def test_dataset_is_deterministic_and_captions_parse():
    x, labels, caps = dataset(40, seed=3)
    x2, labels2, caps2 = dataset(40, seed=3)
    assert x.shape == (40, 3, 16, 16) and torch.equal(x, x2) and caps == caps2
    assert all(torch.equal(labels[k], labels2[k]) for k in labels)
    for i, text in enumerate(caps):
        assert parse_caption(text) == (SHAPES[labels["shape"][i]], COLOURS[labels["colour"][i]],
                                       STYLES[labels["style"][i]])
    assert not torch.equal(x, dataset(40, seed=4)[0])


def test_captions_round_trip():
    assert caption("circle", "red", "plain") == "a red circle"
    assert caption("circle", "red", "striped") == "a red circle, striped style"
    assert parse_caption("a red circle, plain style") == ("circle", "red", "plain")
    triples = all_captions()
    assert len(triples) == len(SHAPES) * len(COLOURS) * len(STYLES) == len({caption(*t) for t in triples})
    assert all(parse_caption(caption(*t)) == t for t in triples)
    for bad in ("a red", "red circle", "a red circle, striped", "a red blob, plain style"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_tokenizer_ids_are_fixed():
    tok = build_tokenizer()
    ids = tok(["a red circle, striped style", ""], padding="max_length", max_length=MAX_TOKENS).input_ids
    assert ids[1][:2] == [tok.bos_token_id, tok.eos_token_id] and len(ids[0]) == MAX_TOKENS
    assert tok.unk_token_id not in ids[0]
    words = [tok.convert_ids_to_tokens(i) for i in ids[0][1:7]]
    assert words == ["a", "red", "circle", ",", "striped", "style"]


# ---------------------------------------------------------------- pipeline mechanics


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_pipeline(seed=0)


def test_tiny_pipeline_shapes_and_reproducibility(tiny):
    assert isinstance(tiny, ToyTextToImagePipeline)
    out = tiny(["a red circle", "a blue square, dotted style"], num_images_per_prompt=2, num_inference_steps=4,
               generator=_gens([1, 2, 3, 4]))
    img = out.images
    assert img.shape == (4, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    again = tiny(["a red circle", "a blue square, dotted style"], num_images_per_prompt=2, num_inference_steps=4,
                 generator=_gens([1, 2, 3, 4])).images
    assert torch.equal(img, again)
    other = tiny(["a red circle", "a blue square, dotted style"], num_images_per_prompt=2, num_inference_steps=4,
                 generator=_gens([1, 2, 3, 5])).images
    assert torch.equal(img[:3], other[:3]) and not torch.equal(img[3], other[3])  # per-image seeds
    single = tiny("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(1)).images
    assert torch.allclose(single[0], img[0], atol=1e-5)
    assert tiny("a red circle", num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)
    pil = tiny("a red circle", num_inference_steps=2, output_type="pil").images
    assert len(pil) == 1 and pil[0].size == (16, 16)
    assert isinstance(tiny("a red circle", num_inference_steps=2, return_dict=False), tuple)
    with pytest.raises(ValueError, match="generators"):
        tiny(["a", "b"], num_inference_steps=2, generator=_gens([1]))


def _count_unet(pipe):
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].shape[0], kwargs["encoder_hidden_states"].clone()))

    return calls, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_cfg_runs_one_unet_call_per_step_on_a_doubled_batch(tiny):
    calls, handle = _count_unet(tiny)
    try:
        tiny(["a red circle", "a green cross"], num_inference_steps=5, guidance_scale=3.0, generator=_gens([0, 1]))
        assert [b for b, _ in calls] == [4] * 5
        states = calls[0][1]
        uncond, cond = tiny.encode_prompt(["", ""], do_classifier_free_guidance=False)[0], \
            tiny.encode_prompt(["a red circle", "a green cross"], do_classifier_free_guidance=False)[0]
        assert torch.equal(states[:2], uncond) and torch.equal(states[2:], cond)  # unconditional first
        calls.clear()
        tiny(["a red circle", "a green cross"], negative_prompt="a red circle", num_inference_steps=3,
             generator=_gens([0, 1]))
        assert torch.allclose(calls[0][1][0], calls[0][1][2], atol=1e-6)  # the negative prompt is the first half
        calls.clear()
        tiny(["a red circle", "a green cross"], num_inference_steps=5, guidance_scale=1.0, generator=_gens([0, 1]))
        assert [b for b, _ in calls] == [2] * 5
    finally:
        handle.remove()


def test_callback_on_step_end(tiny):
    seen = []

    def callback(pipe, step_index, timestep, callback_kwargs):
        seen.append((step_index, int(timestep), tuple(callback_kwargs["latents"].shape)))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step_index == 3 else {}

    img = tiny("a red circle", num_inference_steps=4, generator=_gens([0]), callback_on_step_end=callback).images
    assert [s for s, _, _ in seen] == [0, 1, 2, 3] and seen[0][2] == (1, 3, 16, 16)
    assert seen[0][1] > seen[-1][1] >= 1  # "leading" spacing with steps_offset=1 ends at t = 1
    assert torch.allclose(img, torch.full_like(img, 0.5))


def test_missing_weights_name_the_recreate_command(tmp_path):
    with pytest.raises(ToyWeightsMissingError, match="acttransport.toy.train"):
        load_toy_pipeline(path=tmp_path)
    with pytest.raises(ToyWeightsMissingError, match="--out"):
        load_toy_judge(path=tmp_path)
    assert "--steps 2400" in RECREATE_COMMAND


# ---------------------------------------------------------------- shipped weights


@pytest.fixture(scope="module")
def shipped_judge():
    return load_toy_judge()


def test_shipped_files_and_report():
    root = default_weights_dir()
    report = json.loads((root / "training_report.json").read_text())
    assert report["seed"] == 0 and report["steps"] >= 1200
    assert min(report["generated"]["accuracy"].values()) >= 0.9
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size < 12 * 2**20
    assert not list(root.rglob("*.bin")) and not list(root.rglob("*.pt")) and not list(root.rglob("*.pkl"))


def test_shipped_judge_reads_fresh_renders(shipped_judge):
    x, labels, _ = dataset(600, seed=987_654)
    acc = shipped_judge.accuracy((x + 1) / 2, labels)
    assert set(acc) == {"shape", "colour", "style"}
    assert min(acc.values()) >= 0.95, acc
    pred = shipped_judge.predict((x[:3] + 1) / 2)
    assert pred["colour"]["prob"].shape == (3, len(COLOURS)) and len(pred["shape"]["label"]) == 3
    assert torch.allclose(pred["style"]["prob"].sum(-1), torch.ones(3))


def test_shipped_pipeline_generates_what_it_is_told(shipped_judge):
    pipe = load_toy_pipeline()
    triples = [("circle", "red", "plain"), ("circle", "red", "striped"), ("square", "blue", "dotted"),
               ("triangle", "yellow", "outline"), ("cross", "green", "striped"), ("diamond", "purple", "plain")]
    images = generate_captions(pipe, triples, per_caption=4, seed=11)
    assert images.shape == (24, 3, 16, 16)
    want = {k: [t[j] for t in triples for _ in range(4)] for j, k in enumerate(("shape", "colour", "style"))}
    acc = shipped_judge.accuracy(images, want)
    assert min(acc.values()) >= 0.9, acc
    explicit = pipe("a red circle, plain style", num_images_per_prompt=4, generator=_gens(range(4))).images
    assert shipped_judge.predict(explicit)["style"]["label"].count("plain") >= 3


# ---------------------------------------------------------------- training smoke run


def test_train_toy_smoke_writes_a_loadable_folder(tmp_path):
    out = tmp_path / "weights"
    kw = dict(seed=3, steps=2, judge_steps=2, n_train=128, judge_images=128, eval_per_caption=1,
              eval_inference_steps=1, progress=False)
    report = train_toy(out, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]  # no temp folder left behind
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "tokenizer/tokenizer.json", "scheduler/scheduler_config.json", "judge/model.safetensors",
                 "judge/config.json", "training_report.json", "samples.png", "reference.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "training_report.json").read_text())["generated"]["n_images"] == len(all_captions())
    assert set(report["versions"]) >= {"torch", "diffusers", "transformers"}
    pipe = load_toy_pipeline(path=out)
    assert pipe("a red circle", num_inference_steps=2, generator=_gens([0])).images.shape == (1, 3, 16, 16)
    assert isinstance(load_toy_judge(path=out), ToyJudge)
    first = (out / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    train_toy(out, **{**kw, "eval_per_caption": 0})  # replaces the folder; same seed, same weights
    assert (out / "unet/diffusion_pytorch_model.safetensors").read_bytes() == first
    assert not (out / "samples.png").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        train_toy(tmp_path / "other", **kw)


# ---------------------------------------------------------------- package hygiene


def test_import_acttransport_does_not_import_toy():
    code = "import sys, acttransport; assert 'acttransport.toy' not in sys.modules; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_modules_declare_all_and_stay_small():
    import acttransport.toy as toy

    for path in sorted(TOY_DIR.glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 400, path.name
        tree = ast.parse(text)
        names = [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name)]
        assert "__all__" in names, path.name
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("acttransport")):
                assert not any(a.name.startswith("_") for a in node.names), (path.name, node.module)
    for name in toy.__all__:
        assert getattr(toy, name) is not None
