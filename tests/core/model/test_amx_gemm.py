"""The packed-weight GEMM kernel (``tgi_core.model.layers.amx_gemm``: AMX, or AVX-512
BF16 where there is no AMX) against float32 matmuls.

Shapes cover every path through the AMX kernel (and the vector kernel's register blocks
of 1-6 rows, int8 widened in registers up to 8 rows and in memory above): below one tile
of rows (the tiles shrink), one tile, a partial last tile above 16 rows (a zero-padded
copy), an odd number of row tiles, several 512-row super-blocks; output sizes that are
not a multiple of 32 (padded weights, masked stores) or are smaller than one tile.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch
import torch.nn.functional as F

from tgi_core import kernels
from tgi_core.model.layers import amx_gemm

needs_amx = pytest.mark.skipif(
    not amx_gemm.available(), reason="no AMX or AVX-512 BF16 kernel on this CPU"
)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


def random_weight(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    return torch.randn(rows, cols).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("rows,cols", [(1, 32), (40, 96), (64, 64), (1, 576)])
def test_pack_keeps_every_weight_and_pads_with_zeros(
    rows: int, cols: int, dtype: torch.dtype
) -> None:
    """int8 is stored in the kernel's widening order, which unpack undoes."""
    weight = random_weight(rows, cols, dtype)
    packed = amx_gemm.pack(weight)
    assert amx_gemm.is_packed(packed) and not amx_gemm.is_packed(weight)
    padded_rows = -(-rows // 32) * 32
    assert packed.shape == (padded_rows // 16, cols // 32, 16, 16, 2)
    assert torch.equal(amx_gemm.unpack(packed, rows), weight)
    assert not amx_gemm.unpack(packed, padded_rows)[rows:].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_gather_rows_reads_rows_out_of_the_packing(dtype: torch.dtype) -> None:
    weight = random_weight(70, 96, dtype)
    ids = torch.tensor([[0, 69, 17], [16, 5, 5]])
    assert torch.equal(amx_gemm.gather_rows(amx_gemm.pack(weight), ids), weight[ids])


def test_what_the_kernel_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amx_gemm, "available", lambda: True)
    assert amx_gemm.can_pack(torch.zeros(3, 64, dtype=torch.bfloat16))
    assert not amx_gemm.can_pack(torch.zeros(3, 48, dtype=torch.bfloat16))  # K % 32
    assert not amx_gemm.can_pack(torch.zeros(3, 64))  # float32
    assert not amx_gemm.can_pack(torch.zeros(64, dtype=torch.bfloat16))
    monkeypatch.setattr(amx_gemm, "available", lambda: False)
    assert not amx_gemm.can_pack(torch.zeros(3, 64, dtype=torch.bfloat16))


@needs_amx
@pytest.mark.parametrize("m", [1, 5, 16, 17, 33, 48, 70, 1100])
@pytest.mark.parametrize("n,k", [(1, 32), (40, 96), (96, 64), (200, 576)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_a_float_matmul(m: int, n: int, k: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(m * 1000 + n + k)
    weight = torch.randn(n, k, generator=generator).bfloat16()
    bias = torch.randn(n, generator=generator).bfloat16() if with_bias else None
    x = torch.randn(m, k, generator=generator).bfloat16()
    got = amx_gemm.linear(x, amx_gemm.pack(weight), bias, n)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    expected = reference(x, weight, bias)
    # float32 accumulation, one rounding to bf16: within bf16's half ulp plus a little
    scale = expected.abs() + expected.abs().mean()
    assert ((got.double() - expected).abs() / scale).max().item() < 2**-8


@needs_amx
@pytest.mark.parametrize("m", [1, 2, 3, 16, 17, 70, 300])
@pytest.mark.parametrize("n,k", [(40, 96), (200, 576), (600, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_kernel_matches_a_float_matmul(m: int, n: int, k: int, with_bias: bool) -> None:
    """int8 weights widened to bf16 in the kernel (exact), scaled per output at the end;
    from 9 row groups on (300 rows), each block is widened once for all of them."""
    generator = torch.Generator().manual_seed(m * 1000 + n + k)
    q = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    scales = torch.rand(n, generator=generator).bfloat16()
    bias = torch.randn(n, generator=generator).bfloat16() if with_bias else None
    x = torch.randn(m, k, generator=generator).bfloat16()
    got = amx_gemm.linear_int8(x, amx_gemm.pack(q), scales, bias, n)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    expected = reference(x, q.double() * scales.double()[:, None], bias)
    scale = expected.abs() + expected.abs().mean()
    assert ((got.double() - expected).abs() / scale).max().item() < 2**-8
    # one row alone gets the same bits
    assert torch.equal(amx_gemm.linear_int8(x[-1:], amx_gemm.pack(q), scales, bias, n), got[-1:])


@needs_amx
def test_each_rows_result_is_independent_of_the_batch() -> None:
    """A sequence gets the same bits alone or batched with others (every path above)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(72, 160, generator=generator).bfloat16()
    bias = torch.randn(72, generator=generator).bfloat16()
    packed = amx_gemm.pack(weight)
    x = torch.randn(600, 160, generator=generator).bfloat16()
    batched = amx_gemm.linear(x, packed, bias, 72)
    for rows in ([599], [3, 17, 250], list(range(20, 53))):
        assert torch.equal(amx_gemm.linear(x[rows], packed, bias, 72), batched[rows])


@needs_amx
def test_leading_dimensions_and_strided_input() -> None:
    weight = torch.randn(64, 96).bfloat16()
    packed = amx_gemm.pack(weight)
    x = torch.randn(3, 5, 192).bfloat16()[..., ::2]  # not contiguous
    got = amx_gemm.linear(x, packed, None, 64)
    assert got.shape == (3, 5, 64)
    torch.testing.assert_close(got, amx_gemm.linear(x.contiguous(), packed, None, 64))
    assert amx_gemm.linear(x[:0], packed, None, 64).shape == (0, 5, 64)


@needs_amx
def test_kernel_and_onednn_take_turns_with_the_tile_state() -> None:
    """oneDNN's own AMX matmuls configure the tiles differently; alternating with them
    in the same threads changes neither's results."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(256, 512, generator=generator).bfloat16()
    x = torch.randn(64, 512, generator=generator).bfloat16()
    packed = amx_gemm.pack(weight)
    ours, theirs = amx_gemm.linear(x, packed, None, 256), F.linear(x, weight)
    for _ in range(3):
        assert torch.equal(F.linear(x, weight), theirs)
        assert torch.equal(amx_gemm.linear(x, packed, None, 64 * 4), ours)


@needs_amx
def test_bad_inputs_are_refused() -> None:
    packed = amx_gemm.pack(torch.randn(32, 64).bfloat16())
    with pytest.raises(TypeError):
        amx_gemm.linear(torch.randn(2, 64), packed, None, 32)
    with pytest.raises(ValueError):
        amx_gemm.linear(torch.randn(2, 96).bfloat16(), packed, None, 32)


def test_a_build_without_amx_says_so() -> None:
    """The portable build (no AMX instructions) compiles and reports itself unusable."""
    if platform.machine() != "x86_64":
        pytest.skip("the portable build targets x86-64")
    try:
        library = amx_gemm.load_kernel("x86-64-v3")
    except RuntimeError as exc:  # no compiler: nothing to check
        pytest.skip(str(exc))
    assert library.tgi_amx_available() == 0
    assert library.tgi_amx_init() != 0


def test_a_vector_build_without_avx512_says_so() -> None:
    if platform.machine() != "x86_64":
        pytest.skip("the portable build targets x86-64")
    try:
        library = amx_gemm.load_vector_kernel("x86-64-v3")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    assert library.tgi_vec_gemm_available() == 0


def test_the_kernel_follows_the_cpu() -> None:
    """AMX where the CPU has it, else AVX-512 BF16 with VBMI, else none."""
    flags = kernels.cpu_flags()
    if not amx_gemm.available():
        assert not {"avx512_bf16", "avx512vbmi"} <= flags or os.environ.get(amx_gemm.ENV_SWITCH)
    elif {"amx_bf16", "amx_tile"} <= flags:
        assert amx_gemm.kind() == "amx"
    else:
        assert amx_gemm.kind() == "avx512_bf16"


needs_vector_isa = pytest.mark.skipif(
    platform.machine() != "x86_64" or not {"avx512_bf16", "avx512vbmi"} <= kernels.cpu_flags(),
    reason="no AVX-512 BF16 and VBMI on this CPU",
)


@needs_vector_isa
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 40])
def test_the_vector_kernel_matches_on_any_avx512_bf16_cpu(m: int, dtype: torch.dtype) -> None:
    """The AVX-512 library called directly (on an AMX CPU too, where ``linear`` takes the
    AMX one): float32 accumulation, one rounding; each row as alone in a call."""
    library = amx_gemm.load_vector_kernel()
    generator = torch.Generator().manual_seed(m)
    n, k = 200, 576
    weight = random_weight(n, k, dtype)
    scales = torch.rand(n, generator=generator).add_(0.5).bfloat16()
    bias = torch.randn(n, generator=generator).bfloat16()
    x = torch.randn(m, k, generator=generator).bfloat16()
    packed = amx_gemm.pack(weight)

    def run(rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
        if dtype == torch.int8:
            vectors = (scales.data_ptr(), bias.data_ptr())
            library.tgi_vec_linear_int8(
                rows.data_ptr(), rows.shape[0], k, packed.data_ptr(), n, *vectors, out.data_ptr()
            )
        else:
            library.tgi_vec_linear_bf16(
                rows.data_ptr(),
                rows.shape[0],
                k,
                packed.data_ptr(),
                n,
                bias.data_ptr(),
                out.data_ptr(),
            )
        return out

    got = run(x)
    dense = weight.double() * (scales.double()[:, None] if dtype == torch.int8 else 1)
    expected = F.linear(x.double(), dense, bias.double())
    scale = expected.abs() + expected.abs().mean()
    assert ((got.double() - expected).abs() / scale).max().item() < 2**-8
    assert torch.equal(torch.cat([run(x[i : i + 1]) for i in range(m)]), got)


def test_switched_off_it_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(amx_gemm.ENV_SWITCH, "0")
    amx_gemm._library.cache_clear()
    try:
        assert not amx_gemm.available()
    finally:
        monkeypatch.undo()
        amx_gemm._library.cache_clear()
