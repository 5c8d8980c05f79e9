"""The package's shape: layers without import cycles, no private names across modules, a small
declared API, no heavy imports at ``import acttransport``, small files, and maps of the
previous format that load and re-fit to float32 rounding (the tiny model's forward pass rounds by the CPU's kernels)."""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import acttransport as at
from acttransport.artifact import read_map

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "acttransport"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None]]:
    """``(target module, imported name or None)`` for every import anywhere in the module
    (function-level imports included), restricted to acttransport."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.split(".")[0] == "acttransport"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            if target.split(".")[0] == "acttransport":
                out += [(target, a.name) for a in node.names]
    return out


def _edges() -> dict[str, set[str]]:
    """Module → the acttransport modules it imports. ``from pkg import sub`` counts as an import
    of ``pkg.sub`` when that is a module, else of ``pkg`` (its ``__init__``)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, name in _imports(m):
            sub = f"{target}.{name}" if name else None
            dest = sub if sub in MODULES else target
            if dest in MODULES and dest != m:
                graph[m].add(dest)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_import_graph_has_no_cycles():
    cycle = find_cycle(_edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_lazy_imports_and_would_catch_a_cycle():
    graph = _edges()
    assert "acttransport.evaluate.judges.toxicity" in graph["acttransport.evaluate.demo"]  # a function-level import
    assert "acttransport.engine.estimate" in graph["acttransport.engine"]  # a package's re-export
    back = {**graph, "acttransport.errors": {"acttransport.steer"}}  # steer imports errors: this closes a cycle
    assert find_cycle(back) is not None and "acttransport.errors" in find_cycle(back)


#: The layers, bottom first, as the README's Architecture section lists them.
LAYERS = ["_version", "errors", "_io", "transport", "methods", "artifact", "targets", "options", "runners", "engine", "gating", "steer",
          "bake", "diagnose", "generation", "selection", "toy", "assets", "evaluate", "ui", "serve", "cli", "__main__", ""]


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 else "")


def test_every_import_points_down_the_layers():
    assert {m.split(".")[1] for m in MODULES if "." in m} <= set(LAYERS)
    up = [(m, n) for m, ns in _edges().items() for n in ns if _layer(n) > _layer(m)]
    assert not up, f"imports from a lower layer up to a higher one: {up}"
    # the core never imports the evaluations or the CLI; the artifact never imports steering code
    assert _layer("acttransport.evaluate") > max(_layer(m) for m in MODULES if m.split(".")[1:2] in (["steer"], ["engine"], ["assets"]))
    assert _layer("acttransport.artifact") < _layer("acttransport.steer")


def test_no_module_imports_another_modules_private_names():
    bad = [(m, t, n) for m in MODULES for t, n in _imports(m) if n and n.startswith("_") and not n.startswith("__") and t != m]
    assert not bad, bad


