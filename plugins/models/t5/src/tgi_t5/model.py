"""T5 (v1.0, v1.1, flan-t5) as a composition of tgi_core layers, in the paged engine.

Module and parameter names mirror the Hugging Face checkpoints (``shared``,
``encoder.block.N.layer.M.SelfAttention.q``, ``...EncDecAttention.k``,
``...DenseReluDense.wi_0``, ``final_layer_norm``, ``lm_head``), so the core loader needs
no renames; ``encoder.embed_tokens`` and ``decoder.embed_tokens`` are aliases of
``shared``, and the head is tied to it unless the checkpoint stores a different one.

One forward is one engine step: if the step admits sequences, their sources (packed,
``batch.encoder``) go through the encoder and each decoder layer writes its
cross-attention keys and values to the cache; then the step's decoder tokens go through
the decoder. T5 scales no attention scores (``scale=1``) and adds a bucketed relative
position bias, computed from the first block's table (bidirectional in the encoder,
causal in the decoder); v1.0 scales the decoder output by ``d_model ** -0.5`` before
its tied head.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from tgi_core.attention.batch import ForwardBatch
from tgi_core.model.base import ModelContext
from tgi_core.model.layers.activation import get_activation
from tgi_core.model.layers.attention import Attention, AttentionKind
from tgi_core.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgi_core.model.layers.linear import ColumnParallelLinear, RowParallelLinear
from tgi_core.model.layers.norm import RMSNorm
from tgi_core.model.layers.relative_position import RelativePositionBias
from tgi_core.model.parallel import ParallelContext
from tgi_core.model.weights import LazyTensor


class RelativeAttentionBias(nn.Module):
    """The ``[num_buckets, heads]`` bias table of a stack's first block (this rank's heads)."""

    def __init__(self, num_buckets: int, num_heads: int, tp: ParallelContext) -> None:
        super().__init__()
        self.num_heads, self.tp = num_heads, tp
        self.heads_per_rank = num_heads // tp.world_size
        self.weight = nn.Parameter(
            torch.zeros(num_buckets, self.heads_per_rank), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: Any = None) -> None:
        if loaded.shape != (param.shape[0], self.num_heads):
            raise ValueError(
                f"{loaded.name}: checkpoint shape {loaded.shape} does not match the model's "
                f"{(param.shape[0], self.num_heads)}"
            )
        first = self.tp.rank * self.heads_per_rank
        loaded.narrow(1, first, self.heads_per_rank).copy_into(param.data)


class T5Attention(nn.Module):
    """q, k, v, o projections around one of the core's attention layers."""

    def __init__(
        self, config: Any, kind: AttentionKind, has_bias_table: bool, tp: ParallelContext
    ) -> None:
        super().__init__()
        heads, head_dim = config.num_heads, config.d_kv
        if heads % tp.world_size:
            raise ValueError(f"{heads} heads cannot be split over {tp.world_size} ranks")
        inner = heads * head_dim
        self.q = ColumnParallelLinear(config.d_model, inner, tp=tp)
        self.k = ColumnParallelLinear(config.d_model, inner, tp=tp)
        self.v = ColumnParallelLinear(config.d_model, inner, tp=tp)
        self.o = RowParallelLinear(inner, config.d_model, tp=tp)
        self.local_heads, self.head_dim = heads // tp.world_size, head_dim
        if has_bias_table:
            self.relative_attention_bias = RelativeAttentionBias(
                config.relative_attention_num_buckets, heads, tp
            )
        self.attn = Attention(self.local_heads, head_dim, self.local_heads, scale=1.0, kind=kind)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, self.local_heads, self.head_dim)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Self-attention of ``x``, or (cross) its queries over the cached source."""
        q = self._heads(self.q(x))
        if self.attn.kind == "cross":
            return self.o(self.attn(q, None, None, batch))
        return self.o(self.attn(q, self._heads(self.k(x)), self._heads(self.v(x)), batch))

    def store_encoder_kv(self, encoded: torch.Tensor, batch: ForwardBatch) -> None:
        """Cross-attention: project the step's encoder outputs and cache them."""
        self.attn.store_encoder_kv(
            self._heads(self.k(encoded)), self._heads(self.v(encoded)), batch
        )


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: Any, kind: AttentionKind, first: bool, tp: ParallelContext):
        super().__init__()
        self.SelfAttention = T5Attention(config, kind, first, tp)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return hidden + self.SelfAttention(self.layer_norm(hidden), batch)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: Any, tp: ParallelContext) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(config, "cross", False, tp)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return hidden + self.EncDecAttention(self.layer_norm(hidden), batch)


class T5DenseActDense(nn.Module):
    """v1.0: ``wo(act(wi(x)))``."""

    def __init__(self, config: Any, tp: ParallelContext) -> None:
        super().__init__()
        self.wi = ColumnParallelLinear(config.d_model, config.d_ff, tp=tp)
        self.wo = RowParallelLinear(config.d_ff, config.d_model, tp=tp)
        self.act = get_activation(config.dense_act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi(x)))


