"""bf16 matmuls on CPU with weights packed once, at load time: for this project's kernels
(``amx_gemm``: AMX, or AVX-512 BF16 without AMX) where they apply, for oneDNN otherwise.

``F.linear`` on a bf16 weight lets oneDNN reorder the weight into its blocked layout on
every call; packing it once (``torch.ops.mkldnn._reorder_linear_weight``) and running
``torch.ops.mkldnn._linear_pointwise`` skips that: the linear layers of a
SmolLM-135M-shaped model ran 1.3-1.6x faster from batch 1 to 32 on this project's
machines (docs/benchmarks.md), with the same accumulation in float32.

On a CPU with AMX, or with AVX-512 BF16 and VBMI (AMD Zen 4), weights whose input size
is a multiple of 32 are packed for ``amx_gemm`` instead, which reads them at close to
the memory bandwidth where oneDNN reached about half of it (decode batches), and keeps
up with oneDNN at prefill sizes (docs/benchmarks.md).

Packing applies to bfloat16 weights on a CPU with native bf16 (AVX-512 BF16 or AMX)
when PyTorch has oneDNN or the kernel runs; ``TGI_CPU_PACKED_GEMM=0`` turns it off.
A packed weight multiplies, but is not an ``[out, in]`` matrix any more: a oneDNN one is
an opaque tensor, the kernel's a 5-D tensor of tiles; the callers keep the output size."""

from __future__ import annotations

import functools
import os

import torch

from tgi_core.model.layers import amx_gemm, opaque

#: Set to ``0`` to keep plain ``F.linear`` (for comparisons and debugging).
ENV_SWITCH = "TGI_CPU_PACKED_GEMM"


@functools.cache
def _onednn_available() -> bool:
    from tgi_core.model.base import cpu_has_native_bf16

    ops = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and ops is not None
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
        and cpu_has_native_bf16()
    )


def can_pack(weight: torch.Tensor) -> bool:
    """Whether :func:`pack` applies to ``weight`` (a 2-D ``[out, in]`` matrix)."""
    return (
        os.environ.get(ENV_SWITCH, "1") != "0"
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and not weight.is_mkldnn
        and (amx_gemm.can_pack(weight) or _onednn_available())
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` packed for :func:`packed_linear` (where :func:`can_pack`)."""
    if amx_gemm.can_pack(weight):
        return amx_gemm.pack(weight)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """``x @ W.T + bias`` for ``packed = pack(W)``, ``W`` having ``out_features`` rows;
    ``x`` is cast to bf16 and back if needed."""
    if x.dtype != torch.bfloat16:
        bias = None if bias is None else bias.bfloat16()
        return packed_linear(x.to(torch.bfloat16), packed, bias, out_features).to(x.dtype)
    if amx_gemm.is_packed(packed):
        # the op, compiled or not: opaque to inductor (model/compiled.py), and in eager
        # its C++ kernel skips the Python around the ctypes call
        return opaque.amx_linear(x, packed, bias, out_features)
    if torch.compiler.is_compiling():  # an opaque op for inductor
        return opaque.packed_linear(x, packed, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