def _private_uses(path: Path) -> list[str]:
    """``from acttransport.x import _y`` and ``mod._y`` where ``mod`` is a bound acttransport module."""
    tree = ast.parse(path.read_text(), str(path))
    bound: set[str] = set()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("acttransport"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    out.append(f"{node.module}.{a.name}")
                full = f"{node.module}.{a.name}"
                if full in MODULES:
                    bound.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("acttransport"):
                    bound.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if isinstance(node.value, ast.Name) and node.value.id in bound:
                out.append(f"{node.value.id}.{node.attr}")
    return out


def test_tests_and_benchmarks_use_public_names_only():
    files = [p for p in (ROOT / "tests").glob("*.py")] + list((ROOT / "benchmarks").glob("*.py"))
    bad = {p.name: u for p in files if (u := _private_uses(p))}
    assert not bad, bad


def test_every_module_declares_all_and_it_names_real_things():
    for m in MODULES:
        if m.endswith("__main__"):  # runs the CLI on import
            continue
        mod = importlib.import_module(m)
        assert isinstance(getattr(mod, "__all__", None), list), f"{m} declares no __all__"
        missing = [n for n in mod.__all__ if not hasattr(mod, n)]
        assert not missing, f"{m}.__all__ names missing attributes {missing}"


def test_public_api_is_small_and_documented():
    assert len(at.__all__) <= 18
    for name in at.__all__:
        assert getattr(at, name).__doc__, name
    assert at.__version__ == importlib.import_module("acttransport._version").__version__


def test_import_acttransport_stays_light():
    code = "import sys, acttransport; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out.replace("'", '"')))
    assert not loaded & {"transformers", "sklearn", "matplotlib", "diffusers", "scipy"}, loaded & {"transformers", "sklearn", "matplotlib"}


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


# ------------------------------------------------------------------ the previous format, re-fitted

DATA = ROOT / "tests" / "data" / "maps_v0_1"  # written by acttransport 0.1.0 at commit ac2a411
CASES = {
    "linear_causal": dict(method="linear", support="observed", causal=True),
    "mean_all": dict(method="mean", support="all", causal=False),
    "quantile_q05": dict(method="quantile", support="quantile:0.05", causal=True, knots=8),
    "caa_last": dict(method="caa", support="all", causal=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_maps_of_the_previous_version_load_and_refit_to_rounding(case):
    from conftest import make_llama, make_tokenizer, sentences

    old = at.load(DATA / case, model=make_llama())
    assert old.config.version == "0.1.0" and old.config.model == "llama"
    model, tok = make_llama(), make_tokenizer()
    src, tgt = sentences(24, 2, 100, seed=1), sentences(30, 150, 300, seed=2)
    pattern = [r"model\.layers\.\d\.post_attention_layernorm", r"model\.layers\.1\.self_attn:0"]
    with pytest.warns(UserWarning, match="subsampled"):
        new = at.estimate(model, tok, src, tgt, pattern, batch_size=16, max_length=128, seed=3, progress=False, **CASES[case])
    assert new.modules == old.modules and new.config.notes == old.config.notes
    for name in old.modules:  # the tiny model's float32 forward rounds by the CPU's kernels (AVX2 / AVX-512): equal to ~1e-5
        for key, t in old.maps[name].tensors().items():
            torch.testing.assert_close(new.maps[name].tensors()[key], t, rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")
    old_json, new_json = read_map(DATA / case).to_json(), new.to_json()
    assert old_json.pop("spatial") == "pixel" and new_json.pop("spatial") == "mean"  # format 1 mapped every pixel of a conv map
    assert old_json == {**new_json, "data": ""}
    raw = json.loads((DATA / case / "transport_config.json").read_text())
    assert raw["format"] == "acttransport/1" and new_json["format"] == "acttransport/2"


# ------------------------------------------------------------------ the README's Architecture tree

_ENTRY = re.compile(r"(\s*)([\w.]+/|[\w.]+\.py)(?:\s{2,}(.*)|\s*$)")
_PY = re.compile(r"\b(\w+\.py)\b")


def readme_tree(text: str) -> tuple[set[str], set[str]]:
    """The source files the README's Architecture tree names, relative to ``src/acttransport``,
    and the folders it lists. A line ``name.py`` or ``name/`` is an entry under the nearest
    less-indented folder; a ``*.py`` named in an entry's description (or its continuation lines)
    is a file of the entry's folder (a folder's own line names its files, ``cli/  core.py, ...``;
    a file's line its siblings, ``demo.py ...; demo_t2i.py: ...``); a folder stands for its
    ``__init__.py``."""
    section = text.split("## Architecture", 1)[1]
    block = section.split("```", 2)[1].splitlines()[1:]
    assert block[0].strip() == "src/acttransport/", block[0]
    files: set[str] = set()
    folders: set[str] = set()
    stack: list[tuple[int, str]] = [(-1, "")]  # (indent, folder path with trailing /)
    owner = ""  # the folder whose files a continuation line names
    for line in block[1:]:
        if not line.strip():
            continue
        m = _ENTRY.fullmatch(line)
        indent = len(line) - len(line.lstrip())
        if m is None or indent > 12:  # a continuation line (entries sit at most 3 levels deep): part of the last entry's description
            files |= {owner + f for f in _PY.findall(line)}
            continue
        while stack[-1][0] >= indent:
            stack.pop()
        parent, name, desc = stack[-1][1], m.group(2), m.group(3) or ""
        if name.endswith("/"):
            owner = parent + name
            folders.add(owner)
            files.add(owner + "__init__.py")
            stack.append((indent, owner))
        else:
            owner = parent
            files.add(parent + name)
        files |= {owner + f for f in _PY.findall(desc)}
    return files, folders


def test_readme_architecture_tree_names_every_source_file():
    named, folders = readme_tree((ROOT / "README.md").read_text())
    actual = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")}
    assert not actual - named, f"source files missing from the README's Architecture tree: {sorted(actual - named)}"
    assert not named - actual, f"the README's Architecture tree names files that do not exist: {sorted(named - actual)}"
    assert all((SRC / f).is_dir() for f in folders), folders


def test_the_tree_check_would_catch_a_missing_file():
    text = (ROOT / "README.md").read_text()
    named, _ = readme_tree(text)
    assert {"engine/layerwise.py", "bake/control_vector.py", "__main__.py", "toy/samples.py", "cli/deploy.py", "evaluate/demo_t2i.py"} <= named
    without = text.replace("    layerwise.py ", "    (gone) ", 1)
    assert "engine/layerwise.py" not in readme_tree(without)[0]
