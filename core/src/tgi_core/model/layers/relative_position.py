"""T5's relative position bias: a learned bias per head for bucketed key-query distances.

Distances ``key_pos - query_pos`` are bucketed: half the buckets (all of them when
unidirectional) hold exact small distances, the rest grow logarithmically up to
``max_distance``; bidirectional attention (the encoder) keeps separate buckets for keys
after the query. The table ``[num_buckets, heads]`` lives in the first layer and every
layer of the stack shares it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """The bucket of each ``key_pos - query_pos`` (any shape, int64)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # only keys at or before the query
    exact = num_buckets // 2
    scaled = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = (exact + (scaled * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, large)


class RelativePositionBias:
    """Computes the bias ``[H, queries, keys]`` from a shared table (not a module: the
    table belongs to the first layer, the other layers only read it)."""

    def __init__(
        self, table: nn.Module, *, bidirectional: bool, num_buckets: int, max_distance: int
    ) -> None:
        """``table.weight`` is ``[num_buckets, heads]`` (an ``nn.Embedding`` or alike)."""
        self.table, self.bidirectional = table, bidirectional
        self.num_buckets, self.max_distance = num_buckets, max_distance

    def __call__(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """``query_pos`` ``[..., n]`` and ``key_pos`` ``[L]`` -> float32 ``[..., H, n, L]``."""
        relative = key_pos[None, :] - query_pos[..., :, None]  # [..., n, L]
        buckets = relative_position_bucket(
            relative,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        weight: torch.Tensor = self.table.weight  # type: ignore[assignment]
        values = weight.float()[buckets]  # [..., n, L, H]
        return values.movedim(-1, -3)
