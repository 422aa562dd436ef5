"""The CPU paged decode-attention kernel against attention computed plainly in float64.

Random block tables (blocks scattered through the cache), lengths from one position to
several blocks, grouped-query layouts from MHA to 7 query heads per key/value head, and
head sizes with a specialized path (64, 128) and without one (80).
"""

from __future__ import annotations

import os

import pytest
import torch

from tgi_core.attention import native
from tgi_core.attention.native import paged_decode, paged_decode_available

pytestmark = pytest.mark.skipif(
    not paged_decode_available(), reason="no C++ compiler to build the kernel"
)


def reference(q, keys, values, tables, lengths, block_size, scale, bias=None) -> torch.Tensor:
    heads, kv_heads = q.shape[1], keys.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for s, length in enumerate(lengths.tolist()):
        positions = torch.arange(length)
        slots = tables[s, positions // block_size] * block_size + positions % block_size
        k = keys[slots].double().repeat_interleave(heads // kv_heads, dim=1)  # [L, H, D]
        v = values[slots].double().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[s].double(), k) * scale
        if bias is not None:
            scores = scores + bias[s, :, :length].double()
        weights = torch.softmax(scores, dim=-1)
        out[s] = torch.einsum("hl,lhd->hd", weights, v)
    return out


def scenario(seed, *, heads, kv_heads, head_dim, block_size, lengths, dtype):
    generator = torch.Generator().manual_seed(seed)
    blocks_each = max(-(-n // block_size) for n in lengths)
    num_blocks = len(lengths) * blocks_each + 5
    order = torch.randperm(num_blocks, generator=generator)
    tables = order[: len(lengths) * blocks_each].view(len(lengths), blocks_each).contiguous()
    shape = (num_blocks * block_size, kv_heads, head_dim)
    keys = torch.randn(shape, generator=generator).to(dtype)
    values = torch.randn(shape, generator=generator).to(dtype)
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype)
    return q, keys, values, tables, torch.tensor(lengths, dtype=torch.int64)


CASES = {
    "smollm-like (3 per group, 64)": dict(heads=9, kv_heads=3, head_dim=64, block_size=16),
    "qwen-like (7 per group, 64)": dict(heads=14, kv_heads=2, head_dim=64, block_size=16),
    "mha, 128": dict(heads=4, kv_heads=4, head_dim=128, block_size=4),
    "llama3-like (4 per group, 128, items of 16 heads)": dict(
        heads=32, kv_heads=8, head_dim=128, block_size=16
    ),
    "smollm-like in blocks of 32": dict(heads=9, kv_heads=3, head_dim=64, block_size=32),
    "mqa, 80 (no specialized path)": dict(heads=6, kv_heads=1, head_dim=80, block_size=3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("lengths", [[1, 17, 40, 5, 33], [29]])
def test_kernel_matches_plain_attention(case, dtype, lengths) -> None:
    """float32: 1e-5 (float32 sums in another order); bfloat16: the output's rounding
    (2^-8 relative, on values of magnitude ~1) plus the score products' (exact in
    float32 from bf16 inputs), so 1.5e-2."""
    layout = CASES[case]
    q, keys, values, tables, lengths_t = scenario(0, lengths=lengths, dtype=dtype, **layout)
    scale = layout["head_dim"] ** -0.5
    got = paged_decode(q, keys, values, tables, lengths_t, layout["block_size"], scale)
    expected = reference(q, keys, values, tables, lengths_t, layout["block_size"], scale)
    assert got.dtype == dtype and got.shape == q.shape
    tolerance = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert (got.double() - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "case", ["mha, 128", "smollm-like (3 per group, 64)", "mqa, 80 (no specialized path)"]
)
def test_an_additive_bias_joins_the_scores(case, dtype) -> None:
    """T5's relative position bias: float32 [S, H, L] added to each query head's scaled
    scores (wider than the longest sequence: the padding is never read); on an AMX
    CPU, a step with a bias takes the vector path. Same tolerances as above."""
    layout = CASES[case]
    lengths = [1, 17, 40, 5]
    q, keys, values, tables, lengths_t = scenario(3, lengths=lengths, dtype=dtype, **layout)
    bias = torch.randn(
        len(lengths), layout["heads"], 48, generator=torch.Generator().manual_seed(9)
    )
    bias[:, :, 40:] = float("nan")  # past every sequence: must not be read
    scale = layout["head_dim"] ** -0.5
    got = paged_decode(q, keys, values, tables, lengths_t, layout["block_size"], scale, bias=bias)
    expected = reference(q, keys, values, tables, lengths_t, layout["block_size"], scale, bias)
    tolerance = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert (got.double() - expected).abs().max().item() <= tolerance
    with pytest.raises(ValueError):
        paged_decode(q, keys, values, tables, lengths_t, layout["block_size"], scale,
                     bias=bias[:, :, :30].contiguous())  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_portable_build_matches_plain_attention(dtype) -> None:
    """Built for a CPU without AVX-512 (x86-64-v3), the kernel takes its portable loops
    (float dot products, no prefetch, no register accumulators): same tolerances."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("the portable build targets x86-64")
    library = native.load_kernel("x86-64-v3")
    layout = CASES["smollm-like (3 per group, 64)"]
    q, keys, values, tables, lengths = scenario(
        3, lengths=[1, 17, 40, 5, 33], dtype=dtype, **layout
    )
    got = paged_decode(q, keys, values, tables, lengths, 16, 0.125, library=library)
    expected = reference(q, keys, values, tables, lengths, 16, 0.125)
    tolerance = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert (got.double() - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize("block_size", [4, 16])
def test_kernel_uses_only_each_sequences_own_positions(block_size) -> None:
    """Garbage (NaN) in every slot a sequence does not own never reaches its output, the
    rest of a last block included (the AMX path multiplies all 16 rows of a run)."""
    q, keys, values, tables, lengths = scenario(
        1,
        heads=9,
        kv_heads=3,
        head_dim=64,
        block_size=block_size,
        lengths=[6, 3, 21, 1, 16],
        dtype=torch.bfloat16,
    )
    owned = torch.zeros(keys.shape[0], dtype=torch.bool)
    for s, length in enumerate(lengths.tolist()):
        positions = torch.arange(length)
        owned[tables[s, positions // block_size] * block_size + positions % block_size] = True
    keys[~owned], values[~owned] = float("nan"), float("nan")
    out = paged_decode(q, keys, values, tables, lengths, block_size, 0.125)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", ["smollm-like (3 per group, 64)", "qwen-like (7 per group, 64)"])
@pytest.mark.parametrize("lengths", [[1, 17, 40, 5, 33, 190], [29]])
def test_scores_on_amx_tiles_agree_with_the_vector_path(case, lengths) -> None:
    """Where the build has AMX and the OS grants it, the scores run as tile products;
    with the tiles switched off the same kernel takes AVX-512 dot products. Both sum
    exact bf16 products in float32, in another order: they agree to float32 rounding
    before the output's one bf16 rounding (at most one bf16 step apart)."""
    library = native.load_kernel()
    if not native.use_tiles(library, True):
        pytest.skip("no AMX here (the vector path is the only one)")
    layout = CASES[case]
    q, keys, values, tables, lengths_t = scenario(
        5, lengths=lengths, dtype=torch.bfloat16, **layout
    )
    args = (q, keys, values, tables, lengths_t, layout["block_size"], 0.125)
    tiles = paged_decode(*args, library=library)
    try:  # the library is the process's one: the switch is put back for the other tests
        native.use_tiles(library, False)
        vectors = paged_decode(*args, library=library)
    finally:
        native.use_tiles(library, os.environ.get(native.TILES_SWITCH, "1") != "0")
    assert (tiles.float() - vectors.float()).abs().max().item() <= 2**-7
    expected = reference(*args)
    assert (tiles.double() - expected).abs().max().item() <= 1.5e-2


def test_kernel_refuses_mismatched_dtypes() -> None:
    q, keys, values, tables, lengths = scenario(
        2, heads=2, kv_heads=1, head_dim=64, block_size=4, lengths=[3], dtype=torch.float32
    )
    with pytest.raises(TypeError):
        paged_decode(q.bfloat16(), keys, values, tables, lengths, 4, 0.125)


@pytest.mark.parametrize("setting", ["no compiler", "switched off"])
def test_without_the_kernel_it_is_unavailable(monkeypatch, tmp_path, setting) -> None:
    """Then the sdpa backend keeps its gather + SDPA path (what ALiBi layers use)."""
    if setting == "no compiler":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("TGI_KERNEL_CACHE", str(tmp_path / "cache"))
    else:
        monkeypatch.setenv(native.ENV_SWITCH, "0")
    native._library.cache_clear()
    try:
        assert not paged_decode_available()
    finally:
        monkeypatch.undo()
        native._library.cache_clear()
    assert paged_decode_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sequences", [2, 6])  # per key/value head items, whole sequences
def test_kernel_writes_the_new_tokens_then_attends(dtype, sequences) -> None:
    """With ``new``, the step's keys and values (strided rows of a fused projection, as
    the models produce them) land at their slots, each sequence's last position, and the
    result is the one of a cache write followed by the kernel, to the bit."""
    lengths = [3 + 7 * i for i in range(sequences)]
    q, keys, values, tables, lengths_t = scenario(
        4, heads=9, kv_heads=3, head_dim=64, block_size=4, lengths=lengths, dtype=dtype
    )
    fused = torch.randn(sequences, 15, 64).to(dtype)  # [q | k | v] heads of a QKV layer
    k, v = fused[:, 9:12], fused[:, 12:15]
    last = lengths_t - 1
    slots = tables[torch.arange(sequences), last // 4] * 4 + last % 4
    written_keys, written_values = keys.clone(), values.clone()
    written_keys[slots], written_values[slots] = k, v
    expected = paged_decode(q, written_keys, written_values, tables, lengths_t, 4, 0.125)

    got = paged_decode(q, keys, values, tables, lengths_t, 4, 0.125, new=(k, v, slots))
    assert torch.equal(keys, written_keys) and torch.equal(values, written_values)
    assert torch.equal(got, expected)


def test_a_new_token_outside_the_cache_is_refused_before_anything_is_written() -> None:
    q, keys, values, tables, lengths = scenario(
        5, heads=2, kv_heads=1, head_dim=64, block_size=4, lengths=[3, 2], dtype=torch.bfloat16
    )
    k = v = torch.ones(2, 1, 64, dtype=torch.bfloat16)
    before = keys.clone()
    for bad in (keys.shape[0], -1):
        slots = torch.tensor([0, bad])
        with pytest.raises(IndexError):
            paged_decode(q, keys, values, tables, lengths, 4, 0.125, new=(k, v, slots))
        assert torch.equal(keys, before)
