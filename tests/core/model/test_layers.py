"""The layer library: tensor-parallel shards reassemble the full layer; numerics match
transformers' own implementations."""

from __future__ import annotations

import pytest
import torch

from tgi_core.model.layers.alibi import alibi_slopes, alibi_slopes_for_rank
from tgi_core.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgi_core.model.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from tgi_core.model.layers.norm import LayerNorm, RMSNorm
from tgi_core.model.layers.rotary import RotaryEmbedding, apply_rotary, rope_parameters
from tgi_core.model.parallel import ParallelContext
from tgi_core.model.weights import LazyTensor

torch.manual_seed(0)
WORLDS = (2, 4)


def ranks(world: int) -> list[ParallelContext]:
    return [ParallelContext(rank=r, world_size=world) for r in range(world)]


def load(layer: torch.nn.Module, name: str, tensor: torch.Tensor, shard_id=None) -> None:
    param = getattr(layer, name)
    param.weight_loader(param, LazyTensor.of(tensor, name), shard_id)


@pytest.mark.parametrize("world", WORLDS)
def test_column_parallel_shards_concatenate(world: int) -> None:
    weight, bias, x = torch.randn(8, 6), torch.randn(8), torch.randn(3, 6)
    full = torch.nn.functional.linear(x, weight, bias)
    parts = []
    for tp in ranks(world):
        layer = ColumnParallelLinear(6, 8, bias=True, tp=tp)
        load(layer, "weight", weight)
        load(layer, "bias", bias)
        parts.append(layer(x))
    torch.testing.assert_close(torch.cat(parts, dim=-1), full)


@pytest.mark.parametrize("world", WORLDS)
def test_row_parallel_shards_sum(world: int) -> None:
    weight, bias, x = torch.randn(5, 8), torch.randn(5), torch.randn(3, 8)
    total = torch.zeros(3, 5)
    for tp in ranks(world):
        layer = RowParallelLinear(8, 5, bias=True, tp=tp, reduce_results=False)
        load(layer, "weight", weight)
        load(layer, "bias", bias)
        shard = 8 // world
        total += layer(x[:, tp.rank * shard : (tp.rank + 1) * shard])
    torch.testing.assert_close(total, torch.nn.functional.linear(x, weight, bias))


@pytest.mark.parametrize("world", WORLDS)
def test_merged_column_packs_gate_and_up_per_rank(world: int) -> None:
    gate, up, x = torch.randn(8, 6), torch.randn(8, 6), torch.randn(3, 6)
    gates, ups = [], []
    for tp in ranks(world):
        layer = MergedColumnParallelLinear(6, [8, 8], tp=tp)
        load(layer, "weight", gate, 0)
        load(layer, "weight", up, 1)
        g, u = layer(x).chunk(2, dim=-1)
        gates.append(g)
        ups.append(u)
    torch.testing.assert_close(torch.cat(gates, -1), x @ gate.T)
    torch.testing.assert_close(torch.cat(ups, -1), x @ up.T)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "world"), [(4, 2, 2), (4, 4, 4), (8, 2, 4), (4, 1, 2)]
)
def test_qkv_splits_by_heads_and_replicates_kv(heads: int, kv_heads: int, world: int) -> None:
    hidden, head_dim = 8, 3
    wq = torch.randn(heads * head_dim, hidden)
    wk, wv = torch.randn(kv_heads * head_dim, hidden), torch.randn(kv_heads * head_dim, hidden)
    bq, bk, bv = (
        torch.randn(heads * head_dim),
        torch.randn(kv_heads * head_dim),
        torch.randn(kv_heads * head_dim),
    )
    x = torch.randn(2, hidden)
    q_full = (x @ wq.T + bq).view(2, heads, head_dim)
    k_full = (x @ wk.T + bk).view(2, kv_heads, head_dim)
    v_full = (x @ wv.T + bv).view(2, kv_heads, head_dim)
    qs = []
    for tp in ranks(world):
        layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=True, tp=tp)
        for shard, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            load(layer, "weight", w, shard)
            load(layer, "bias", b, shard)
        q, k, v = layer.split(layer(x))
        qs.append(q)
        kv_head = tp.rank // layer.kv_replicas if kv_heads < world else None
        if kv_head is not None:  # fewer KV heads than ranks: this rank holds one, replicated
            torch.testing.assert_close(k[:, 0], k_full[:, kv_head])
            torch.testing.assert_close(v[:, 0], v_full[:, kv_head])
        else:
            per = kv_heads // world
            torch.testing.assert_close(k, k_full[:, tp.rank * per : (tp.rank + 1) * per])
            torch.testing.assert_close(v, v_full[:, tp.rank * per : (tp.rank + 1) * per])
    torch.testing.assert_close(torch.cat(qs, dim=1), q_full)


def test_world_size_one_layers_are_plain() -> None:
    weight, x = torch.randn(4, 6), torch.randn(2, 6)
    layer = ReplicatedLinear(6, 4)
    load(layer, "weight", weight)
    torch.testing.assert_close(layer(x), x @ weight.T)
    with pytest.raises(
        ValueError,
        match=r"checkpoint shape \(4, 5\) does not match the "
        r"model's \(4, 6\)",
    ):
        load(layer, "weight", torch.randn(4, 5))


def test_uneven_sharding_is_refused() -> None:
    with pytest.raises(
        ValueError,
        match=r"attention heads \(6\) is not divisible by the "
        r"tensor-parallel size \(4\)",
    ):
        QKVParallelLinear(8, 2, 6, 6, tp=ParallelContext(rank=0, world_size=4))


