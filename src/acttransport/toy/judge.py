"""A small CNN that reads the shape, colour and style of a 16×16 toy image.

The judge is trained on rendered images under heavy photometric augmentation (Gaussian noise,
blur, contrast / brightness / channel-gain jitter, one-pixel shifts) so that it also reads the
slightly noisy, soft images a diffusion model generates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .render import COLOURS, IMAGE_SIZE, SHAPES, STYLES, dataset
from .weights import JUDGE_FILES, require_files

__all__ = ["HEADS", "ToyJudge", "augment", "load_toy_judge", "train_judge"]

HEADS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}


class ToyJudge(nn.Module):
    """Three-headed CNN classifier of toy images.

    Args:
        channels: widths of the two conv stages (each: two 3×3 convs + BatchNorm + ReLU, 2× pool).
        hidden: width of the shared fully connected layer.
        heads: head name → class names (defaults to :data:`HEADS`).
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), hidden: int = 128,
                 heads: dict[str, tuple[str, ...]] | None = None) -> None:
        super().__init__()
        self.heads = {k: tuple(v) for k, v in (heads or HEADS).items()}
        self.config: dict[str, Any] = {"channels": list(channels), "hidden": hidden,
                                       "heads": {k: list(v) for k, v in self.heads.items()},
                                       "image_size": IMAGE_SIZE}
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
                c_in = c
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = IMAGE_SIZE // 2 ** len(channels)
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, hidden), nn.ReLU(),
                                   nn.Dropout(0.1))
        self.out = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in self.heads.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head.

        Args:
            images: ``[B, 3, 16, 16]`` in ``[0, 1]``.

        Returns:
            head name → logits ``[B, n_classes]``.
        """
        h = self.trunk(self.features(images * 2 - 1))
        return {k: lin(h) for k, lin in self.out.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, dict[str, Any]]:
        """Classify images.

        Args:
            images: ``[B, 3, 16, 16]`` in ``[0, 1]`` (any device / float dtype).
            batch_size: images per forward pass.

        Returns:
            head name (``"shape"``, ``"colour"``, ``"style"``) → ``{"label": list[str] of length B,
            "index": int64 [B], "prob": float32 [B, n_classes]}`` (softmax probabilities, CPU).
        """
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        logits: dict[str, list[torch.Tensor]] = {k: [] for k in self.heads}
        for chunk in images.split(batch_size):
            for k, v in self(chunk.to(device=device, dtype=torch.float32)).items():
                logits[k].append(v.float().cpu())
        self.train(was_training)
        result: dict[str, dict[str, Any]] = {}
        for k, names in self.heads.items():
            prob = torch.cat(logits[k]).softmax(-1) if logits[k] else torch.empty(0, len(names))
            index = prob.argmax(-1)
            result[k] = {"label": [names[i] for i in index.tolist()], "index": index, "prob": prob}
        return result

    def accuracy(self, images: torch.Tensor, labels: dict[str, Any]) -> dict[str, float]:
        """Share of images whose predicted label matches, per head.

        Args:
            images: ``[B, 3, 16, 16]`` in ``[0, 1]``.
            labels: head name → int64 index tensor ``[B]`` or list of ``B`` class names; heads
                missing from ``labels`` are skipped.

        Returns:
            head name → accuracy in ``[0, 1]``.
        """
        pred = self.predict(images)
        acc: dict[str, float] = {}
        for k, want in labels.items():
            if k not in self.heads:
                raise KeyError(f"unknown head {k!r}; the judge has {', '.join(self.heads)}")
            if not torch.is_tensor(want):
                want = torch.tensor([self.heads[k].index(w) for w in want])
            acc[k] = float((pred[k]["index"] == want.cpu().long()).float().mean())
        return acc

    def save(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_dir(cls, directory: str | Path) -> ToyJudge:
        """Load a judge written by :meth:`save` (eval mode, CPU)."""
        directory = Path(directory)
        cfg = json.loads((directory / "config.json").read_text())
        judge = cls(tuple(cfg["channels"]), cfg["hidden"], {k: tuple(v) for k, v in cfg["heads"].items()})
        judge.load_state_dict(load_file(str(directory / "model.safetensors")))
        return judge.eval()


def load_toy_judge(path: str | Path | None = None, device: str | torch.device = "cpu") -> ToyJudge:
    """Load the shipped judge (or the one in a ``train_toy`` output folder ``path``).

    Raises:
        ToyWeightsMissingError: the judge files are missing (the message names the command).
    """
    root = require_files(path, JUDGE_FILES, "toy judge")
    return ToyJudge.from_dir(root / "judge").to(device)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random photometric and one-pixel geometric jitter of ``[B, 3, 16, 16]`` images in ``[0, 1]``."""
    b = images.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

    x = images
    shift = torch.randint(-1, 2, (2,), generator=generator).tolist()  # same shift for the batch
    if shift != [0, 0]:
        x = torch.roll(x, shifts=shift, dims=(2, 3))
    sigma = u(0.3, 0.9, 1)  # Gaussian blur on a random 40 % of the images
    r = torch.arange(-1, 2, dtype=torch.float32)
    k1 = torch.exp(-r[None] ** 2 / (2 * sigma**2))
    k1 = k1 / k1.sum(-1, keepdim=True)  # [B, 3]
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, 0)[:, None]  # [3B, 1, 3, 3]
    blurred = F.conv2d(F.pad(x.reshape(1, 3 * b, IMAGE_SIZE, IMAGE_SIZE), (1, 1, 1, 1), mode="replicate"),
                       k2, groups=3 * b).reshape_as(x)
    pick = (torch.rand(b, generator=generator) < 0.4).float()[:, None, None, None]
    x = pick * blurred + (1 - pick) * x
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * u(0.7, 1.2, 1, 1, 1) + u(-0.08, 0.08, 1, 1, 1)
    x = x * u(0.94, 1.06, 3, 1, 1)
    x = x + torch.randn(x.shape, generator=generator) * u(0.0, 0.08, 1, 1, 1)
    return x.clamp(0, 1)


def train_judge(steps: int = 1500, seed: int = 0, batch_size: int = 128, n_images: int = 30000,
                lr: float = 3e-3, progress: bool = True) -> tuple[ToyJudge, dict[str, float]]:
    """Train a :class:`ToyJudge` on freshly rendered, augmented images (deterministic per seed).

    Args:
        steps: optimiser steps.
        seed: seed of the data (render seed ``seed + 1000``), initialisation and augmentation.
        batch_size: images per step.
        n_images: size of the rendered training pool.
        lr: peak AdamW learning rate (one-cycle cosine).
        progress: show a tqdm bar with the loss.

    Returns:
        ``(judge in eval mode, {"final_loss": ..., "clean_accuracy_<head>": ...})``, the
        accuracies measured on 2,000 held-out rendered images (render seed ``seed + 2000``).
    """
    images, labels, _ = dataset(n_images, seed=seed + 1000)
    images = (images + 1) / 2
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        judge = ToyJudge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    judge.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc="judge", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        idx = torch.randint(0, n_images, (batch_size,), generator=gen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))  # dropout
            logits = judge(augment(images[idx], gen))
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.4f}")
    judge.eval()
    test_images, test_labels, _ = dataset(2000, seed=seed + 2000)
    acc = judge.accuracy((test_images + 1) / 2, test_labels)
    return judge, {"final_loss": loss_value, **{f"clean_accuracy_{k}": v for k, v in acc.items()}}
