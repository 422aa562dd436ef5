"""Tensor-parallel placement of a layer: which rank it is, of how many, and collectives.

Layers take a :class:`ParallelContext` (the process-wide one by default). At world size
1 every collective is the identity. Tests simulate ranks by building the same layer
with ``ParallelContext(rank=r, world_size=n)`` and no process group: each collective is
then the identity too, and the test combines the shards' outputs itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class ParallelContext:
    """This process's place in a tensor-parallel group."""

    rank: int = 0
    world_size: int = 1
    #: a ``torch.distributed`` process group, or None (single process or simulation).
    group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")

    def shard(self, total: int, what: str) -> int:
        """``total / world_size``; raises if ``total`` does not divide evenly."""
        if total % self.world_size:
            raise ValueError(
                f"{what} ({total}) is not divisible by the tensor-parallel size ({self.world_size})"
            )
        return total // self.world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (in place where a group exists)."""
        if self.group is None:
            return tensor
        import torch.distributed as dist

        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along the last dimension."""
        if self.group is None:
            return tensor
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


_current = ParallelContext()


def current_parallel_context() -> ParallelContext:
    """The process-wide context that layers use when given none."""
    return _current


def set_parallel_context(context: ParallelContext) -> None:
    """Set the process-wide context (done once per rank, before models are built)."""
    global _current
    _current = context
