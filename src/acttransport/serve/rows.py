"""One forward pass's steering of vLLM's flattened token batch (pure torch: vLLM is not imported).

vLLM flattens a step's requests into one ``[tokens, units]`` batch; persistent-batch row i owns
the tokens ``[qsl[i], qsl[i+1])``. A :class:`Pass` says which map steers which tokens at which
λ; a :class:`ModuleSteer` applies every map placed on one module to that module's output:

* the affine maps whose tensor is the whole output (no column slice of a fused projection, no
  hidden + residual sum) — the common case, e.g. maps on norms — in one go over all tokens:
  a per-token λ column, the maps' ``ω − 1`` and ``β`` (and support bounds) gathered per token,
  four arithmetic ops (plus the support test and a ``where`` when bounded) per module per pass,
  whatever the number of requests, maps and strengths (on CPU, at decode batch sizes, a hook's
  cost is its number of ops);
* the rest (quantile maps, fused-projection column slices, a layer's hidden + residual) group
  by group: select the group's rows, run the map's kernel (:func:`map_kernel`), write them back.

Both give a steered token the bits of :meth:`ModuleMap.kernel` at its λ (in float32 for a
half-precision output, cast back, as :func:`map_kernel` does) and leave every other token's bits
alone (every finite value, ``-0.0`` included; see :class:`_Affines` for an infinite one).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor

from ..errors import MapFormatError
from ..targets.layouts import map_kernel
from ..transport.maps import ModuleMap
from .names import Target
from .registry import Registry

__all__ = ["ModuleSteer", "Pass"]

_EXACT = (torch.float32, torch.float64)


class Pass:
    """Which map steers which flattened tokens, at which λ, in one forward pass.

    Built once per pass; what the hooks need from it (per-token columns, row groups) is built
    on first use and shared by every hooked module.
    """

    def __init__(self, spans: list[tuple[int, int, str, float]], device: torch.device | str = "cpu") -> None:
        """Args:
            spans: ``(start, stop, map name, λ)`` per steered request: its flattened tokens
                ``[start, stop)``; disjoint; λ ≠ 0.
            device: where the batch lives.
        """
        self.spans, self.device = spans, torch.device(device)
        self._groups: dict[str, list[tuple[float, Tensor]]] | None = None
        self._columns: dict[tuple, tuple[Tensor | None, Tensor, Tensor] | None] = {}

    def groups(self) -> dict[str, list[tuple[float, Tensor]]]:
        """Map name → ``[(λ, token indices [n] int64)]``, one entry per strength."""
        if self._groups is None:
            parts: dict[tuple[str, float], list[Tensor]] = {}
            for a, b, name, lam in self.spans:
                parts.setdefault((name, lam), []).append(torch.arange(a, b, device=self.device))
            self._groups = {}
            for (name, lam), p in parts.items():
                self._groups.setdefault(name, []).append((lam, torch.cat(p)))
        return self._groups

    def columns(self, names: tuple[str, ...], n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """Per-token columns for the maps ``names`` over a batch of ``n`` tokens.

        Returns:
            None when none of the ``names`` steers a token; else ``(index, lam)``: ``index``
            ``[n]`` int64, k + 1 for a token of ``names[k]`` and 0 for every other token;
            ``lam`` ``[n, 1]`` in ``dtype``, the token's λ, and −0.0 for the others (so that
            λ·(+0) is −0.0 and y + (−0.0) is y to the bit: see :class:`_Affines`).
        """
        key = (names, n, dtype)
        if key in self._columns:
            return self._columns[key]
        where = {name: k + 1 for k, name in enumerate(names)}
        index, lam = [0] * n, [-0.0] * n
        for a, b, name, strength in self.spans:
            k = where.get(name)
            b = min(b, n)
            if k is not None and b > a:
                index[a:b] = [k] * (b - a)
                lam[a:b] = [strength] * (b - a)
        cols = None
        if any(index):
            cols = (torch.tensor(index, device=self.device), torch.tensor(lam, dtype=dtype, device=self.device).unsqueeze(1))
        self._columns[key] = cols
        return cols


class _Affines:
    """Affine maps of one support kind (bounded or not) on one module's whole output, applied to
    every token at once: ``y ↦ y + λ·(y·(ω − 1) + β)`` (inside ``lo < y < hi`` for bounded
    supports) with the token's map and λ, the arithmetic of the maps' kernel, op for op.

    A token no map here steers reads table row 0: ω − 1 = 0, β = 0 and λ = −0.0, so that
    ``y·0 + 0`` is +0.0 and ``(+0.0)·(−0.0) + y`` is y to the bit for every finite y, −0.0
    included, with no ``where`` (an infinite y there, a request already overflowed, becomes
    nan); bounded supports have their ``where`` anyway, and row 0's empty support
    ``(+inf, −inf)`` keeps such a token's every bit."""

    def __init__(self, names: list[str], maps: list[ModuleMap], bounded: bool) -> None:
        self.names, self.bounded = tuple(names), bounded
        self.maps, self.width = maps, maps[0].width
        self._tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _table(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``[K + 1, C, d]``: row k + 1 holds map k's ``ω − 1``, ``β`` (and ``lo``, ``hi`` when
        bounded: C = 4, else 2), built as ``ModuleMap.kernel`` builds them (``scale.to(dtype) − 1``);
        row 0 as in the class doc. Cached per device and dtype."""
        key = (device, dtype)
        if key not in self._tables:
            with torch.inference_mode(False):  # an ordinary tensor, as the map's own kernel cache
                w = self.width
                zero, inf = torch.zeros(w, device=device, dtype=dtype), torch.full((w,), float("inf"), device=device, dtype=dtype)
                rows = [[zero, zero] + ([inf, -inf] if self.bounded else [])]
                for m in self.maps:
                    rows.append([m.scale.to(device=device, dtype=dtype) - 1, m.shift.to(device=device, dtype=dtype)]
                                + ([m.lower.to(device=device, dtype=dtype), m.upper.to(device=device, dtype=dtype)] if self.bounded else []))
                self._tables[key] = torch.stack([torch.stack(r) for r in rows])
        return self._tables[key]

    def apply(self, y: Tensor, plan: Pass) -> Tensor:
        """``y`` ``[tokens, d]`` steered (a new tensor), or ``y`` itself when none of these maps steers a token."""
        if y.shape[-1] != self.width:
            raise MapFormatError(f"map has width {self.width} but the module output has {y.shape[-1]} units; the map belongs to another model")
        work = y if y.dtype in _EXACT else y.float()  # half precision: computed in float32, as map_kernel does
        cols = plan.columns(self.names, y.shape[0], work.dtype)
        if cols is None:
            return y
        index, lam = cols
        parts = self._table(work.device, work.dtype).index_select(0, index).unbind(1)  # C × [tokens, d]
        d = work * parts[0]
        d.add_(parts[1])
        d.mul_(lam)  # λ·(y·(ω − 1) + β); 1·d is d to the bit, as the kernel's λ = 1 shortcut
        d.add_(work)
        if self.bounded:
            keep = work > parts[2]
            keep.logical_and_(work < parts[3])
            return torch.where(keep, d if work is y else d.to(y.dtype), y)
        return d if work is y else d.to(y.dtype)


class ModuleSteer:
    """Every map placed on one vLLM module, applied to the module's output for one pass."""

    def __init__(self, targets: list[tuple[str, Target]], reg: Registry, fast: bool = True) -> None:
        """Args:
            targets: ``(map name, placement)`` for every map module placed on this module.
            reg: the registry holding the maps.
            fast: False sends every target through the row-group path (a reference for tests).
        """
        placed = [(name, t, reg.entries[name].tmap.maps[t.spec]) for name, t in targets]

        def whole(t: Target, m: ModuleMap) -> bool:
            return fast and m.knots_x is None and t.pick == "first" and t.start is None

        # a map with another target here, or one that needs the row-group path, takes it for all
        # its targets here: the all-token path then holds one target per map, its rows disjoint
        # from the row groups', so the order of the two paths does not matter
        count = Counter(name for name, _ in targets)
        slow = {name for name, t, m in placed if not whole(t, m) or count[name] > 1}
        self.slow = [(name, t, m) for name, t, m in placed if name in slow]
        self.fast: list[_Affines] = []
        for bounded in (False, True):
            group = [(name, m) for name, t, m in placed if name not in slow and m.bounded == bounded]
            if group:
                self.fast.append(_Affines([n for n, _ in group], [m for _, m in group], bounded))

    def __call__(self, out: Any, plan: Pass) -> Any:
        """The module output steered for ``plan``: ``out`` (a tensor ``[tokens, units]`` or a
        tuple whose element 0 is one, whose element 1 is the residual for a ``sum`` target),
        rebuilt with a new element 0; None when no token is steered here (``out`` untouched)."""
        tup = isinstance(out, tuple)
        y0 = y = out[0] if tup else out
        if y.ndim == 2:
            for group in self.fast:
                y = group.apply(y, plan)
        elif self.fast:
            raise MapFormatError(f"vLLM module output of shape {tuple(y.shape)}; expected flattened tokens [tokens, units]")
        changed = y is not y0
        if changed:
            out = (y, *out[1:]) if tup else y
        groups = plan.groups() if self.slow else {}
        for name, t, m in self.slow:
            if groups.get(name):
                out, changed = _rows(out, t, m, groups[name]), True
        return out if changed else None


def _rows(out: Any, t: Target, m: ModuleMap, groups: list[tuple[float, Tensor]]) -> Any:
    """One map on its steered rows only, group by group (select, kernel, write back); the
    output's element 0 (or the output) replaced by a copy with those rows rewritten. A ``sum``
    target reads ``out[0] + out[1]`` and writes ``T(h + r) − r`` (the residual kept)."""
    tup = isinstance(out, tuple)
    y = out[0] if tup else out
    res = out[1] if tup and t.pick == "sum" and len(out) > 1 and out[1] is not None else None
    new_y = y.clone()
    for lam, idx in groups:
        rows = y.index_select(0, idx)  # [n, units] (a copy)
        r = None if res is None else res.index_select(0, idx)
        x = rows if r is None else rows + r
        xs = x if t.start is None else x[:, t.start:t.stop]
        ys = map_kernel(xs, m, lam)(xs)
        if t.start is not None:
            x[:, t.start:t.stop] = ys
            ys = x
        new_y.index_copy_(0, idx, ys if r is None else ys - r)
    return (new_y, *out[1:]) if tup else new_y