class T5DenseGatedActDense(nn.Module):
    """v1.1: ``wo(act(wi_0(x)) * wi_1(x))``."""

    def __init__(self, config: Any, tp: ParallelContext) -> None:
        super().__init__()
        self.wi_0 = ColumnParallelLinear(config.d_model, config.d_ff, tp=tp)
        self.wi_1 = ColumnParallelLinear(config.d_model, config.d_ff, tp=tp)
        self.wo = RowParallelLinear(config.d_ff, config.d_model, tp=tp)
        self.act = get_activation(config.dense_act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, config: Any, tp: ParallelContext) -> None:
        super().__init__()
        dense = T5DenseGatedActDense if _is_gated(config) else T5DenseActDense
        self.DenseReluDense = dense(config, tp)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.DenseReluDense(self.layer_norm(hidden))


class T5Block(nn.Module):
    def __init__(self, config: Any, is_decoder: bool, first: bool, tp: ParallelContext) -> None:
        super().__init__()
        kind: AttentionKind = "decoder" if is_decoder else "encoder"
        layers: list[nn.Module] = [T5LayerSelfAttention(config, kind, first, tp)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config, tp))
        layers.append(T5LayerFF(config, tp))
        self.layer = nn.ModuleList(layers)

    @property
    def self_attention(self) -> T5Attention:
        return cast(T5LayerSelfAttention, self.layer[0]).SelfAttention

    @property
    def cross_attention(self) -> T5Attention:
        return cast(T5LayerCrossAttention, self.layer[1]).EncDecAttention

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        for sublayer in self.layer[:-1]:
            hidden = sublayer(hidden, batch)
        return cast(torch.Tensor, self.layer[-1](hidden))


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks sharing the first block's position bias."""

    def __init__(
        self,
        config: Any,
        embed_tokens: VocabParallelEmbedding,
        *,
        is_decoder: bool,
        num_layers: int,
        tp: ParallelContext,
    ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList(
            T5Block(config, is_decoder, index == 0, tp) for index in range(num_layers)
        )
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        bias = RelativePositionBias(
            self.blocks[0].self_attention.relative_attention_bias,
            bidirectional=not is_decoder,
            num_buckets=config.relative_attention_num_buckets,
            max_distance=config.relative_attention_max_distance,
        )
        for block in self.blocks:
            block.self_attention.attn.position_bias = bias

    @property
    def blocks(self) -> list[T5Block]:
        return [cast(T5Block, block) for block in self.block]

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for block in self.blocks:
            hidden = block(hidden, batch)
        return cast(torch.Tensor, self.final_layer_norm(hidden))


def _is_gated(config: Any) -> bool:
    gated = getattr(config, "is_gated_act", None)
    if gated is None:
        gated = str(getattr(config, "feed_forward_proj", "relu")).startswith("gated-")
    return bool(gated)


def _scales_decoder_output(config: Any) -> bool:
    """T5 v1.0 scales the decoder output before its tied head; v1.1 doesn't.

    transformers 5 says so in ``scale_decoder_outputs``; older configs say it with
    ``tie_word_embeddings`` (false in v1.1 checkpoints).
    """
    scale = getattr(config, "scale_decoder_outputs", None)
    if scale is None:
        scale = getattr(config, "tie_word_embeddings", True)
    return bool(scale)


class T5ForConditionalGeneration(nn.Module):
    """``forward`` runs one step (sources to encode, then decoder tokens); ``compute_logits``
    maps decoder hidden states to logits."""

    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        tp = ctx.tp
        self.config = config
        self.shared = VocabParallelEmbedding(config.vocab_size, config.d_model, tp=tp)
        self.encoder = T5Stack(
            config, self.shared, is_decoder=False, num_layers=config.num_layers, tp=tp
        )
        decoder_layers = getattr(config, "num_decoder_layers", None) or config.num_layers
        self.decoder = T5Stack(
            config, self.shared, is_decoder=True, num_layers=decoder_layers, tp=tp
        )
        self.lm_head = ParallelLMHead(config.vocab_size, config.d_model, tp=tp)
        self.lm_head.tie_to(self.shared)  # untied by the loader if the checkpoint differs
        self.output_scale = config.d_model**-0.5 if _scales_decoder_output(config) else None

    def encode(self, batch: ForwardBatch) -> torch.Tensor:
        """Run the step's sources through the encoder and cache every decoder layer's
        cross-attention keys and values; returns the encoder outputs ``[T_enc, d_model]``."""
        assert batch.encoder is not None
        encoded = self.encoder(batch.encoder.input_ids, batch)
        for block in self.decoder.blocks:
            block.cross_attention.store_encoder_kv(encoded, batch)
        return encoded

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        if batch.encoder is not None:
            self.encode(batch)
        return cast(torch.Tensor, self.decoder(input_ids, batch))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        return self.lm_head(hidden)


def build_model(hf_config: Any, ctx: ModelContext) -> T5ForConditionalGeneration:
    """The ``ModelSpec`` factory."""
    return T5ForConditionalGeneration(hf_config, ctx)
