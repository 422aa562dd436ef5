"""oneDNN-packed bf16 weights (``tgi_core.model.layers.cpu_gemm``) compute what
``F.linear`` computes, and the layers use them exactly where packing applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgi_core.model.layers import cpu_gemm
from tgi_core.model.layers.embedding import ParallelLMHead
from tgi_core.model.layers.linear import ColumnParallelLinear


@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (3, 5, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_equals_f_linear(shape: tuple[int, ...], with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 96, generator=generator).bfloat16()
    bias = torch.randn(48, generator=generator).bfloat16() if with_bias else None
    x = torch.randn(*shape, generator=generator).bfloat16()
    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    got = cpu_gemm.packed_linear(x, cpu_gemm.pack(weight), bias)
    assert got.dtype == torch.bfloat16 and got.shape == (*shape[:-1], 48)
    # both accumulate in float32 and round the result to bf16 once
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=2e-2, rtol=1e-2)
    # float32 activations go through bf16 and come back float32
    assert cpu_gemm.packed_linear(x.float(), cpu_gemm.pack(weight), bias).dtype == torch.float32


def test_what_is_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_gemm, "_available", lambda: True)
    assert cpu_gemm.can_pack(torch.zeros(4, 4, dtype=torch.bfloat16))
    assert not cpu_gemm.can_pack(torch.zeros(4, 4))  # float32 stays plain
    assert not cpu_gemm.can_pack(torch.zeros(4, dtype=torch.bfloat16))
    monkeypatch.setenv(cpu_gemm.ENV_SWITCH, "0")
    assert not cpu_gemm.can_pack(torch.zeros(4, 4, dtype=torch.bfloat16))
    monkeypatch.delenv(cpu_gemm.ENV_SWITCH)
    monkeypatch.setattr(cpu_gemm, "_available", lambda: False)
    assert not cpu_gemm.can_pack(torch.zeros(4, 4, dtype=torch.bfloat16))


@pytest.mark.parametrize("available", [True, False])
def test_layers_pack_after_loading_and_compute_the_same(
    available: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_gemm, "_available", lambda: available)
    generator = torch.Generator().manual_seed(1)
    layer = ColumnParallelLinear(96, 48, bias=True, dtype=torch.bfloat16)
    layer.weight.data.copy_(torch.randn(48, 96, generator=generator))
    assert layer.bias is not None
    layer.bias.data.copy_(torch.randn(48, generator=generator))
    x = torch.randn(5, 96, generator=generator).bfloat16()
    before = layer(x)
    layer.method.process_weights_after_loading(layer)
    assert layer.weight.is_mkldnn == available
    torch.testing.assert_close(layer(x), before, atol=2e-2, rtol=1e-2)

    head = ParallelLMHead(40, 96, dtype=torch.bfloat16)
    head.weight.data.copy_(torch.randn(40, 96, generator=generator))
    plain = F.linear(x, head.weight)
    torch.testing.assert_close(head(x), plain, atol=2e-2, rtol=1e-2)
    assert (head._packed is not None) == available  # a packed copy; the weight stays plain
    assert not head.weight.is_mkldnn