@pytest.mark.parametrize("world", (2, 3))
def test_vocab_parallel_embedding_and_head(world: int) -> None:
    vocab, dim = 11, 4  # 11 rows: the last rank's range is short
    table, ids, hidden = torch.randn(vocab, dim), torch.tensor([0, 5, 10, 3]), torch.randn(2, dim)
    embedded = torch.zeros(4, dim)
    logits = []
    for tp in ranks(world):
        embedding = VocabParallelEmbedding(vocab, dim, tp=tp)
        load(embedding, "weight", table)
        embedded += embedding(ids)  # the all-reduce, by hand
        head = ParallelLMHead(vocab, dim, tp=tp)
        head.tie_to(embedding)
        logits.append(torch.nn.functional.linear(hidden, head.weight))
    torch.testing.assert_close(embedded, table[ids])
    torch.testing.assert_close(torch.cat(logits, -1)[:, :vocab], hidden @ table.T)


def test_rmsnorm_and_fused_add_match_transformers() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, residual = torch.randn(3, 16), torch.randn(3, 16)
    ours, theirs = RMSNorm(16, eps=1e-5), LlamaRMSNorm(16, eps=1e-5)
    weight = torch.randn(16)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    torch.testing.assert_close(ours(x), theirs(x))
    normed, summed = ours.add_forward(x, residual)
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(normed, theirs(x + residual))
    xb = x.bfloat16()
    ours.bfloat16()
    theirs.bfloat16()
    assert torch.equal(ours(xb), theirs(xb))


def test_layernorm() -> None:
    norm = LayerNorm(8, eps=1e-5)
    norm.weight.data.normal_()
    norm.bias.data.normal_()
    x = torch.randn(2, 8)
    reference = torch.nn.LayerNorm(8, eps=1e-5)
    reference.load_state_dict({"weight": norm.weight.data, "bias": norm.bias.data})
    torch.testing.assert_close(norm(x), reference(x))


def test_alibi_slopes_match_bloom() -> None:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for heads in (1, 2, 4, 6, 8, 12, 16, 24):
        mask = torch.ones(1, 2)
        theirs = build_alibi_tensor(mask, heads, torch.float32)[:, 0, 1]  # key 1: the slopes
        torch.testing.assert_close(alibi_slopes(heads), theirs)
    torch.testing.assert_close(
        torch.cat([alibi_slopes_for_rank(12, tp) for tp in ranks(3)]), alibi_slopes(12)
    )


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn-mscale": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 32,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 16,
        "beta_slow": 2,
    },
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rotary_cos_sin_match_transformers(name: str) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        max_position_embeddings=256,
        rope_parameters=dict(ROPES[name]),
    )
    positions = torch.tensor([0, 1, 7, 63, 200, 255])
    theirs_cos, theirs_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions[None])
    ours = RotaryEmbedding(32, rope_parameters(config), 256)
    cos, sin = ours.cos_sin(positions)
    torch.testing.assert_close(cos, theirs_cos[0])
    torch.testing.assert_close(sin, theirs_sin[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_rotation_matches_transformers(dtype: torch.dtype) -> None:
    """Bit for bit: the rotation without the rotated copy rounds as transformers' does."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = RotaryEmbedding(8, ROPES["default"], 64).cos_sin(torch.arange(50))
    cos, sin = cos.to(dtype), sin.to(dtype)
    q, k = torch.randn(50, 3, 8, dtype=dtype), torch.randn(50, 1, 8, dtype=dtype)
    theirs_q, theirs_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None]
    )
    assert torch.equal(apply_rotary(q, cos, sin), theirs_q[0].transpose(0, 1))
    assert torch.equal(apply_rotary(k, cos, sin), theirs_k[0].transpose(0, 1))


def test_partial_rotary_leaves_the_rest() -> None:
    rope = RotaryEmbedding(8, {**ROPES["default"], "partial_rotary_factor": 0.5}, 64)
    cos, sin = rope.cos_sin(torch.arange(3))
    x = torch.randn(3, 2, 8)
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 4:], x[..., 4:])
    torch.testing.assert_close(out[..., :4], apply_rotary(x[..., :4].contiguous(), cos, sin))


def test_hub_and_transformers5_spellings_agree() -> None:
    class Hub:  # a config as published on the Hub, before transformers 5
        rope_theta = 50000.0
        rope_scaling = {"type": "linear", "factor": 2.0}

    assert rope_parameters(Hub()) == {
        "rope_theta": 50000.0,
        "type": "linear",
        "factor": 2.0,
        "rope_type": "linear",
    }

    class Plain:
        max_position_embeddings = 16

    assert rope_parameters(Plain()) == {"rope_theta": 10000.0, "rope_type": "default"}


def test_unsupported_rope_type_is_named() -> None:
    with pytest.raises(
        ValueError,
        match=r"unsupported rope type 'longrope'; supported: "
        r"default, linear, dynamic, llama3, yarn",
    ):
        RotaryEmbedding(8, {"rope_type": "longrope", "rope_theta": 1.0}, 64)


def test_lazy_tensor_copies_in_chunks_and_converts(monkeypatch) -> None:
    import tgi_core.model.weights as weights

    source = torch.randn(10, 6)
    reads = []
    lazy = LazyTensor("t", (10, 6), lambda slices: reads.append(slices) or source[slices])
    monkeypatch.setattr(weights, "COPY_CHUNK_BYTES", 3 * 6 * 4)  # three rows at a time
    target = torch.empty(10, 6, dtype=torch.bfloat16)
    lazy.copy_into(target)
    assert torch.equal(target, source.bfloat16())
    assert len(reads) == 4
    part = torch.empty(2, 6)
    lazy.narrow(0, 4, 2).copy_into(part)
    assert torch.equal(part, source[4:6])
    with pytest.raises(ValueError, match=r"t: checkpoint shape \(10, 6\) does not match"):
        lazy.copy_into(torch.empty(10, 5))
