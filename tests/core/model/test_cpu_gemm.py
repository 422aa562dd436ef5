"""Packed bf16 weights (``tgi_core.model.layers.cpu_gemm``: the AMX kernel's layout or
oneDNN's) compute what ``F.linear`` computes, and the layers use them exactly where
packing applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgi_core.model.layers import amx_gemm, cpu_gemm
from tgi_core.model.layers.embedding import ParallelLMHead
from tgi_core.model.layers.linear import ColumnParallelLinear

PACKINGS = ["amx", "onednn"]


def use_packing(packing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``cpu_gemm`` pack for ``packing`` (skipping where this CPU cannot run it)."""
    if packing == "amx" and not amx_gemm.available():
        pytest.skip("no AMX or AVX-512 BF16 kernel on this CPU")
    if packing == "onednn":
        if not cpu_gemm._onednn_available():
            pytest.skip("no oneDNN bf16 on this CPU")
        monkeypatch.setattr(amx_gemm, "available", lambda: False)


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (3, 5, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_equals_f_linear(
    packing: str, shape: tuple[int, ...], with_bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_packing(packing, monkeypatch)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 96, generator=generator).bfloat16()
    bias = torch.randn(48, generator=generator).bfloat16() if with_bias else None
    x = torch.randn(*shape, generator=generator).bfloat16()
    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    packed = cpu_gemm.pack(weight)
    assert amx_gemm.is_packed(packed) == (packing == "amx")
    got = cpu_gemm.packed_linear(x, packed, bias, 48)
    assert got.dtype == torch.bfloat16 and got.shape == (*shape[:-1], 48)
    # both accumulate in float32 and round the result to bf16 once
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=2e-2, rtol=1e-2)
    # float32 activations go through bf16 and come back float32
    assert cpu_gemm.packed_linear(x.float(), packed, bias, 48).dtype == torch.float32


def test_what_is_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amx_gemm, "available", lambda: False)
    monkeypatch.setattr(cpu_gemm, "_onednn_available", lambda: True)
    assert cpu_gemm.can_pack(torch.zeros(4, 4, dtype=torch.bfloat16))
    assert not cpu_gemm.can_pack(torch.zeros(4, 4))  # float32 stays plain
    assert not cpu_gemm.can_pack(torch.zeros(4, dtype=torch.bfloat16))
    monkeypatch.setenv(cpu_gemm.ENV_SWITCH, "0")
    assert not cpu_gemm.can_pack(torch.zeros(4, 4, dtype=torch.bfloat16))
    monkeypatch.delenv(cpu_gemm.ENV_SWITCH)
    monkeypatch.setattr(cpu_gemm, "_onednn_available", lambda: False)
    assert not cpu_gemm.can_pack(torch.zeros(4, 4, dtype=torch.bfloat16))
    # the AMX kernel takes input sizes in steps of 32; oneDNN takes the others
    monkeypatch.setattr(amx_gemm, "available", lambda: True)
    assert cpu_gemm.can_pack(torch.zeros(4, 64, dtype=torch.bfloat16))
    assert not cpu_gemm.can_pack(torch.zeros(4, 48, dtype=torch.bfloat16))


@pytest.mark.parametrize("packing", [*PACKINGS, "none"])
def test_layers_pack_after_loading_and_compute_the_same(
    packing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if packing == "none":
        monkeypatch.setenv(cpu_gemm.ENV_SWITCH, "0")
    else:
        use_packing(packing, monkeypatch)
    available = packing != "none"
    generator = torch.Generator().manual_seed(1)
    layer = ColumnParallelLinear(96, 48, bias=True, dtype=torch.bfloat16)
    layer.weight.data.copy_(torch.randn(48, 96, generator=generator))
    assert layer.bias is not None
    layer.bias.data.copy_(torch.randn(48, generator=generator))
    x = torch.randn(5, 96, generator=generator).bfloat16()
    before = layer(x)
    layer.method.process_weights_after_loading(layer)
    assert layer.weight_packed == available
    assert layer.weight.is_mkldnn == (packing == "onednn")
    assert amx_gemm.is_packed(layer.weight) == (packing == "amx")
    torch.testing.assert_close(layer(x), before, atol=2e-2, rtol=1e-2)

    head = ParallelLMHead(40, 96, dtype=torch.bfloat16)
    head.weight.data.copy_(torch.randn(40, 96, generator=generator))
    plain = F.linear(x, head.weight)
    torch.testing.assert_close(head(x), plain, atol=2e-2, rtol=1e-2)
    assert (head._packed is not None) == available  # a packed copy; the weight stays plain
    assert not head.weight.is_mkldnn
