"""The attention layer models use: it names no kernel, the step's backend computes it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tgi_core.attention.batch import ForwardBatch


class Attention(nn.Module):
    """Multi-head attention over the paged KV cache (GQA/MQA when ``num_kv_heads < num_heads``).

    :param scale: the factor applied to ``q @ k.T`` (usually ``head_dim ** -0.5``).
    :param sliding_window: attend only to the last ``sliding_window`` positions.
    :param alibi_slopes: per-head ALiBi slopes of this rank's heads.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        *,
        scale: float,
        sliding_window: int | None = None,
        alibi_slopes: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} heads cannot share {num_kv_heads} key/value heads")
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.alibi_slopes: torch.Tensor | None
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        #: this layer's index in the KV cache; set when the cache is allocated.
        self.layer_index = -1

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """``q`` ``[T, H, D]``, ``k``/``v`` ``[T, Hkv, D]`` -> ``[T, H * D]``."""
        return batch.backend.forward(self, q, k, v, batch)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, window={self.sliding_window}, "
            f"alibi={self.alibi_slopes is not None}"
        )
