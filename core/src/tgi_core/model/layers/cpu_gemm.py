"""bf16 matmuls on CPU through oneDNN with weights packed once, at load time.

``F.linear`` on a bf16 weight lets oneDNN reorder the weight into its blocked layout on
every call; packing it once (``torch.ops.mkldnn._reorder_linear_weight``) and running
``torch.ops.mkldnn._linear_pointwise`` skips that: the linear layers of a
SmolLM-135M-shaped model ran 1.3-1.6x faster from batch 1 to 32 on this project's
machines (docs/benchmarks.md), with the same accumulation in float32.

Packing applies to bfloat16 weights on a CPU with native bf16 (AVX-512 BF16 or AMX)
when PyTorch has oneDNN; ``TGI_CPU_PACKED_GEMM=0`` turns it off. A packed weight is an
opaque oneDNN tensor: it multiplies, but cannot be indexed or converted.
"""

from __future__ import annotations

import functools
import os

import torch

from tgi_core.model.layers import opaque

#: Set to ``0`` to keep plain ``F.linear`` (for comparisons and debugging).
ENV_SWITCH = "TGI_CPU_PACKED_GEMM"


@functools.cache
def _available() -> bool:
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
        and _available()
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` in oneDNN's layout for :func:`packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` for a packed ``W``; ``x`` is cast to bf16 and back if needed."""
    if x.dtype == torch.bfloat16:
        if torch.compiler.is_compiling():  # opaque to inductor (model/compiled.py)
            return opaque.packed_linear(x, packed, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    out = torch.ops.mkldnn._linear_pointwise(
        x.to(torch.bfloat16), packed, None if bias is None else bias.bfloat16(), "none", [], ""
    )
    return out.to(x.dtype)
