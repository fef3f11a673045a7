"""Collectives used by sequence parallelism, and a counter of the bytes they move.

Every collective here goes through ``torch.distributed`` by attribute lookup, so
:func:`count_collectives` (which wraps those attributes) sees them, and any other caller's too.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass
class CollectiveRecord:
    """One collective call on this rank."""

    op: str  # torch.distributed function name
    payload_bytes: int  # bytes this rank contributes (its input tensor(s))
    world_size: int  # ranks in the group

    @property
    def gathered_bytes(self) -> int:
        """Bytes of the result an all-gather assembles on each rank (payload x W); payload otherwise."""
        return self.payload_bytes * self.world_size if self.op.startswith("all_gather") else self.payload_bytes


@dataclass
class CollectiveLog:
    records: list[CollectiveRecord] = field(default_factory=list)

    def total(self, attr: str = "gathered_bytes", op: str | None = None) -> int:
        return sum(getattr(r, attr) for r in self.records if op is None or r.op == op)


#: torch.distributed function -> index of its input tensor argument (the payload)
_COUNTED_OPS = {"all_gather": 1, "all_gather_into_tensor": 1, "all_to_all_single": 1, "all_reduce": 0,
                "broadcast": 0, "send": 0, "isend": 0, "reduce_scatter_tensor": 1}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(_nbytes(t) for t in x)


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveLog]:
    """Record every counted ``torch.distributed`` call made inside the block (on this rank)."""
    log = CollectiveLog()
    originals = {name: getattr(dist, name) for name in _COUNTED_OPS}

    def wrap(name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            index = _COUNTED_OPS[name]
            payload = args[index] if len(args) > index else kwargs.get("tensor", kwargs.get("input_tensor"))
            log.records.append(CollectiveRecord(name, _nbytes(payload), dist.get_world_size(kwargs.get("group"))))
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def all_gather_stacked(x: torch.Tensor, group) -> torch.Tensor:
    """``(W, *x.shape)``: every rank's ``x`` in rank order (no autograd)."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)


def all_gather_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (the sequence); differentiable.

    The backward pass is the adjoint, a reduce-scatter: each rank's share of the gradient of the
    gathered tensor is summed over ranks, done as ``all_to_all_single`` plus a sum (gloo has no
    reduce-scatter).
    """
    return _AllGatherSequence.apply(x, group, dim)


class _AllGatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return torch.cat(list(all_gather_stacked(x, group)), dim=dim)

    @staticmethod
    def backward(ctx, grad):
        W = dist.get_world_size(ctx.group)
        chunks = torch.stack(grad.chunk(W, dim=ctx.dim)).contiguous()  # (W, *x.shape): row j goes to rank j
        received = torch.empty_like(chunks)
        dist.all_to_all_single(received, chunks, group=ctx.group)
        return received.sum(0), None, None
