"""Data-parallel estimation over a ``torch.distributed`` process group (``torchrun``).

After balancing, every rank takes every W-th sentence of each set (rank r: rows r, r+W, ...),
runs forward passes on its shard only, and at each module the pooled activations are gathered
back into the single-process row order, so every rank fits the same map, bit for bit, from
the same numbers (causal one-pass estimation included: the gather happens where the batches
wait for the module's map).

Every gather starts with a status exchange. A rank that fails sends its error at its next
exchange instead of data, so the others raise :class:`~acttransport.errors.DistributedError`
with that text instead of waiting for a collective that never comes; a final exchange at the
end of the estimation catches failures after the last module.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, TypeVar

import torch
from torch import Tensor

from ..errors import DistributedError

__all__ = ["Group", "current_group", "failing_together", "gather_rows", "report_failure", "shard", "sync"]

T = TypeVar("T")
_OK, _FAILED = 0, 1
_MAX_TEXT = 4000


@dataclass(frozen=True)
class Group:
    """A process group of more than one rank (``group`` None: the default group)."""

    rank: int
    world: int
    group: Any = None

    @property
    def device(self) -> torch.device:
        """Where collectives take their tensors: the current GPU for NCCL, else the CPU."""
        import torch.distributed as dist

        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def current_group(group: Any = None) -> Group | None:
    """``group``, or the initialised default group; None when not distributed or alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise DistributedError("a process group was given but torch.distributed is not initialised (call init_process_group first)")
        return None
    world = dist.get_world_size(group)
    return Group(dist.get_rank(group), world, group) if world > 1 else None


def shard(items: Sequence[T], g: Group) -> list[T]:
    """Rank r's share: items r, r+W, r+2W, ..."""
    return list(items[g.rank:: g.world])


def _exchange(g: Group, status: int, text: str = "") -> None:
    import torch.distributed as dist

    data = text.encode("utf-8", errors="replace")[:_MAX_TEXT]
    heads = [torch.zeros(2, dtype=torch.long, device=g.device) for _ in range(g.world)]
    dist.all_gather(heads, torch.tensor([status, len(data)], dtype=torch.long, device=g.device), group=g.group)
    failed = [r for r, h in enumerate(heads) if int(h[0]) != _OK]
    if not failed:
        return
    width = max(1, max(int(h[1]) for h in heads))
    mine = torch.zeros(width, dtype=torch.uint8, device=g.device)
    if data:
        mine[: len(data)] = torch.tensor(list(data), dtype=torch.uint8, device=g.device)
    texts = [torch.zeros(width, dtype=torch.uint8, device=g.device) for _ in range(g.world)]
    dist.all_gather(texts, mine, group=g.group)
    r = failed[0]
    msg = bytes(texts[r][: int(heads[r][1])].cpu().tolist()).decode("utf-8", errors="replace")
    raise DistributedError(f"rank {r} of {g.world} failed: {msg}")


def sync(g: Group) -> None:
    """A status exchange with no data: raises if any rank has reported a failure."""
    _exchange(g, _OK)


def report_failure(g: Group, error: BaseException) -> None:
    """Sends ``error`` to the other ranks at the exchange they wait in (call once, then re-raise it)."""
    if isinstance(error, DistributedError):
        return  # another rank's failure, already known to all
    try:
        _exchange(g, _FAILED, f"{type(error).__name__}: {error}")
    except DistributedError:
        pass


def gather_rows(x: Tensor, n: int, g: Group) -> Tensor:
    """The full ``[n, d]`` rows from every rank's ``[len(range(rank, n, W)), d]`` share, in the
    single-process order (row i came from rank i mod W)."""
    import torch.distributed as dist

    sync(g)
    per = -(-n // g.world)
    pad = torch.zeros((per, *x.shape[1:]), dtype=x.dtype, device=g.device)
    pad[: x.shape[0]] = x.to(g.device)
    parts = [torch.empty_like(pad) for _ in range(g.world)]
    dist.all_gather(parts, pad, group=g.group)
    out = torch.empty((n, *x.shape[1:]), dtype=x.dtype)
    for r, part in enumerate(parts):
        k = len(range(r, n, g.world))
        out[r::g.world] = part[:k].cpu()
    return out


@contextmanager
def failing_together(g: Group | None) -> Iterator[None]:
    """Runs the block; under a group, ends with a :func:`sync` (a failure after the last gather
    still stops everyone) and sends any error of this rank to the others before re-raising it."""
    if g is None:
        yield
        return
    try:
        yield
        sync(g)
    except BaseException as e:
        report_failure(g, e)
        raise
