"""Deterministic procedural renderer of 16×16 coloured shapes with a fill style.

Every image shows one shape (``SHAPES``) in one colour (``COLOURS``) drawn in one fill style
(``STYLES``) on a light grey background, with a small seeded jitter in position, size, colour,
background brightness, outline thickness and the phase of the stripes / dots (whole pixels).
Shapes are rasterised on a 4× super-sampled grid and box-filtered down to 16×16, so edges are
anti-aliased.

Captions follow ``"a {colour} {shape}, {style} style"``; the plain style drops the suffix
(``"a red circle"``) so that the bare prompt asks for a plain shape. :func:`parse_caption`
also accepts the explicit ``"a red circle, plain style"`` form.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "COLOURS", "COLOUR_RGB", "IMAGE_SIZE", "SHAPES", "STYLES", "all_captions", "caption",
    "caption_words", "dataset", "parse_caption", "render", "render_batch",
]

IMAGE_SIZE = 16
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
STYLES: tuple[str, ...] = ("plain", "striped", "dotted", "outline")
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.12, 0.62, 0.16),
    "blue": (0.14, 0.24, 0.88),
    "yellow": (0.95, 0.80, 0.05),
    "purple": (0.55, 0.15, 0.72),
    "cyan": (0.05, 0.72, 0.80),
}

_SS = 4  # super-sampling factor
_N = IMAGE_SIZE * _SS
# Pixel-unit coordinates of the super-sampled grid's sample centres, shape [_N, _N].
_YY, _XX = torch.meshgrid(
    (torch.arange(_N, dtype=torch.float32) + 0.5) / _SS,
    (torch.arange(_N, dtype=torch.float32) + 0.5) / _SS,
    indexing="ij",
)


def caption(shape: str, colour: str, style: str) -> str:
    """Return the canonical caption of an attribute triple.

    Args:
        shape: one of ``SHAPES``.
        colour: one of ``COLOURS``.
        style: one of ``STYLES``.

    Returns:
        ``"a red circle"`` for the plain style, else ``"a red circle, striped style"``.

    Raises:
        ValueError: an attribute is unknown.
    """
    _check(shape, colour, style)
    return f"a {colour} {shape}" if style == "plain" else f"a {colour} {shape}, {style} style"


def parse_caption(text: str) -> tuple[str, str, str]:
    """Invert :func:`caption` (also accepts the explicit ``", plain style"`` form).

    Args:
        text: a caption such as ``"a red circle, striped style"``.

    Returns:
        ``(shape, colour, style)``.

    Raises:
        ValueError: the text is not a caption of this renderer.
    """
    head, _, tail = text.strip().partition(",")
    words = head.split()
    style = "plain"
    if tail.strip():
        tail_words = tail.split()
        if len(tail_words) != 2 or tail_words[1] != "style":
            raise ValueError(f"not a toy caption: {text!r}")
        style = tail_words[0]
    if len(words) != 3 or words[0] != "a":
        raise ValueError(f"not a toy caption: {text!r}")
    _check(words[2], words[1], style)
    return words[2], words[1], style


def all_captions() -> list[tuple[str, str, str]]:
    """Every ``(shape, colour, style)`` triple, shape-major then colour then style."""
    return [(s, c, st) for s in SHAPES for c in COLOURS for st in STYLES]


def caption_words() -> list[str]:
    """Every word (and the comma) that captions use, in a fixed order (the tokenizer's vocab)."""
    return ["a", ",", "style", *SHAPES, *COLOURS, *STYLES]


def _check(shape: str, colour: str, style: str) -> None:
    for value, allowed, kind in ((shape, SHAPES, "shape"), (colour, COLOURS, "colour"),
                                 (style, STYLES, "style")):
        if value not in allowed:
            raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(allowed)}")


