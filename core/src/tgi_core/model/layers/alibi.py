"""ALiBi: per-head linear biases on attention scores (BLOOM, MPT)."""

from __future__ import annotations

import math

import torch

from tgi_core.model.parallel import ParallelContext, current_parallel_context


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The slope of each of ``num_heads`` heads (the paper's geometric sequence).

    For a head count that is not a power of two, the slopes of the closest smaller power
    of two are followed by every other slope of the next power of two.
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = num_heads - closest
        slopes += [extra_base ** (2 * i + 1) for i in range(extra)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_slopes_for_rank(num_heads: int, tp: ParallelContext | None = None) -> torch.Tensor:
    """The slopes of the heads this rank holds."""
    tp = tp or current_parallel_context()
    per_rank = tp.shard(num_heads, "attention heads")
    return alibi_slopes(num_heads)[tp.rank * per_rank : (tp.rank + 1) * per_rank]
