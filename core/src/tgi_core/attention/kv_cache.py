"""The paged KV cache: per attention layer, a key and a value tensor of slots.

Slot ``s`` holds one token's keys (or values) for every KV head of the layer: the
tensors have shape ``[num_blocks * block_size, num_kv_heads, head_dim]`` and block
``b`` owns slots ``[b * block_size, (b + 1) * block_size)``.

Encoder-decoder models keep two kinds of layers here: decoder self-attention (slot
``p`` of a sequence holds its decoder token ``p``) and cross-attention (slot ``p`` holds
its source token ``p``), so a sequence's blocks cover the longer of the two. Encoder
layers have no cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tgi_core.model.layers.attention import Attention


_serials = itertools.count()


@dataclass
class KVCache:
    """Keys and values of every attention layer, indexed by ``Attention.layer_index``.
    ``serial`` tells caches apart for as long as the process runs (never reused): the C++
    attention kernel keeps raw pointers to a cache's tensors under its serial."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    num_blocks: int
    block_size: int
    dtype: torch.dtype = torch.float32
    serial: int = field(default_factory=lambda: next(_serials), compare=False)

    @classmethod
    def allocate(
        cls,
        layers: Sequence[Attention],
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """Allocate zeroed caches for the cached ``layers`` and number them in order."""
        keys, values = [], []
        for index, layer in enumerate(layer for layer in layers if layer.cached):
            layer.layer_index = index
            shape = (num_blocks * block_size, layer.num_kv_heads, layer.head_dim)
            keys.append(torch.zeros(shape, dtype=dtype, device=device))
            values.append(torch.zeros(shape, dtype=dtype, device=device))
        return cls(keys, values, num_blocks, block_size, dtype)

    @staticmethod
    def bytes_per_block(layers: Sequence[Attention], block_size: int, dtype: torch.dtype) -> int:
        """Memory one block takes across every layer (keys and values)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return sum(
            2 * block_size * layer.num_kv_heads * layer.head_dim * itemsize
            for layer in layers
            if layer.cached
        )

    def write(
        self, layer_index: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Store the new tokens' ``key``/``value`` ``[T, Hkv, D]`` at ``slots``."""
        self.keys[layer_index].index_copy_(0, slots, key.to(self.keys[layer_index].dtype))
        self.values[layer_index].index_copy_(0, slots, value.to(self.values[layer_index].dtype))
