"""The attention layer models use: it names no kernel, the step's backend computes it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from tgi_core.model.layers import opaque

if TYPE_CHECKING:
    from tgi_core.attention.batch import ForwardBatch
    from tgi_core.model.layers.relative_position import RelativePositionBias

#: "decoder": causal self-attention over the paged cache (every decoder-only model);
#: "encoder": bidirectional self-attention within each source, no cache (T5's encoder);
#: "cross": a decoder's attention over its source's encoder output, kept in the cache.
AttentionKind = Literal["decoder", "encoder", "cross"]


class Attention(nn.Module):
    """Multi-head attention over the paged KV cache (GQA/MQA when ``num_kv_heads < num_heads``).

    :param scale: the factor applied to ``q @ k.T`` (usually ``head_dim ** -0.5``).
    :param sliding_window: attend only to the last ``sliding_window`` positions.
    :param alibi_slopes: per-head ALiBi slopes of this rank's heads.
    :param kind: what the layer attends to (see ``AttentionKind``).
    :param position_bias: T5's relative position bias, added to the scores.
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
        kind: AttentionKind = "decoder",
        position_bias: RelativePositionBias | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} heads cannot share {num_kv_heads} key/value heads")
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.alibi_slopes: torch.Tensor | None
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.kind: AttentionKind = kind
        self.position_bias = position_bias
        #: this layer's index in the KV cache; set when the cache is allocated (encoder
        #: layers have no cache and keep -1).
        self.layer_index = -1
        #: this layer's key for the ``tgi::attention`` op (-1: none; given by the model's
        #: runner, ``model/compiled.py``)
        self.op_key = -1

    @property
    def cached(self) -> bool:
        """Whether the layer keeps keys and values in the KV cache."""
        return self.kind != "encoder"

    def store_encoder_kv(self, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> None:
        """A cross-attention layer's keys and values of this step's encoder outputs
        ``[T_enc, Hkv, D]``, written to the cache once, where its source's positions live."""
        assert self.kind == "cross" and batch.encoder is not None
        batch.kv_cache.write(self.layer_index, batch.encoder.slot_mapping, k, v)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """``q`` ``[T, H, D]``, ``k``/``v`` ``[T, Hkv, D]`` -> ``[T, H * D]``. An encoder
        layer's tensors are the step's packed encoder tokens; a cross layer takes no
        ``k``/``v`` (they are in the cache)."""
        # the op: opaque to inductor (model/compiled.py); in an eager decode step, one its
        # C++ kernel may run alone (attention/native.py), handing the rest to the backend
        if torch.compiler.is_compiling() or (
            batch.native_decode is not None and self.op_key >= 0 and opaque.is_current(batch)
        ):
            return opaque.attention(q, k, v, self.op_key)
        return batch.backend.forward(self, q, k, v, batch)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, window={self.sliding_window}, "
            f"alibi={self.alibi_slopes is not None}, kind={self.kind}"
        )
