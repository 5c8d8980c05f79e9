"""The runner of a causal language model (any module taking ``input_ids`` and ``attention_mask``)."""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import DataError
from ..targets.layouts import pool
from .base import Batch, model_id

__all__ = ["CausalLMRunner"]

PROBE_TEXT = "Hello world."


class CausalLMRunner:
    """Tokenises sentences, sorts them by length (less padding), pads per batch and runs the model.

    Outputs are pooled over the real tokens of each sentence (:func:`~acttransport.targets.pool`).
    Position ids follow the attention mask, so left and right padding give the same positions.

    Args:
        model: a causal LM (or any module with that call signature).
        tokenizer: its tokenizer (given no pad token, eos is used).
        batch_size: sentences per forward call.
        max_length: tokens kept per sentence.
    """

    repeated = False

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 32, max_length: int = 64) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.model_id = model_id(model)
        params = inspect.signature(model.forward).parameters
        self._positions, self._cache = "position_ids" in params, "use_cache" in params

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batches(self, items: Sequence[str]) -> list[Batch]:
        """Batches of at most ``batch_size`` sentences of similar length.

        Raises:
            DataError: a sentence tokenises to nothing.
        """
        tok = self.tokenizer
        ids = tok(list(items), truncation=True, max_length=self.max_length)["input_ids"]
        empty = [i for i, x in enumerate(ids) if len(x) == 0]
        if empty:
            raise DataError(f"texts {empty[:5]} tokenise to nothing; remove them")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = []
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            padded = tok.pad([{"input_ids": ids[i], "attention_mask": [1] * len(ids[i])} for i in idx], return_tensors="pt")
            out.append(self._batch(idx, padded))
        return out

    def _batch(self, rows: list[int], enc: Any) -> Batch:
        device = self.device
        mask = enc["attention_mask"].to(device)
        kw: dict[str, Any] = {"input_ids": enc["input_ids"].to(device), "attention_mask": mask}
        if self._positions:
            kw["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        if self._cache:
            kw["use_cache"] = False
        return Batch(rows, kw, mask)

    def forward(self, batch: Batch) -> None:
        self.model(**batch.inputs)

    def pool(self, x: Tensor, batch: Batch, how: str) -> Tensor:
        return pool(x, batch.mask, how)

    def probe(self) -> Batch:
        return self._batch([0], self.tokenizer([PROBE_TEXT], return_tensors="pt"))
