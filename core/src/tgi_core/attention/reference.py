"""The reference backend: attention written out plainly, one sequence at a time.

Obviously correct rather than fast: every score is computed in float32 from the cache,
with the causal, sliding-window, ALiBi and relative-position rules spelled out, and
encoder and cross-attention layers written out the same way. Tests run every model
through it and through the default backend.
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import torch

from tgi_core.attention.backend import AttentionBackend
from tgi_core.attention.batch import ForwardBatch, slots_for
from tgi_core.model.layers.attention import Attention


class ReferenceBackend(AttentionBackend):
    """Plain per-sequence attention in float32 over a float32 cache."""

    name: ClassVar[str] = "reference"
    features: ClassVar[frozenset[str]] = frozenset(
        {
            "causal",
            "paged_kv",
            "prefix_caching",
            "sliding_window",
            "alibi",
            "gqa",
            "relative_bias",
            "cross_attention",
        }
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
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        if layer.kind == "encoder":
            assert k is not None and v is not None and batch.encoder is not None
            return self._encoder(layer, q, k, v, batch.encoder.query_start)
        if layer.kind == "cross":
            return self._cross(layer, q, batch)
        assert k is not None and v is not None
        batch.kv_cache.write(layer.layer_index, batch.slot_mapping, k, v)
        keys, values = (
            batch.kv_cache.keys[layer.layer_index],
            batch.kv_cache.values[layer.layer_index],
        )
        out = torch.empty(q.shape[0], layer.num_heads, layer.head_dim, dtype=torch.float32)
        slots: list[torch.Tensor] = batch.state
        for index, chunk in enumerate(batch.chunks):
            start, end = batch.query_start[index], batch.query_start[index + 1]
            query_pos = torch.arange(chunk.num_cached, chunk.seq_len)
            key_pos = torch.arange(chunk.seq_len)
            allowed = key_pos[None, :] <= query_pos[:, None]
            if layer.sliding_window is not None:
                allowed &= query_pos[:, None] - key_pos[None, :] < layer.sliding_window
            out[start:end] = _attend(
                layer,
                q[start:end],
                keys[slots[index]],
                values[slots[index]],
                allowed,
                query_pos,
                key_pos,
            )
        return out.to(q.dtype).flatten(1)

    def _encoder(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        starts: list[int],
    ) -> torch.Tensor:
        out = torch.empty(q.shape[0], layer.num_heads, layer.head_dim, dtype=torch.float32)
        for start, end in itertools.pairwise(starts):
            positions = torch.arange(end - start)
            allowed = torch.ones(end - start, end - start, dtype=torch.bool)
            out[start:end] = _attend(
                layer, q[start:end], k[start:end], v[start:end], allowed, positions, positions
            )
        return out.to(q.dtype).flatten(1)

    def _cross(self, layer: Attention, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        keys = batch.kv_cache.keys[layer.layer_index]
        values = batch.kv_cache.values[layer.layer_index]
        out = torch.empty(q.shape[0], layer.num_heads, layer.head_dim, dtype=torch.float32)
        for index, chunk in enumerate(batch.chunks):
            start, end = batch.query_start[index], batch.query_start[index + 1]
            slots = torch.tensor(
                slots_for(chunk.block_table, 0, chunk.encoder_len, batch.block_size)
            )
            allowed = torch.ones(end - start, chunk.encoder_len, dtype=torch.bool)
            out[start:end] = _attend(
                layer, q[start:end], keys[slots], values[slots], allowed, None, None
            )
        return out.to(q.dtype).flatten(1)


def _attend(
    layer: Attention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    query_pos: torch.Tensor | None,
    key_pos: torch.Tensor | None,
) -> torch.Tensor:
    """softmax(q k^T * scale + biases, masked) v for one sequence: ``[n, H, D]`` (fp32)."""
    group = layer.num_heads // layer.num_kv_heads
    key = key.float().repeat_interleave(group, dim=1)  # [L, H, D]
    value = value.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), key) * layer.scale  # [H, n, L]
    if layer.alibi_slopes is not None and key_pos is not None:
        scores = scores + layer.alibi_slopes.float()[:, None, None] * key_pos.float()
    if layer.position_bias is not None and query_pos is not None and key_pos is not None:
        scores = scores + layer.position_bias(query_pos, key_pos)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), value)
