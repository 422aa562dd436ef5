"""The CPU prefill-attention kernel against attention computed plainly in float64.

Causal chunks over a cached prefix in a paged cache (blocks scattered, block sizes that
do not divide the kernel's 16-query items or 32-position tiles), and T5-style sources:
packed rows, bidirectional, with a relative position bias. The kernel rounds its output
and its softmax weights to bf16, so it agrees with exact attention of the same bf16
inputs within bf16 rounding (1e-2: outputs are averages of unit-normal values).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tgi_core.attention import flash_prefill
from tgi_core.attention.flash_prefill import (
    PrefillSequences,
    flash_prefill_available,
    relative_bias_table,
)
from tgi_core.model.layers.relative_position import RelativePositionBias

pytestmark = pytest.mark.skipif(
    not flash_prefill_available(64), reason="needs AVX-512 BF16 and a C++ compiler"
)
TOLERANCE = dict(atol=1e-2, rtol=1e-2)


def exact(q, k, v, *, causal_from=None, bias=None, scale):
    """q [n, H, D] over k, v [L, Hkv, D] in float64; causal_from: the first query's
    position (it sees keys up to its own); bias [H, n, L]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if bias is not None:
        scores = scores + bias.double()
    if causal_from is not None:
        query_pos = causal_from + torch.arange(q.shape[0])
        hidden = torch.arange(k.shape[0])[None, :] > query_pos[:, None]
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


