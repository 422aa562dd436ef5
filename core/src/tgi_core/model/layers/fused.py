"""A decoder layer's small ops as one C++ call each in eager steps (``kernels/fused_ops.cpp``):
RMSNorm (with its residual add) and the rotary rotation.

In eager PyTorch each is 5-12 ATen ops whose dispatch, not their arithmetic, is the cost at
decode sizes (~25-40 us a call on the SmolLM shape, ~2.5 ms of a 30-layer step); the C++
kernels take a few microseconds. They round where the PyTorch path rounds, and sum a row's
squares in their own fixed order (a few float32 ulps apart; a row's result does not depend
on the other rows). A compiled model keeps the PyTorch ops (inductor fuses them itself);
so do other devices and dtypes, and every call when the library cannot be built or
``TGI_CPU_FUSED_OPS=0``.
"""

from __future__ import annotations

import functools
import os

import torch

from tgi_core import kernels
from tgi_core.logging import get_logger

log = get_logger("tgi_core.model")

#: Set to ``0`` to keep the PyTorch ops (for comparisons and debugging).
ENV_SWITCH = "TGI_CPU_FUSED_OPS"

_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def available() -> bool:
    """Whether the fused ops are registered here (building them on first use)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    library = kernels.load_or_warn(
        lambda: kernels.load_torch_library("fused_ops.cpp", vectorize=True),
        log,
        "fused C++ layer ops unavailable; the PyTorch ops run",
    )
    return library is not None


def applies(x: torch.Tensor, operand: torch.Tensor) -> bool:
    """Whether the fused ops run on ``x`` with ``operand`` (the weight; cos and sin): an
    eager call on CPU, both float32 or both bfloat16."""
    return (
        x.dtype in _DTYPES
        and operand.dtype == x.dtype
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and available()
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dimension, in float32,
    rounded to ``x``'s dtype before the weight multiplies (as transformers does)."""
    out: torch.Tensor = torch.ops.tgi.rms_norm(x, weight, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``, the sum rounded to ``x``'s dtype."""
    normed, summed = torch.ops.tgi.add_rms_norm(x, residual, weight, eps)
    return normed, summed


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, heads, head_dim]`` rotated by ``cos``/``sin`` ``[T, rotary_dim]`` (in
    ``x``'s dtype; the dimensions past ``rotary_dim`` are copied), a new tensor."""
    out: torch.Tensor = torch.ops.tgi.rotary(x, cos, sin)
    return out
