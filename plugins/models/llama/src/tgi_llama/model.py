"""The Llama family (Llama 1/2/3, Mistral, Qwen2) as a composition of tgi_core layers.

Module and parameter names mirror the Hugging Face checkpoints, so the core loader
needs no renames: q/k/v load into ``qkv_proj`` and gate/up into ``gate_up_proj``.
Family differences are read from the config: ``attention_bias`` (Llama) and Qwen2's
q/k/v bias, ``mlp_bias``, ``head_dim``, Mistral's and Qwen2's sliding windows
(``sliding_window``, ``layer_types``), tied embeddings, and every rope variant.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tgi_core.attention.batch import ForwardBatch
from tgi_core.model.base import ModelContext
from tgi_core.model.layers.activation import gated, get_activation
from tgi_core.model.layers.attention import Attention
from tgi_core.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgi_core.model.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from tgi_core.model.layers.norm import RMSNorm
from tgi_core.model.layers.rotary import apply_rotary, get_rope
from tgi_core.model.parallel import ParallelContext


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _sliding_window(config: Any, layer_index: int) -> int | None:
    """The attention window of a layer, as transformers applies it per model type.

    Mistral: ``sliding_window`` on every layer. Qwen2: only the layers ``layer_types``
    marks ``sliding_attention`` (``use_sliding_window`` and ``max_window_layers``).
    Llama: never (transformers ignores a stray ``sliding_window`` key).
    """
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    if config.model_type == "mistral":
        return int(window)
    if config.model_type == "qwen2":
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return int(window) if layer_types[layer_index] == "sliding_attention" else None
        use = getattr(config, "use_sliding_window", False)
        return int(window) if use and layer_index >= config.max_window_layers else None
    return None


def _qkv_bias(config: Any) -> bool:
    return config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_index: int, tp: ParallelContext) -> None:
        super().__init__()
        head_dim = _head_dim(config)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, heads, kv_heads, bias=_qkv_bias(config), tp=tp
        )
        self.o_proj = RowParallelLinear(
            heads * head_dim,
            config.hidden_size,
            bias=bool(getattr(config, "attention_bias", False)),
            tp=tp,
        )
        self.attn = Attention(
            self.qkv_proj.num_heads,
            head_dim,
            self.qkv_proj.num_kv_heads,
            scale=head_dim**-0.5,
            sliding_window=_sliding_window(config, layer_index),
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        proj = self.qkv_proj
        qkv = proj(x)
        # rotate q and k together: [T, H + Hkv, D], then split
        qk = apply_rotary(
            qkv[:, : proj.q_size + proj.kv_size].view(
                -1, proj.num_heads + proj.num_kv_heads, proj.head_dim
            ),
            cos,
            sin,
        )
        q, k = qk.split([proj.num_heads, proj.num_kv_heads], dim=1)
        v = qkv[:, proj.q_size + proj.kv_size :].view(-1, proj.num_kv_heads, proj.head_dim)
        return self.o_proj(self.attn(q, k, v, batch))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, tp: ParallelContext) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], bias=bias, tp=tp
        )
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias, tp=tp)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated(self.act, self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_index: int, tp: ParallelContext) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_index, tp)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = hidden, self.input_layernorm(hidden)
        else:
            x, residual = self.input_layernorm.add_forward(hidden, residual)
        x, residual = self.post_attention_layernorm.add_forward(
            self.self_attn(x, cos, sin, batch), residual
        )
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, tp: ParallelContext) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp=tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, index, tp) for index in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama-family decoder: ``forward`` gives hidden states, ``compute_logits`` logits."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, ctx.tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp=ctx.tp)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.tie_to(self.model.embed_tokens)
        self.rotary_emb = get_rope(_head_dim(config), config)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        seq_lens = batch.seq_lens_per_token() if self.rotary_emb.rope_type == "dynamic" else None
        cos, sin = self.rotary_emb.cos_sin(positions, seq_lens)
        hidden, residual = self.model.embed_tokens(input_ids), None
        cos, sin = cos.to(hidden.dtype), sin.to(hidden.dtype)  # once, not in every layer
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual, cos, sin, batch)
        assert residual is not None
        normed, _ = self.model.norm.add_forward(hidden, residual)
        return normed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def build_model(hf_config: Any, ctx: ModelContext) -> LlamaForCausalLM:
    """The ``ModelSpec`` factory."""
    return LlamaForCausalLM(hf_config, ctx)