def _rng(rng_or_seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(int(rng_or_seed))


def _draw_params(rng: np.random.Generator) -> dict[str, float]:
    """Draw one image's jitter (always 8 draws, whatever the attributes)."""
    u = rng.random(8)
    return {
        "cx": 8.0 + (u[0] - 0.5) * 3.0,  # ±1.5 px
        "cy": 8.0 + (u[1] - 0.5) * 3.0,
        "size": 10.5 + (u[2] - 0.5) * 2.0,  # 9.5..11.5 px across
        "bg": 0.88 + 0.09 * u[3],
        "tint": (u[4] - 0.5) * 0.08,  # colour jitter, ±0.04
        "phase_x": float(int(u[5] * 3)),  # pattern phase on the pixel grid
        "phase_y": float(int(u[6] * 3)),
        "line": 1.3 + 0.4 * u[7],  # outline thickness, px
    }


def _shape_mask(shape: str, cx: float, cy: float, size: float, inset: float = 0.0) -> torch.Tensor:
    """Boolean super-sampled mask ``[_N, _N]`` of a shape shrunk by ``inset`` pixels."""
    dx, dy = _XX - cx, _YY - cy
    h = size / 2.0
    if shape == "circle":
        return dx * dx + dy * dy <= (h - inset) ** 2
    if shape == "square":
        a = 0.86 * h - inset
        return (dx.abs() <= a) & (dy.abs() <= a)
    if shape == "diamond":
        return dx.abs() + dy.abs() <= 1.08 * h - inset * 2**0.5
    if shape == "cross":
        arm, length = 0.42 * h - inset, h - inset
        return ((dx.abs() <= arm) & (dy.abs() <= length)) | ((dy.abs() <= arm) & (dx.abs() <= length))
    # triangle, apex up: |dx| <= w * (dy + h) / (2h) for -h <= dy <= h; edges inset by distance
    w = 1.05 * h
    slope = (2 * h) / w  # dy per dx along an edge
    edge = (dy + h) - slope * dx.abs()  # >= 0 inside the two slanted edges (unnormalised)
    return (dy <= h - inset) & (edge >= inset * (1 + slope * slope) ** 0.5)


def _style_mask(style: str, inside: torch.Tensor, p: dict[str, float], shape: str) -> torch.Tensor:
    if style == "plain":
        return inside
    px = torch.floor(_XX + p["phase_x"]) % 3  # whole-pixel pattern coordinates
    py = torch.floor(_YY + p["phase_y"]) % 3
    if style == "striped":  # horizontal stripes: 2 px of colour, 1 px of background
        return inside & (py != 0)
    if style == "dotted":  # one-pixel background dots on a 3 px grid
        return inside & ~((px == 0) & (py == 0))
    inner = _shape_mask(shape, p["cx"], p["cy"], p["size"], inset=p["line"])
    return inside & ~inner


def _paint(shape: str, colour: str, style: str, p: dict[str, float]) -> torch.Tensor:
    inside = _shape_mask(shape, p["cx"], p["cy"], p["size"])
    m = _style_mask(style, inside, p, shape).float()[None, None]
    cov = F.avg_pool2d(m, _SS)[0]  # [1, 16, 16] coverage in [0, 1]
    rgb = torch.tensor(COLOUR_RGB[colour], dtype=torch.float32).add(p["tint"]).clamp(0, 1)
    img = p["bg"] * (1 - cov) + rgb[:, None, None] * cov  # [3, 16, 16] in [0, 1]
    return img * 2 - 1


def render(shape: str, colour: str, style: str, rng_or_seed: int | np.random.Generator = 0) -> torch.Tensor:
    """Render one image.

    Args:
        shape: one of ``SHAPES``.
        colour: one of ``COLOURS``.
        style: one of ``STYLES``.
        rng_or_seed: an integer seed or a ``numpy.random.Generator`` (advanced by 8 draws).

    Returns:
        ``float32`` tensor ``[3, 16, 16]`` in ``[-1, 1]``.
    """
    _check(shape, colour, style)
    return _paint(shape, colour, style, _draw_params(_rng(rng_or_seed)))


def render_batch(shapes: torch.Tensor, colours: torch.Tensor, styles: torch.Tensor,
                 seed: int) -> torch.Tensor:
    """Render a batch given attribute indices; image ``i`` uses the jitter seed ``(seed, i)``.

    Args:
        shapes: ``[n]`` indices into ``SHAPES``.
        colours: ``[n]`` indices into ``COLOURS``.
        styles: ``[n]`` indices into ``STYLES``.
        seed: base seed.

    Returns:
        ``[n, 3, 16, 16]`` in ``[-1, 1]``.
    """
    out = torch.empty(len(shapes), 3, IMAGE_SIZE, IMAGE_SIZE)
    for i, (s, c, st) in enumerate(zip(shapes.tolist(), colours.tolist(), styles.tolist())):
        rng = np.random.default_rng([int(seed), i])
        out[i] = _paint(SHAPES[s], COLOURS[c], STYLES[st], _draw_params(rng))
    return out


def dataset(n: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
    """Draw ``n`` images with uniformly random attributes.

    Args:
        n: number of images.
        seed: seed of the attributes and of each image's jitter.

    Returns:
        ``(images, labels, captions)``: ``images`` ``[n, 3, 16, 16]`` in ``[-1, 1]``;
        ``labels`` maps ``"shape"``, ``"colour"``, ``"style"`` to ``int64`` index tensors ``[n]``;
        ``captions`` is the list of the ``n`` canonical captions.
    """
    rng = np.random.default_rng(int(seed))
    labels = {
        "shape": torch.from_numpy(rng.integers(0, len(SHAPES), n)).long(),
        "colour": torch.from_numpy(rng.integers(0, len(COLOURS), n)).long(),
        "style": torch.from_numpy(rng.integers(0, len(STYLES), n)).long(),
    }
    images = render_batch(labels["shape"], labels["colour"], labels["style"], seed=seed)
    captions = [caption(SHAPES[s], COLOURS[c], STYLES[st]) for s, c, st in
                zip(labels["shape"].tolist(), labels["colour"].tolist(), labels["style"].tolist())]
    return images, labels, captions
