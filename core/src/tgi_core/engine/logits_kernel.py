"""The greedy choice and log-normalizer of a step's logits in one C call
(``kernels/logits.cpp``): torch's ``max`` and ``logsumexp`` over 64 x 49152 float32
logits took ~5 ms a step, mostly allocating and faulting in temporaries.

:func:`greedy_logsumexp` returns None wherever the kernel does not apply (not built,
not a float32 CPU tensor with dense rows, a NaN in a row), and the sampler then uses
torch's ops, whose results it matches (the first index of each row's maximum; the
normalizer to float32 rounding).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from tgi_core import kernels
from tgi_core.logging import get_logger

log = get_logger("tgi_core.engine")


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = kernels.load_or_warn(
        lambda: kernels.load_library("logits.cpp"),
        log,
        "logits kernel unavailable; using torch's max and logsumexp",
    )
    if library is None:
        return None
    pointer, int64 = ctypes.c_void_p, ctypes.c_int64
    for function in (library.tgi_greedy_logsumexp, library.tgi_greedy_logsumexp_bf16):
        function.argtypes = [pointer, int64, int64, int64, pointer, pointer]
        function.restype = None
    return library


def greedy_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(logits.max(-1).indices, logits.float().logsumexp(-1, keepdim=True))`` of
    ``[N, V]`` float32 or bfloat16 logits (the normalizer in float32), or None where the
    kernel does not apply."""
    if (
        logits.dtype not in (torch.float32, torch.bfloat16)
        or logits.device.type != "cpu"
        or logits.dim() != 2
        or logits.stride(1) != 1
        or logits.shape[1] == 0
    ):
        return None
    library = _library()
    if library is None:
        return None
    rows = logits.shape[0]
    indices = torch.empty(rows, dtype=torch.int64)
    normalizer = torch.empty(rows, 1, dtype=torch.float32)
    function = (
        library.tgi_greedy_logsumexp
        if logits.dtype == torch.float32
        else library.tgi_greedy_logsumexp_bf16
    )
    function(
        logits.data_ptr(),
        rows,
        logits.shape[1],
        logits.stride(0),
        indices.data_ptr(),
        normalizer.data_ptr(),
    )
    if bool(normalizer.isnan().any()):
        return None
    return indices, normalizer
