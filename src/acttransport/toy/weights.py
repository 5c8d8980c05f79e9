"""Where the shipped toy weights live, and the error raised when they are missing.

Layout of a weights folder (``default_weights_dir()`` or any ``train_toy`` output)::

    model_index.json            diffusers pipeline index
    unet/                       UNet2DConditionModel: config.json + diffusion_pytorch_model.safetensors
    text_encoder/               CLIPTextModel: config.json + model.safetensors
    tokenizer/                  word-level tokenizer: tokenizer.json + tokenizer_config.json
    scheduler/                  DDIMScheduler: scheduler_config.json
    judge/                      ToyJudge: config.json + model.safetensors
    training_report.json        measured numbers of the run that made the folder
    samples.png, reference.png  generated and rendered sample grids
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "JUDGE_FILES", "PIPELINE_FILES", "RECREATE_COMMAND", "ToyWeightsMissingError",
    "default_weights_dir", "require_files",
]

RECREATE_COMMAND = "python -m acttransport.toy.train --out src/acttransport/toy/weights --seed 0 --steps 2400"

PIPELINE_FILES: tuple[str, ...] = (
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
)
JUDGE_FILES: tuple[str, ...] = ("judge/config.json", "judge/model.safetensors")


class ToyWeightsMissingError(FileNotFoundError):
    """The toy pipeline or judge weights are not in the folder they are loaded from."""


def default_weights_dir() -> Path:
    """Return the folder of the weights shipped inside the package (``acttransport/toy/weights``)."""
    return Path(__file__).resolve().parent / "weights"


def require_files(path: str | Path | None, names: tuple[str, ...], what: str) -> Path:
    """Check that a weights folder holds the given files.

    Args:
        path: the folder, or ``None`` for :func:`default_weights_dir`.
        names: file paths relative to the folder.
        what: what is being loaded, for the message (``"toy pipeline"``).

    Returns:
        The folder as a :class:`~pathlib.Path`.

    Raises:
        ToyWeightsMissingError: a file is missing; the message names the command that recreates it.
    """
    root = Path(path) if path is not None else default_weights_dir()
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise ToyWeightsMissingError(
            f"The {what} weights are missing from {root} (no {', '.join(missing)}). "
            f"Recreate them (about 25 CPU-minutes on one thread) with:\n    {RECREATE_COMMAND}"
            + ("" if path is None else f"\n(with --out {root} for this folder)")
        )
    return root
