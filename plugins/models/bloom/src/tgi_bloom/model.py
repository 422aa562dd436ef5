"""BLOOM as a composition of tgi_core layers.

Module and parameter names mirror transformers' ``BloomForCausalLM``
(``transformer.h.N.self_attention.query_key_value``, ``mlp.dense_h_to_4h``, ...), so the
core loader needs no packing map. Checkpoints spell the names with the ``transformer.``
prefix (transformers' ``save_pretrained``) or without it (the Hub's BLOOM checkpoints);
``map_checkpoint_name`` accepts both.

What sets BLOOM apart from the Llama family: a LayerNorm right after the word
embeddings, LayerNorms with biases everywhere, biases on every linear layer, ALiBi
instead of rotary positions, a tanh-approximated GELU MLP of width ``4 * hidden``, the
``apply_residual_connection_post_layernorm`` flag, and a fused ``query_key_value``
whose rows are interleaved per head (``[heads, (q, k, v), head_dim]``), which
:class:`BloomQKVLinear` regroups while loading. ``pretraining_tp`` and
``slow_but_exact`` only change the order of a sum in transformers; they are ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tgi_core.attention.batch import ForwardBatch
from tgi_core.model.base import ModelContext
from tgi_core.model.layers.activation import gelu_tanh
from tgi_core.model.layers.alibi import alibi_slopes_for_rank
from tgi_core.model.layers.attention import Attention
from tgi_core.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgi_core.model.layers.linear import (
    ColumnParallelLinear,
    LinearMethod,
    OutputRows,
    QKVParallelLinear,
    RowParallelLinear,
)
from tgi_core.model.layers.norm import LayerNorm
from tgi_core.model.parallel import ParallelContext


def _head_dim(config: Any) -> int:
    heads = config.num_attention_heads
    if config.hidden_size % heads:
        raise ValueError(
            f"BLOOM's hidden_size ({config.hidden_size}) is not divisible by its "
            f"{heads} attention heads"
        )
    return config.hidden_size // heads


class BloomQKVLinear(QKVParallelLinear):
    """BLOOM's fused ``query_key_value``: q, k and v interleaved per head in the checkpoint.

    The checkpoint's weight ``[heads * 3 * head_dim, hidden]`` (and bias
    ``[heads * 3 * head_dim]``) is laid out as ``[heads, 3 (q, k, v), head_dim, ...]``,
    so this rank's heads are one contiguous range of rows: only that range is read, then
    regrouped into the ``[q | k | v]`` packing of :class:`QKVParallelLinear`, whose
    ``split()`` the model uses. Every rank holds ``heads / world_size`` heads of each of
    q, k and v (BLOOM has as many key/value heads as query heads).
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        *,
        tp: ParallelContext | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__(
            hidden_size, head_dim, num_heads, num_heads, bias=True, tp=tp, method=method
        )

    def output_rows(self, shard_id: Any) -> OutputRows:
        """This rank's heads of the interleaved tensor, regrouped as ``[q | k | v]``.

        ``shard_id`` ``"q"``/``"k"``/``"v"`` (separate tensors, not BLOOM's layout) falls
        back to :class:`QKVParallelLinear`'s rows.
        """
        if shard_id is not None:
            return super().output_rows(shard_id)
        rows_per_head, head_dim = 3 * self.head_dim, self.head_dim
        first = self.tp.rank * self.num_heads * rows_per_head
        ranges = [  # (checkpoint row, length, row in the [q | k | v] packing)
            (
                first + head * rows_per_head + part * head_dim,
                head_dim,
                part * self.q_size + head * head_dim,
            )
            for head in range(self.num_heads)
            for part in range(3)  # q, k, v
        ]
        hint = f"{self.total_num_heads} heads of 3 x {head_dim} rows"
        return OutputRows(self.total_num_heads * rows_per_head, ranges, hint)


class BloomAttention(nn.Module):
    def __init__(self, config: Any, tp: ParallelContext) -> None:
        super().__init__()
        head_dim, heads = _head_dim(config), config.num_attention_heads
        self.query_key_value = BloomQKVLinear(config.hidden_size, head_dim, heads, tp=tp)
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, bias=True, tp=tp)
        local_heads = self.query_key_value.num_heads
        self.attn = Attention(
            local_heads,
            head_dim,
            local_heads,
            scale=head_dim**-0.5,
            alibi_slopes=alibi_slopes_for_rank(heads, tp),
        )

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.query_key_value.split(self.query_key_value(x))  # [T, H, D] each
        return self.dense(self.attn(q, k, v, batch))


class BloomMLP(nn.Module):
    def __init__(self, config: Any, tp: ParallelContext) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(hidden, 4 * hidden, bias=True, tp=tp)
        self.dense_4h_to_h = RowParallelLinear(4 * hidden, hidden, bias=True, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(gelu_tanh(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    """LayerNorm, attention, residual; LayerNorm, MLP, residual.

    The residual is each sublayer's input, or, with
    ``apply_residual_connection_post_layernorm``, its LayerNorm's output.
    """

    def __init__(self, config: Any, tp: ParallelContext) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.input_layernorm = LayerNorm(config.hidden_size, eps)
        self.self_attention = BloomAttention(config, tp)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps)
        self.mlp = BloomMLP(config, tp)
        self.residual_post_layernorm = bool(
            getattr(config, "apply_residual_connection_post_layernorm", False)
        )

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        residual = normed if self.residual_post_layernorm else hidden
        hidden = self.self_attention(normed, batch) + residual
        normed = self.post_attention_layernorm(hidden)
        residual = normed if self.residual_post_layernorm else hidden
        return self.mlp(normed) + residual


class BloomModel(nn.Module):
    def __init__(self, config: Any, tp: ParallelContext) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp=tp)
        self.word_embeddings_layernorm = LayerNorm(config.hidden_size, eps)
        self.h = nn.ModuleList(BloomBlock(config, tp) for _ in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, eps)


class BloomForCausalLM(nn.Module):
    """BLOOM decoder: ``forward`` gives hidden states, ``compute_logits`` logits."""

    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.config = config
        self.transformer = BloomModel(config, ctx.tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp=ctx.tp)
        if getattr(config, "tie_word_embeddings", True):  # BLOOM's default
            self.lm_head.tie_to(self.transformer.word_embeddings)

    @staticmethod
    def map_checkpoint_name(name: str) -> str:
        """Both spellings of the names: ``h.0...`` (Hub checkpoints) gains ``transformer.``."""
        if name.startswith(("transformer.", "lm_head.")):
            return name
        return f"transformer.{name}"

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]``; positions enter through ALiBi, in the backend."""
        hidden = self.transformer.word_embeddings_layernorm(
            self.transformer.word_embeddings(input_ids)
        )
        for block in self.transformer.h:
            hidden = block(hidden, batch)
        return self.transformer.ln_f(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def build_model(hf_config: Any, ctx: ModelContext) -> BloomForCausalLM:
    """The ``ModelSpec`` factory."""
    return BloomForCausalLM(hf_config, ctx)
