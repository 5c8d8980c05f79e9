"""The playground page (Gradio): Text, Image and Fit tabs over :mod:`.backend` and :mod:`.views`.

State: the models live in one :class:`~.backend.Playground` per process; each browser session
has its own maps (a ``gr.State``), so a map fitted in one tab is invisible to another. Every
event that runs a model shares one queue (``concurrency_id="model"``, one at a time): steering
hooks are global to a model. Bad input ends in ``gr.Error`` with the library's one-line message.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

from ..artifact import TransportMap
from ..errors import ActTransportError, ConfigError
from ..methods import METHODS
from .backend import KINDS, Playground, compose_selected, fit_map, load_map, parse_lines, score_texts, stream_pair
from .views import caption_of, diagnose_map, diagnostics_figure, draw_grid, draw_pair, module_widths, parse_strengths, readings, summary, to_pil

__all__ = ["DATASETS", "NONE", "build_app"]

NONE = "(none)"
PASTE = "(paste or upload)"
#: Shipped data sets the Fit tab can fill the lists from: label → (kind, loader of (source, target)).
DATASETS: dict[str, tuple[str, Callable[[int], tuple[list[str], list[str]]]]] = {}


def _pair(name: str) -> Callable[[int], tuple[list[str], list[str]]]:
    def load(n: int) -> tuple[list[str], list[str]]:
        from ..assets import load_pair_dataset

        d = load_pair_dataset(name).sample(n)
        return d.source, d.target

    return load


def _style(style: str) -> Callable[[int], tuple[list[str], list[str]]]:
    def load(n: int) -> tuple[list[str], list[str]]:
        from ..evaluate.tasks.t2i import style_data

        d = style_data(style, n_fit=n)
        return d.source, d.target

    return load


DATASETS.update({"toxicity (insults → non-insults)": ("text", _pair("toxicity")), "toxigen (toxic → benign)": ("text", _pair("toxigen"))})
DATASETS.update({f"toy: plain → {s} style": ("image", _style(s)) for s in ("striped", "dotted", "outline")})

STEER_NOTE = ("One model is steered by one map at a time: with two maps selected, each is taken at its own λ and the two are composed "
              "into one map (`acttransport.compose`: same modules, maps fitted with support `all`); otherwise select one.")


def _guard(fn: Callable) -> Callable:
    """``fn`` with the library's errors (and any other) shown in the page as one line (``gr.Error``)."""
    import gradio as gr

    def error(e: Exception) -> Exception:
        msg = str(e) if isinstance(e, ActTransportError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return gr.Error(msg, print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*a: Any, **k: Any) -> Any:
            try:
                yield from fn(*a, **k)
            except gr.Error:
                raise
            except Exception as e:  # noqa: BLE001
                raise error(e) from None

        return gen

    @functools.wraps(fn)
    def call(*a: Any, **k: Any) -> Any:
        try:
            return fn(*a, **k)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001
            raise error(e) from None

    return call


def _initial_maps(pg: Playground) -> dict[str, dict[str, TransportMap]]:
    maps: dict[str, dict[str, TransportMap]] = {k: {} for k in KINDS}
    for kind, name, tmap in pg.maps:
        maps[kind][name] = tmap
    return maps


def _choices(maps: dict[str, dict[str, TransportMap]]) -> tuple[Any, ...]:
    """Updates of the map dropdowns: the text tab's two slots and the image tab's one."""
    import gradio as gr

    text, image = [NONE, *maps["text"]], [NONE, *maps["image"]]
    newest_text = list(maps["text"])[-1] if maps["text"] else NONE
    newest_image = list(maps["image"])[-1] if maps["image"] else NONE
    return (gr.update(choices=text, value=newest_text), gr.update(choices=text, value=NONE), gr.update(choices=image, value=newest_image))


def _selected(maps: dict[str, dict[str, TransportMap]], kind: str, picks: list[tuple[str, float]]) -> tuple[TransportMap | None, float]:
    """The selected maps of this session (composed when several), or ``(None, 0)`` when none is selected.

    Raises:
        ConfigError: a name is not a map of this session (maps fitted or loaded in another tab are not shared).
    """
    chosen = [(name, float(lam)) for name, lam in picks if name and name != NONE]
    for name, _ in chosen:
        if name not in maps[kind]:
            have = ", ".join(maps[kind]) or "none yet"
            raise ConfigError(f"no {kind} map named {name!r} in this session (it has: {have}); fit one in the Fit tab or load a folder")
    return compose_selected([(maps[kind][name], lam) for name, lam in chosen])


def _fmt_score(p: float | None, gate: str) -> str:
    parts = [] if p is None else [f"**p(toxic)** {p:.3f} (toxicity judge)"]
    return " · ".join(parts + ([gate] if gate else []))


def build_app(pg: Playground) -> Any:
    """The playground as a ``gradio.Blocks`` (launch it with ``.queue().launch(...)``; see :func:`acttransport.ui.launch`)."""
    import gradio as gr

    def do_load(maps: dict, folder: str) -> tuple[Any, ...]:
        kind, tmap = load_map(pg, folder)
        from pathlib import Path

        maps = {k: dict(v) for k, v in maps.items()}
        name = Path(folder.strip()).name or "map"
        maps[kind][name] = tmap
        return (maps, f"loaded the {kind} map **{name}**: {tmap!r}", *_choices(maps))

    def do_generate(maps: dict, prompt: str, m1: str, l1: float, m2: str, l2: float, seed: float, max_new: float, greedy: bool,
                    temperature: float, top_p: float, penalty: float) -> Any:
        tmap, lam = _selected(maps, "text", [(m1, l1), (m2, l2)])
        plain = steered = ""
        info: dict[str, Any] = {}
        for plain, steered in stream_pair(pg, tmap, prompt, lam, int(seed), int(max_new), greedy, temperature, top_p, penalty, info):
            yield plain, steered, "", ""
        scores = score_texts(pg, [plain, steered] if tmap is not None else [plain])
        gate = info.get("gate", "")
        yield (plain, steered, _fmt_score(scores[0] if scores else None, ""),
               _fmt_score(scores[1] if scores and tmap is not None else None, gate) if tmap is not None else "no map selected")

    def do_draw(maps: dict, prompts: str, name: str, lam: float, per_prompt: float, seed: float) -> tuple[Any, ...]:
        tmap, lam = _selected(maps, "image", [(name, lam)])
        lines = parse_lines(prompts)
        plain, steered = draw_pair(pg, tmap, lines, lam, int(seed), int(per_prompt))
        cols = [p for p in lines for _ in range(int(per_prompt))]

        def gallery(imgs: Any) -> tuple[list, str]:
            if imgs is None:
                return [], "no map selected"
            reads = readings(pg, imgs)
            return list(zip(to_pil(imgs), [caption_of(r) for r in reads])), summary(reads, cols)

        return (*gallery(plain), *gallery(steered))

    def do_grid(maps: dict, prompts: str, name: str, strengths: str, per_prompt: float, seed: float) -> Any:
        tmap, _ = _selected(maps, "image", [(name, 1.0)])
        if tmap is None:
            raise gr.Error("select an image map for the grid (fit one in the Fit tab or load a folder)", print_exception=False)
        import tempfile

        from PIL import Image

        with tempfile.TemporaryDirectory(prefix="acttransport-grid-") as tmp:
            path = draw_grid(pg, tmap, parse_lines(prompts), parse_strengths(strengths, tmap.config.unbounded), int(seed), int(per_prompt),
                             out=f"{tmp}/grid.png")
            with Image.open(path) as im:
                return im.copy()

    def do_dataset(label: str, n: float) -> tuple[Any, ...]:
        if label not in DATASETS:
            return gr.update(), gr.update(), gr.update(), gr.update()
        kind, loader = DATASETS[label]
        source, target = loader(int(n) if n else 64)
        # style control adds a concept everywhere: support all (Q∞), as the paper's induction runs
        return "\n".join(source), "\n".join(target), kind, "all" if kind == "image" else "(method default)"

    def do_modules(kind: str, pattern: str) -> list[list[Any]]:
        return [[s, w] for s, w in module_widths(pg, kind, pattern)]

    def do_fit(maps: dict, kind: str, src: str, src_file: Any, tgt: str, tgt_file: Any, method: str, pattern: str, support: str,
               lam: float, n: float, name: str, gate: str, progress: Any = gr.Progress(track_tqdm=True)) -> tuple[Any, ...]:
        source, target = parse_lines(src, src_file), parse_lines(tgt, tgt_file)
        hold = kind == "text" and min(len(source), len(target)) >= 8  # a quarter held out for the diagnostics
        fit_s, fit_t = (source[len(source) // 4:], target[len(target) // 4:]) if hold else (source, target)
        progress(0, desc="fitting")
        tmap = fit_map(pg, kind, fit_s, fit_t, method, pattern, None if support == "(method default)" else support, lam,
                       int(n) if n else None, gate=None if gate == NONE else gate)
        fig, diag_note = None, "diagnostics: text maps only"
        if kind == "text":
            progress(0.9, desc="diagnostics")
            diag = diagnose_map(pg, tmap, source[: len(source) // 4] if hold else source, target[: len(target) // 4] if hold else target, hold)
            tmap = dataclasses.replace(tmap, config=tmap.config.replace(diagnostics=diag))  # keeps a gate
            fig = diagnostics_figure(diag)
            from ..diagnose import summarize

            diag_note = summarize(diag)
        maps = {k: dict(v) for k, v in maps.items()}
        key = (name or "").strip() or f"{kind}-map-{len(maps[kind]) + 1}"
        maps[kind][key] = tmap
        status = (f"fitted **{key}**: {tmap.config.method} on {len(tmap.maps)} modules from {tmap.config.n_samples} pairs "
                  f"(support {tmap.config.support}, default λ {tmap.config.strength:g}); select it in the {kind.title()} tab.\n\n{diag_note}")
        if getattr(tmap, "gate", None) is not None:
            status += f"\n\n{tmap.gate.describe()}"
        return (maps, status, fig, key, *_choices(maps))

    def do_save(maps: dict, kind: str, name: str, folder: str) -> str:
        if not (folder or "").strip():
            raise ConfigError("give a folder to save the map into")
        tmap = maps.get(kind, {}).get((name or "").strip())
        if tmap is None:
            raise ConfigError(f"no {kind} map named {name!r} in this session; fit one first (its name is the Fit tab's 'map name')")
        return f"saved {name} to {tmap.save(folder.strip())}"

    models = " · ".join(x for x in (f"text model **{pg.model_id}**" if pg.model is not None else "",
                                     f"image pipeline **{pg.pipe_id}**" if pg.pipe is not None else "") if x)
    with gr.Blocks(title="acttransport playground", analytics_enabled=False) as demo:
        start = _initial_maps(pg)
        maps = gr.State(start)
        text_maps, image_maps = [NONE, *start["text"]], [NONE, *start["image"]]
        gr.Markdown(f"## acttransport playground\n{models}. Fit a map from two lists (Fit tab), slide λ, compare unsteered and steered.")
        with gr.Accordion("Load a map folder", open=False):
            with gr.Row():
                folder = gr.Textbox(label="map folder (from `acttransport fit` or Save)", scale=4, elem_id="load-folder")
                load_btn = gr.Button("Load map", scale=1, elem_id="load-map")
            load_msg = gr.Markdown()
        with gr.Tabs():
            with gr.Tab("Text", id="text", elem_id="tab-text"):
                prompt = gr.Textbox(label="prompt", value="The man said that", elem_id="prompt")
                with gr.Row():
                    m1 = gr.Dropdown(text_maps, value=text_maps[-1], label="map", allow_custom_value=True, elem_id="text-map-1")
                    l1 = gr.Slider(0, 1, value=1.0, step=0.05, label="λ (map)", elem_id="text-lambda-1")
                    m2 = gr.Dropdown(text_maps, value=NONE, label="second map (optional)", allow_custom_value=True)
                    l2 = gr.Slider(0, 1, value=1.0, step=0.05, label="λ (second map)")
                gr.Markdown(STEER_NOTE)
                with gr.Accordion("decoding", open=False):
                    with gr.Row():
                        seed = gr.Number(0, label="seed", precision=0)
                        max_new = gr.Number(32, label="new tokens", precision=0)
                        greedy = gr.Checkbox(False, label="greedy")
                        temp = gr.Number(1.0, label="temperature")
                        top_p = gr.Number(0.3, label="top p")
                        penalty = gr.Number(1.2, label="repetition penalty")
                gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Row():
                    with gr.Column():
                        out_plain = gr.Textbox(label="unsteered", lines=5, elem_id="out-plain")
                        score_plain = gr.Markdown(elem_id="score-plain")
                    with gr.Column():
                        out_steer = gr.Textbox(label="steered", lines=5, elem_id="out-steered")
                        score_steer = gr.Markdown(elem_id="score-steered")
            with gr.Tab("Image", id="image", elem_id="tab-image"):
                prompts = gr.Textbox(label="prompts (one per line)", value="a red circle\na blue square", lines=3, elem_id="img-prompts")
                with gr.Row():
                    im_map = gr.Dropdown(image_maps, value=image_maps[-1], label="map", allow_custom_value=True, elem_id="image-map")
                    im_lam = gr.Slider(0, 1, value=1.0, step=0.05, label="λ", elem_id="image-lambda")
                    per_prompt = gr.Number(2, label="images per prompt", precision=0)
                    im_seed = gr.Number(0, label="seed (image k: seed + k)", precision=0)
                draw_btn = gr.Button("Draw", variant="primary", elem_id="draw")
                with gr.Row():
                    with gr.Column():
                        gal_plain = gr.Gallery(label="unsteered (the toy judge's style reading under each image)", columns=4, height=170,
                                               object_fit="contain", elem_id="gal-plain")
                        read_plain = gr.Markdown(elem_id="read-plain")
                    with gr.Column():
                        gal_steer = gr.Gallery(label="steered, from the same noise", columns=4, height=170, object_fit="contain",
                                               elem_id="gal-steered")
                        read_steer = gr.Markdown(elem_id="read-steered")
                with gr.Row():
                    strengths = gr.Textbox("0,0.5,1", label="grid strengths (rows)", scale=3)
                    grid_btn = gr.Button("Grid", scale=1, elem_id="grid")
                grid_img = gr.Image(label="λ grid (as `acttransport images -o GRID.png`)", type="pil", format="png", elem_id="grid-image")
            with gr.Tab("Fit", id="fit", elem_id="tab-fit"):
                with gr.Row():
                    kind = gr.Radio(list(KINDS), value="text" if pg.model is not None else "image", label="fit on")
                    dataset = gr.Dropdown([PASTE, *DATASETS], value=PASTE, label="shipped data set (fills the lists)", elem_id="fit-dataset")
                    n_max = gr.Number(64, label="at most N per list", precision=0, elem_id="fit-n")
                with gr.Row():
                    with gr.Column():
                        src = gr.Textbox(label="source (move away from), one per line", lines=6, max_lines=10, elem_id="fit-source")
                        src_file = gr.File(label="or upload a source file (.txt / .jsonl)", type="filepath", height=130)
                    with gr.Column():
                        tgt = gr.Textbox(label="target (move towards), one per line", lines=6, max_lines=10, elem_id="fit-target")
                        tgt_file = gr.File(label="or upload a target file", type="filepath", height=130)
                with gr.Row():
                    method = gr.Dropdown(sorted(METHODS), value="linear", label="method")
                    support = gr.Dropdown(["(method default)", "observed", "all", "quantile:0.01"], value="(method default)", label="support")
                    fit_lam = gr.Slider(0, 1, value=1.0, step=0.05, label="default λ of the map")
                    gate = gr.Dropdown([NONE, "probe", "ratio", "cosine"], value=NONE, label="gate (steer only source-like inputs)")
                    name = gr.Textbox("my-map", label="map name", elem_id="fit-name")
                with gr.Row():
                    pattern = gr.Textbox(label="modules: patterns or @preset (blank: the architecture's default)", scale=4, elem_id="fit-modules")
                    list_btn = gr.Button("List modules", scale=1)
                table = gr.Dataframe(headers=["module", "width"], label="what the pattern matches (dry run)", max_height=200)
                fit_btn = gr.Button("Fit", variant="primary", elem_id="fit")
                fit_msg = gr.Markdown(elem_id="fit-status")
                plot = gr.Plot(label="overshoot diagnostics", elem_id="fit-plot")
                with gr.Row():
                    save_dir = gr.Textbox(label="save the map named above to a folder", scale=4)
                    save_btn = gr.Button("Save", scale=1)
                save_msg = gr.Markdown()

        q = dict(concurrency_id="model", concurrency_limit=1)
        drops = [m1, m2, im_map]
        load_btn.click(_guard(do_load), [maps, folder], [maps, load_msg, *drops], api_name="load_map", **q)
        gen_btn.click(_guard(do_generate), [maps, prompt, m1, l1, m2, l2, seed, max_new, greedy, temp, top_p, penalty],
                      [out_plain, out_steer, score_plain, score_steer], api_name="generate", **q)
        draw_btn.click(_guard(do_draw), [maps, prompts, im_map, im_lam, per_prompt, im_seed], [gal_plain, read_plain, gal_steer, read_steer], api_name="draw", **q)
        grid_btn.click(_guard(do_grid), [maps, prompts, im_map, strengths, per_prompt, im_seed], grid_img, api_name="grid", **q)
        dataset.change(_guard(do_dataset), [dataset, n_max], [src, tgt, kind, support], api_name="dataset")
        list_btn.click(_guard(do_modules), [kind, pattern], table, api_name="modules", **q)
        fit_btn.click(_guard(do_fit), [maps, kind, src, src_file, tgt, tgt_file, method, pattern, support, fit_lam, n_max, name, gate],
                      [maps, fit_msg, plot, name, *drops], api_name="fit", **q)
        save_btn.click(_guard(do_save), [maps, kind, name, save_dir], save_msg, api_name="save_map")
    return demo
