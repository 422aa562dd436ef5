"""The C++ kernels of ``tgi::amx_linear`` / ``tgi::amx_linear_int8`` (``kernels/gemm_ops.cpp``):
what a compiled graph's GEMM calls dispatch to, bit for bit the Python path
(``amx_gemm.linear`` / ``linear_int8``) on the same packed-weight kernel."""

from __future__ import annotations

import pytest
import torch

from tgi_core.model.layers import amx_gemm, opaque  # noqa: F401  (opaque defines the ops)

pytestmark = pytest.mark.skipif(
    not amx_gemm.available(), reason="no AMX or AVX-512 BF16 kernel on this CPU"
)


def bound() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("tgi::amx_linear_int8", "CPU")


def test_the_ops_have_cpu_kernels_once_the_gemm_kernel_is_loaded() -> None:
    assert bound()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tgi::amx_linear", "CPU")


@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 3, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_bf16_op_equals_the_python_path(shape: tuple[int, ...], with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(len(shape) * 10 + shape[0])
    weight = torch.randn(40, 96, generator=generator).bfloat16()
    bias = torch.randn(40, generator=generator) if with_bias else None  # float32: converted
    x = torch.randn(*shape, generator=generator).bfloat16()
    packed = amx_gemm.pack(weight)
    got = torch.ops.tgi.amx_linear(x, packed, bias, 40)
    assert got.shape == (*shape[:-1], 40) and got.dtype == torch.bfloat16
    assert torch.equal(got, amx_gemm.linear(x, packed, bias, 40))


@pytest.mark.parametrize("rows", [1, 2, 9])
def test_the_int8_op_equals_the_python_path(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    q = torch.randint(-127, 128, (600, 64), generator=generator, dtype=torch.int8)
    scales = torch.rand(600, generator=generator)  # float32: converted
    bias = torch.randn(600, generator=generator).bfloat16()
    x = torch.randn(rows, 64, generator=generator).bfloat16()
    packed = amx_gemm.pack(q)
    got = torch.ops.tgi.amx_linear_int8(x, packed, scales, bias, 600)
    assert torch.equal(got, amx_gemm.linear_int8(x, packed, scales, bias, 600))
    # a strided view of the rows: made contiguous, same result
    wide = torch.randn(rows, 128, generator=generator).bfloat16()
    view = wide[:, ::2]
    assert torch.equal(
        torch.ops.tgi.amx_linear_int8(view, packed, scales, None, 600),
        amx_gemm.linear_int8(view.contiguous(), packed, scales, None, 600),
    )


def test_no_rows_give_an_empty_result() -> None:
    packed = amx_gemm.pack(torch.randn(40, 64).bfloat16())
    out = torch.ops.tgi.amx_linear(torch.empty(0, 64, dtype=torch.bfloat16), packed, None, 40)
    assert out.shape == (0, 40)


def test_bad_inputs_are_refused() -> None:
    packed = amx_gemm.pack(torch.randn(40, 64).bfloat16())
    with pytest.raises(RuntimeError, match="not bfloat16"):
        torch.ops.tgi.amx_linear(torch.randn(2, 64), packed, None, 40)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.tgi.amx_linear(torch.randn(2, 32).bfloat16(), packed, None, 40)
    with pytest.raises(RuntimeError, match="not int8"):
        torch.ops.tgi.amx_linear_int8(
            torch.randn(2, 64).bfloat16(), packed, torch.ones(40), None, 40
        )
    with pytest.raises(RuntimeError, match="out_features"):
        torch.ops.tgi.amx_linear(torch.randn(2, 64).bfloat16(), packed, None, 65)
    with pytest.raises(RuntimeError, match="bias or scales vector of 39 values"):
        torch.ops.tgi.amx_linear(torch.randn(2, 64).bfloat16(), packed, torch.zeros(39), 40)
    int8 = amx_gemm.pack(torch.randint(-127, 128, (40, 64), dtype=torch.int8))
    with pytest.raises(RuntimeError, match="bias or scales vector of 20 values"):
        torch.ops.tgi.amx_linear_int8(torch.randn(2, 64).bfloat16(), int8, torch.ones(20), None, 40)
    with pytest.raises(ValueError, match="shorter than 40"):  # the Python path too
        amx_gemm.linear(torch.randn(2, 64).bfloat16(), packed, torch.zeros(39), 40)
    with pytest.raises(RuntimeError, match="not packed"):
        reshaped = packed.view(4, 2, 32, 8, 2)
        torch.ops.tgi.amx_linear(torch.randn(2, 64).bfloat16(), reshaped, None, 40)


def test_switched_off_the_python_implementations_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(amx_gemm.OPS_SWITCH, "0")
    kernel = amx_gemm._library()
    assert kernel is not None
    assert not amx_gemm.bind_native_ops(kernel)
