"""The fused C++ layer ops of eager steps (``kernels/fused_ops.cpp``, ``layers/fused.py``):
RMSNorm, RMSNorm after the residual add, and the rotary rotation against the PyTorch ops
they replace."""

from __future__ import annotations

import pytest
import torch

from tgi_core.model.layers import fused
from tgi_core.model.layers.norm import RMSNorm
from tgi_core.model.layers.rotary import apply_rotary

pytestmark = pytest.mark.skipif(not fused.available(), reason="the fused ops cannot be built")


@pytest.fixture
def pytorch_path(monkeypatch: pytest.MonkeyPatch):
    """Run ``fn`` with the fused ops switched off: the PyTorch ops' result."""

    def run(fn):
        with monkeypatch.context() as patch:
            patch.setattr(fused, "applies", lambda *args: False)
            return fn()

    return run


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their dtype lie between ``a`` and ``b``."""
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[a.dtype]
    ia, ib = a.view(bits).long(), b.view(bits).long()
    # map the sign-magnitude bit patterns onto a monotonic integer line
    top = 1 << (8 * a.element_size() - 1)
    ia = torch.where(ia < 0, -top - ia, ia)
    ib = torch.where(ib < 0, -top - ib, ib)
    return (ia - ib).abs()


def norm(dtype: torch.dtype, size: int = 576) -> RMSNorm:
    layer = RMSNorm(size, eps=1e-5, dtype=dtype)
    layer.weight.data.copy_(torch.randn(size, generator=torch.Generator().manual_seed(1)))
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_rms_norm_is_the_pytorch_norm_within_the_sum_order(
    dtype: torch.dtype, rows: int, pytorch_path
) -> None:
    layer = norm(dtype)
    x = (torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)) * 3).to(dtype)
    got, want = layer(x), pytorch_path(lambda: layer(x))
    assert got.dtype == dtype and got.shape == x.shape
    # the sum of squares in another order: float32 ulps (a row's 1 / rms moves them all);
    # after a bf16 rounding, at most one, and rarely
    if dtype == torch.bfloat16:
        assert ulps_apart(got, want).max() <= 1
        assert (got == want).float().mean() > 0.95
    else:
        assert ulps_apart(got, want).max() <= 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_returns_the_exact_sum(dtype: torch.dtype, pytorch_path) -> None:
    layer = norm(dtype)
    generator = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(5, 576, generator=generator).to(dtype) for _ in range(2))
    normed, summed = layer.add_forward(x, residual)
    want_normed, want_summed = pytorch_path(lambda: layer.add_forward(x, residual))
    assert torch.equal(summed, want_summed)
    assert ulps_apart(normed, want_normed).max() <= (1 if dtype == torch.bfloat16 else 8)
    assert torch.equal(normed, layer(summed))


def test_a_rows_result_does_not_depend_on_the_other_rows() -> None:
    layer = norm(torch.bfloat16)
    x = torch.randn(33, 576, generator=torch.Generator().manual_seed(4)).bfloat16()
    together = layer(x)
    for row in (0, 17, 32):
        assert torch.equal(layer(x[row : row + 1]), together[row : row + 1])


def test_strided_and_batched_inputs(pytorch_path) -> None:
    layer = norm(torch.float32, 64)
    wide = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(5))
    strided = wide[..., ::2]  # last dimension strided: copied first
    view = wide[0, :, :64]  # rows with a stride of 128
    for x in (wide[..., :64], strided, view, wide[:, :, :64].transpose(0, 1)):
        got, want = layer(x), pytorch_path(lambda x=x: layer(x))
        assert got.shape == x.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    residual = torch.randn(5, 64)
    normed, summed = layer.add_forward(view, residual)
    assert torch.equal(summed, view + residual)
    torch.testing.assert_close(normed, layer(view + residual), rtol=0, atol=0)


def test_other_dtypes_keep_the_pytorch_path() -> None:
    layer = norm(torch.float16, 64)
    x = torch.randn(3, 64).half()
    assert not fused.applies(x, layer.weight)
    assert layer(x).dtype == torch.float16
    mixed = torch.randn(3, 64)  # float32 rows, float16 weight
    assert not fused.applies(mixed, layer.weight)


def test_bad_inputs_are_refused() -> None:
    weight = torch.ones(64)
    with pytest.raises(RuntimeError, match="the weight is BFloat16"):
        torch.ops.tgi.rms_norm(torch.randn(2, 64), weight.bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="not float32 or bfloat16"):
        torch.ops.tgi.rms_norm(torch.randn(2, 64).half(), weight.half(), 1e-5)
    with pytest.raises(RuntimeError, match="a weight of"):
        torch.ops.tgi.rms_norm(torch.randn(2, 64), torch.ones(32), 1e-5)
    with pytest.raises(RuntimeError, match="the residual"):
        torch.ops.tgi.add_rms_norm(torch.randn(2, 64), torch.randn(3, 64), weight, 1e-5)
    with pytest.raises(RuntimeError, match="tokens"):
        torch.ops.tgi.rotary(torch.randn(2, 3, 8), torch.ones(3, 8), torch.ones(3, 8))
    with pytest.raises(RuntimeError, match="rotary_dim"):
        torch.ops.tgi.rotary(torch.randn(2, 3, 8), torch.ones(2, 12), torch.ones(2, 12))


def angles(tokens: int, rotary_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.arange(tokens)[:, None] * (1e4 ** (-torch.arange(0, rotary_dim, 2) / rotary_dim))
    both = torch.cat((freqs, freqs), dim=-1)
    return both.cos().to(dtype), both.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [64, 32])  # whole heads, and partial rotary
def test_rotary_is_the_pytorch_rotation_bit_for_bit(
    dtype: torch.dtype, rotary_dim: int, pytorch_path
) -> None:
    generator = torch.Generator().manual_seed(rotary_dim)
    qkv = torch.randn(9, 15 * 64, generator=generator).to(dtype) * 4
    x = qkv[:, : 12 * 64].view(9, 12, 64)  # q and k of a fused projection: rows strided
    cos, sin = angles(9, rotary_dim, dtype)
    got = apply_rotary(x, cos, sin)
    want = pytorch_path(lambda: apply_rotary(x, cos, sin))
    assert got.shape == (9, 12, 64) and got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(qkv[:, : 12 * 64].view(9, 12, 64), x)  # the input is left alone


def test_rotary_of_a_non_contiguous_head_dimension(pytorch_path) -> None:
    x = torch.randn(4, 64, 6).transpose(1, 2)  # [4, 6, 64], the last dimension strided
    cos, sin = angles(4, 64, torch.float32)
    assert torch.equal(apply_rotary(x, cos, sin), pytorch_path(lambda: apply_rotary(x, cos, sin)))


def test_float32_cos_with_bf16_rows_keeps_the_pytorch_path() -> None:
    x = torch.randn(2, 3, 64).bfloat16()
    cos, sin = angles(2, 64, torch.float32)
    assert not fused.applies(x, cos)
    assert apply_rotary(x, cos, sin).dtype == torch.bfloat16


def test_compiled_code_keeps_the_pytorch_ops() -> None:
    """Inductor fuses the PyTorch ops itself; an opaque C++ op would only cut its graph."""
    seen: list[bool] = []

    @torch.compile(backend="eager", fullgraph=True)
    def probe(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        seen.append(fused.applies(x, weight))
        return x * weight

    probe(torch.randn(2, 8), torch.randn(8))
    assert seen == [False]
    assert fused.applies(torch.randn(2, 8), torch.randn(8))


def test_switched_off_the_pytorch_ops_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    fused.available.cache_clear()
    try:
        assert not fused.applies(torch.randn(2, 8), torch.randn(8))
    finally:
        fused.available.cache_clear()
    monkeypatch.delenv(fused.ENV_SWITCH)
    assert fused.available()
