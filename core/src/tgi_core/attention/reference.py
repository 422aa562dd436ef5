"""The reference backend: attention written out plainly, one sequence at a time.

Obviously correct rather than fast: every score is computed in float32 from the cache,
with the causal, sliding-window and ALiBi rules spelled out. Tests run every model
through it and through the default backend.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tgi_core.attention.backend import AttentionBackend
from tgi_core.attention.batch import ForwardBatch, slots_for
from tgi_core.model.layers.attention import Attention


class ReferenceBackend(AttentionBackend):
    """Plain per-sequence attention in float32 over a float32 cache."""

    name: ClassVar[str] = "reference"
    features: ClassVar[frozenset[str]] = frozenset(
        {"causal", "paged_kv", "prefix_caching", "sliding_window", "alibi", "gqa"}
    )

    def kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    def prepare(self, batch: ForwardBatch) -> list[torch.Tensor]:
        """The cache slots of every position of each sequence."""
        return [
            torch.tensor(slots_for(chunk.block_table, 0, chunk.seq_len, batch.block_size))
            for chunk in batch.chunks
        ]

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        batch.kv_cache.write(layer.layer_index, batch.slot_mapping, k, v)
        keys, values = (
            batch.kv_cache.keys[layer.layer_index],
            batch.kv_cache.values[layer.layer_index],
        )
        out = torch.empty(q.shape[0], layer.num_heads, layer.head_dim, dtype=torch.float32)
        group = layer.num_heads // layer.num_kv_heads
        slots: list[torch.Tensor] = batch.state
        for index, chunk in enumerate(batch.chunks):
            start, end = batch.query_start[index], batch.query_start[index + 1]
            query = q[start:end].float()  # [n, H, D]
            key = keys[slots[index]].repeat_interleave(group, dim=1)  # [L, H, D]
            value = values[slots[index]].repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", query, key) * layer.scale  # [H, n, L]
            query_pos = torch.arange(chunk.num_cached, chunk.seq_len)[:, None]
            key_pos = torch.arange(chunk.seq_len)[None, :]
            allowed = key_pos <= query_pos
            if layer.sliding_window is not None:
                allowed &= query_pos - key_pos < layer.sliding_window
            if layer.alibi_slopes is not None:
                scores = scores + layer.alibi_slopes.float()[:, None, None] * key_pos.float()
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), value)
        return out.to(q.dtype).flatten(1)