CASES = {
    "smollm-like (3 per group, 64)": dict(heads=9, kv_heads=3, head_dim=64, block_size=16),
    "qwen-like (7 per group, 64)": dict(heads=14, kv_heads=2, head_dim=64, block_size=16),
    "mha, 128, blocks of 5": dict(heads=4, kv_heads=4, head_dim=128, block_size=5),
    "t5-test-like, 16": dict(heads=4, kv_heads=4, head_dim=16, block_size=4),
    "mqa, 80, blocks of 3": dict(heads=6, kv_heads=1, head_dim=80, block_size=3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_causal_chunks_over_a_cached_prefix(case) -> None:
    """Sequences with 0, 21 and 40 cached positions and 1, 17 and 37 new queries (items
    of 16 queries cut mid-way, tiles of 32 positions cut mid-way), their rows apart in
    the packed batch; rows of no sequence are left as they were."""
    heads, kv_heads, head_dim, block_size = (
        CASES[case][k] for k in ("heads", "kv_heads", "head_dim", "block_size")
    )
    generator = torch.Generator().manual_seed(0)
    cached, new = [0, 21, 40], [17, 1, 37]
    lengths = [c + n for c, n in zip(cached, new, strict=True)]
    blocks_each = -(-max(lengths) // block_size)
    num_blocks = len(lengths) * blocks_each + 3
    tables = torch.randperm(num_blocks, generator=generator)[: len(lengths) * blocks_each]
    tables = tables.view(len(lengths), blocks_each).contiguous()
    keys = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=generator).bfloat16()
    values = torch.randn(keys.shape, generator=generator).bfloat16()
    starts = [2, 20, 23]  # rows 0-1, 19 and 21-22 belong to no sequence
    q = torch.randn(60, heads, head_dim, generator=generator).bfloat16()
    out = torch.full(q.shape, 7.0, dtype=torch.bfloat16)
    scale = head_dim**-0.5
    sequences = PrefillSequences(
        starts, new, cached, lengths, block_tables=tables, block_size=block_size
    )
    sequences.attend(q, keys, values, out, scale, causal=True)
    for s, (start, n) in enumerate(zip(starts, new, strict=True)):
        positions = torch.arange(lengths[s])
        slots = tables[s, positions // block_size] * block_size + positions % block_size
        expected = exact(
            q[start : start + n], keys[slots], values[slots], causal_from=cached[s], scale=scale
        )
        torch.testing.assert_close(out[start : start + n].double(), expected, **TOLERANCE)
    untouched = torch.ones(60, dtype=torch.bool)
    for start, n in zip(starts, new, strict=True):
        untouched[start : start + n] = False
    assert (out[untouched] == 7.0).all()


@pytest.mark.parametrize("head_dim", [16, 64])
def test_sources_attend_bidirectionally_with_a_relative_bias(head_dim) -> None:
    """T5's encoder: packed sources of 7, 40 and 70 tokens (longer than the bias's
    exact buckets), every query over its whole source plus T5's bucketed bias; q, k and
    v strided views of one projection, as a fused layer gives them."""
    heads = 4
    generator = torch.Generator().manual_seed(1)
    lengths = [7, 40, 70]
    starts = [0, 7, 47]
    total = sum(lengths)
    fused = torch.randn(total, 3 * heads * head_dim, generator=generator).bfloat16()
    q, k, v = (x.view(total, heads, head_dim) for x in fused.split(heads * head_dim, dim=1))
    table = nn.Embedding(32, heads)
    with torch.no_grad():
        table.weight.copy_(torch.randn(32, heads, generator=generator) * 2)
    position_bias = RelativePositionBias(table, bidirectional=True, num_buckets=32, max_distance=50)
    sequences = PrefillSequences(starts, lengths, [0, 0, 0], lengths, kv_start=starts)
    bias = relative_bias_table(position_bias, sequences.longest)
    out = torch.empty(total, heads, head_dim, dtype=torch.bfloat16)
    sequences.attend(q, k, v, out, 1.0, causal=False, bias=bias)
    for start, n in zip(starts, lengths, strict=True):
        rows = slice(start, start + n)
        positions = torch.arange(n)
        expected = exact(
            q[rows], k[rows], v[rows], bias=position_bias(positions, positions), scale=1.0
        )
        torch.testing.assert_close(out[rows].double(), expected, **TOLERANCE)


def test_bad_inputs_are_refused() -> None:
    q = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    cache = torch.zeros(16, 2, 64, dtype=torch.bfloat16)
    tables = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="queries must lie in its keys"):
        PrefillSequences([0], [4], [2], [5], block_tables=tables, block_size=4)
    with pytest.raises(ValueError, match="block table is shorter"):
        PrefillSequences([0], [4], [6], [10], block_tables=tables, block_size=4)
    with pytest.raises(ValueError, match="one start, length and position per sequence"):
        PrefillSequences([0, 4], [4], [0], [4], kv_start=[0])
    with pytest.raises(ValueError, match="start at 0 or later"):
        PrefillSequences([-1], [4], [0], [4], kv_start=[0])
    with pytest.raises(TypeError, match="int64"):
        PrefillSequences([0], [4], [0], [4], block_tables=tables.int(), block_size=4)
    beyond = PrefillSequences([0], [4], [0], [4], block_tables=tables + 4, block_size=4)
    with pytest.raises(ValueError, match="past the cache"):  # blocks 4.. of a 4-block cache
        beyond.attend(q, cache, cache, torch.empty_like(q), 1.0, causal=True)
    sequences = PrefillSequences([0], [4], [0], [4], block_tables=tables, block_size=4)
    with pytest.raises(TypeError, match="bf16"):
        sequences.attend(q.float(), cache, cache, torch.empty_like(q), 1.0, causal=True)
    with pytest.raises(ValueError, match="disagree"):
        sequences.attend(q[:2], cache, cache, torch.empty_like(q[:2]), 1.0, causal=True)
    packed = PrefillSequences([0], [4], [0], [4], kv_start=[0])
    short = (torch.zeros(2, 8), 3)  # two heads, too few distances
    with pytest.raises(ValueError, match="bias table"):
        packed.attend(q, q, q, torch.empty_like(q), 1.0, causal=False, bias=short)
    assert not flash_prefill_available(48)  # a head size the kernel is not built for


def test_switched_off_it_is_unavailable(monkeypatch) -> None:
    """Then the sdpa backend keeps SDPA for prefills."""
    monkeypatch.setenv(flash_prefill.ENV_SWITCH, "0")
    flash_prefill._library.cache_clear()
    try:
        assert not flash_prefill_available(64)
    finally:
        monkeypatch.undo()
        flash_prefill._library.cache_clear()
    assert flash_prefill_available(64)
