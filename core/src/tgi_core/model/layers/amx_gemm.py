"""bf16 linear layers on packed weights through this project's kernels: on Intel AMX
(``kernels/amx_gemm.cpp``) and, on CPUs with AVX-512 BF16 but no AMX (AMD Zen 4), on
AVX-512 (``kernels/vec_gemm.cpp``). Both read the same packing.

At decode batch sizes a linear layer streams its weight from memory; the kernels read
it in its stored order with prefetching, where oneDNN's matmul on the same machines
reached about half the memory bandwidth (docs/benchmarks.md has the measurements); at
prefill sizes they are compute-bound and at least as fast as oneDNN. A row's result does
not depend on the other rows of the call (each output sums in one fixed order). It
applies to a bfloat16 ``[out, in]`` weight whose ``in`` is a multiple of 32, on a CPU with
AMX (``amx_bf16``) whose kernel grants the tile state, or with ``avx512_bf16`` and
``avx512vbmi``; ``TGI_CPU_AMX_GEMM=0`` turns both off (``cpu_gemm`` then packs for
oneDNN).

A packed weight is a plain bf16 tensor of shape ``[tiles, k_steps, 16, 16, 2]``: the
rows padded with zeros to a multiple of 32, and cut into the 1 KB blocks (32 input by 16
output features) that one AMX multiply reads; for one tile of 16 outputs, each pair of
inputs is one AVX-512 vector. Its five dimensions tell it apart from an unpacked or
oneDNN-packed weight; the number of output features travels separately.

The custom ops a compiled graph calls (``tgi::amx_linear``, ``tgi::amx_linear_int8``,
``layers/opaque.py``) get C++ kernels of the dispatcher (``kernels/gemm_ops.cpp``, built
against the installed torch and bound to the kernel chosen here), which skip the Python
around each call; ``TGI_CPU_GEMM_OPS=0``, or a failed build, keeps the Python ones.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from tgi_core import kernels
from tgi_core.logging import get_logger

log = get_logger("tgi_core.model")

#: Set to ``0`` to use oneDNN for packed bf16 weights instead (comparisons, debugging).
ENV_SWITCH = "TGI_CPU_AMX_GEMM"
#: Set to ``0`` to keep the custom ops' Python implementations (comparisons, debugging).
OPS_SWITCH = "TGI_CPU_GEMM_OPS"
#: input features per AMX step (the kernel's K granularity) and output features per block
K_STEP, N_BLOCK = 32, 32
_AMX_FLAGS = frozenset({"amx_bf16", "amx_tile", "avx512_bf16", "avx512vbmi"})
_VECTOR_FLAGS = frozenset({"avx512_bf16", "avx512vbmi"})


def load_kernel(march: str = "native") -> ctypes.CDLL:
    """The AMX kernel library built for ``-march=march``; raises ``RuntimeError`` or
    ``OSError`` when it cannot be built or loaded. It exports ``tgi_amx_available()``
    (whether it was built with AMX) and ``tgi_amx_init()`` (0 once the OS grants AMX)."""
    library = kernels.load_library("amx_gemm.cpp", march)
    library.tgi_amx_available.restype = ctypes.c_int
    library.tgi_amx_init.restype = ctypes.c_int
    _declare(library, "tgi_amx_linear_bf16", "tgi_amx_linear_int8")
    return library


def load_vector_kernel(march: str = "native") -> ctypes.CDLL:
    """The AVX-512 BF16 kernel library (same calls as the AMX one, ``tgi_vec_*``); it
    exports ``tgi_vec_gemm_available()`` (whether it was built with AVX-512 BF16)."""
    library = kernels.load_library("vec_gemm.cpp", march)
    library.tgi_vec_gemm_available.restype = ctypes.c_int
    _declare(library, "tgi_vec_linear_bf16", "tgi_vec_linear_int8")
    return library


def _declare(library: ctypes.CDLL, bf16_name: str, int8_name: str) -> None:
    pointer, int64 = ctypes.c_void_p, ctypes.c_int64
    bf16, int8 = getattr(library, bf16_name), getattr(library, int8_name)
    bf16.argtypes = [pointer, int64, int64, pointer, int64, pointer, pointer]
    bf16.restype = None
    int8.argtypes = [pointer, int64, int64, pointer, int64, *[pointer] * 3]
    int8.restype = None


@dataclass(frozen=True)
class _Kernel:
    """The loaded library, which instruction set it uses, and its two entry points."""

    kind: str  # "amx" or "avx512_bf16"
    bf16: Any
    int8: Any


@functools.cache
def _library() -> _Kernel | None:
    kernel = _load_kernel()
    if kernel is not None:
        bind_native_ops(kernel)
    return kernel


def bind_native_ops(kernel: _Kernel) -> bool:
    """Register the C++ kernels of ``tgi::amx_linear`` / ``tgi::amx_linear_int8`` on
    ``kernel``'s entry points (later calls rebind them); False when switched off
    (``TGI_CPU_GEMM_OPS=0``, read before the first call: a registration stays for the
    process) or when the library cannot be built, the Python implementations then run."""
    if os.environ.get(OPS_SWITCH, "1") == "0":
        return False
    library = kernels.load_or_warn(
        lambda: kernels.load_torch_library("gemm_ops.cpp"),
        log,
        "C++ GEMM ops unavailable; their Python implementations run",
    )
    if library is None:
        return False
    address = [ctypes.cast(f, ctypes.c_void_p).value for f in (kernel.bf16, kernel.int8)]
    library.tgi_gemm_ops_bind.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    library.tgi_gemm_ops_bind.restype = None
    library.tgi_gemm_ops_bind(*address)
    return True


def _load_kernel() -> _Kernel | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    flags = kernels.cpu_flags()
    if flags >= _AMX_FLAGS:
        try:
            library = load_kernel()
        except (OSError, RuntimeError) as exc:
            log.warning("AMX GEMM kernel unavailable", error=str(exc))
        else:
            if library.tgi_amx_available() and library.tgi_amx_init() == 0:
                return _Kernel("amx", library.tgi_amx_linear_bf16, library.tgi_amx_linear_int8)
            log.warning("AMX GEMM kernel unavailable: the compiler or the OS does not enable AMX")
    if flags >= _VECTOR_FLAGS:
        vector = kernels.load_or_warn(
            load_vector_kernel, log, "AVX-512 GEMM kernel unavailable; using oneDNN"
        )
        if vector is not None and vector.tgi_vec_gemm_available():
            return _Kernel("avx512_bf16", vector.tgi_vec_linear_bf16, vector.tgi_vec_linear_int8)
    return None


def available() -> bool:
    """Whether :func:`linear` can run here (building the kernel if needed)."""
    return _library() is not None


def kind() -> str | None:
    """``"amx"`` or ``"avx512_bf16"``: the instruction set :func:`linear` runs on here."""
    kernel = _library()
    return None if kernel is None else kernel.kind


def can_pack(weight: torch.Tensor) -> bool:
    """Whether ``weight`` (``[out, in]``) can be packed for :func:`linear` here."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and not weight.is_mkldnn
        and weight.shape[1] % K_STEP == 0
        and weight.shape[1] > 0
        and available()
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[N, K]`` (bf16, or int8 for :func:`linear_int8`; ``K % 32 == 0``) in
    the kernel's tile layout:
    ``[N_pad / 16, K / 32, 16 k-pairs, 16 columns, 2]`` with ``N_pad`` the multiple of 32
    at or above ``N`` (the padding is zeros). int8 values (``|q| <= 127``) are stored in
    the order the kernel widens them in: within each 64 values (two k-pairs of a tile),
    the quarters of the columns' axis come before the pairs' (:func:`_int8_reorder`)."""
    rows, cols = weight.shape
    padded_rows = -(-rows // N_BLOCK) * N_BLOCK
    padded = weight.detach().new_zeros(padded_rows, cols)
    padded[:rows] = weight.detach()
    tiles = padded.view(padded_rows // 16, 16, cols // K_STEP, 16, 2)
    packed = tiles.permute(0, 2, 3, 1, 4).contiguous()
    if packed.dtype == torch.int8:
        return _int8_reorder(packed, from_stored=False)
    return packed


#: an int8 tile's 64-value chunks as (column / 4, pair in the chunk, column % 4, pair
#: element) in the stored order, (pair, column / 4, ...) in tile order
_STORED_CHUNK, _TILE_CHUNK = (8, 4, 2, 4, 2), (8, 2, 4, 4, 2)


def _int8_reorder(packed: torch.Tensor, *, from_stored: bool) -> torch.Tensor:
    """An int8 ``[tiles, steps, 16, 16, 2]`` weight from tile order to the order
    :func:`pack` stores (the kernel's byte-table widening pairs byte j of each 16-byte
    lane with byte j + 8), or back: the two orders differ by one swap of axes, so the
    same swap goes either way."""
    chunk = _STORED_CHUNK if from_stored else _TILE_CHUNK
    return packed.view(*packed.shape[:2], *chunk).transpose(3, 4).reshape(packed.shape)


def unpack(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The ``[out_features, K]`` weight that :func:`pack` packed (tests, debugging)."""
    tiles, k_steps = packed.shape[:2]
    if packed.dtype == torch.int8:
        packed = _int8_reorder(packed, from_stored=True)
    full = packed.permute(0, 3, 1, 2, 4).reshape(tiles * 16, k_steps * K_STEP)
    return full[:out_features]


def gather_rows(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (any shape) of the ``[N, K]`` weight that :func:`pack` packed, as
    ``[*ids.shape, K]``, read from the packing without unpacking the rest."""
    tiles, steps = packed.shape[:2]
    column = ids % 16
    if packed.dtype == torch.int8:  # chunks in the stored order: by column / 4 and % 4
        stored = packed.view(tiles, steps, *_STORED_CHUNK)
        picked = stored[ids // 16, :, :, column // 4, :, column % 4, :]
    else:  # [tiles, steps, 16 pairs, 16 columns, 2]
        picked = packed[ids // 16, :, :, column, :]
    return picked.reshape(*ids.shape, steps * K_STEP)


def is_packed(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is in :func:`pack`'s layout."""
    return weight.dim() == 5


def _as_bf16(vector: torch.Tensor | None) -> torch.Tensor | None:
    if vector is None or (vector.dtype == torch.bfloat16 and vector.is_contiguous()):
        return vector
    return vector.to(torch.bfloat16).contiguous()


def _call(
    name: str,
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    vectors: tuple[torch.Tensor | None, ...],
) -> torch.Tensor:
    """Run entry point ``name`` (``bf16`` or ``int8``) on ``x`` ``[..., K]`` (bf16) with
    the per-output ``vectors`` (scales, bias: bf16 or None); ``[..., out_features]`` bf16."""
    kernel = _library()
    assert kernel is not None, "amx_gemm.available() is False"
    if x.dtype != torch.bfloat16:
        raise TypeError(f"amx_gemm: x is {x.dtype}, not bfloat16")
    k = packed.shape[1] * K_STEP
    if x.shape[-1] != k:
        raise ValueError(f"amx_gemm: x has {x.shape[-1]} features, the weight {k}")
    # a decode step calls this ~150 times: the common 2-D contiguous case skips reshapes
    flat = x.dim() == 2 and x.is_contiguous()
    rows = x if flat else x.reshape(-1, k).contiguous()
    out = torch.empty((rows.shape[0], out_features), dtype=torch.bfloat16)
    if rows.shape[0]:
        kept = [_as_bf16(v) for v in vectors]  # alive until the call returns
        pointers = []
        for vector in kept:
            if vector is not None and vector.numel() < out_features:
                raise ValueError(f"amx_gemm: a bias or scales vector shorter than {out_features}")
            pointers.append(None if vector is None else vector.data_ptr())
        function = getattr(kernel, name)
        function(rows.data_ptr(), rows.shape[0], k, packed.data_ptr(), out_features, *pointers,
                 out.data_ptr())  # fmt: skip
    return out if flat else out.view(*x.shape[:-1], out_features)


def linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """``x @ W.T + bias`` for ``packed = pack(W)``; ``x`` ``[..., K]`` in bf16, the
    result ``[..., out_features]`` in bf16 (float32 accumulation, rounded once)."""
    return _call("bf16", x, packed, out_features, (bias,))


def linear_int8(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """``(x @ Q.T) * scales + bias`` for ``packed = pack(Q)``, ``Q`` int8 ``[out, K]``
    with one bf16 scale per output feature; ``x`` ``[..., K]`` bf16, the result bf16.
    The int8 values are widened to bf16 tiles in the kernel (exact), so the sums are
    the ones of the bf16 kernel on the dequantized-but-unscaled weight."""
    if packed.dtype != torch.int8:
        raise TypeError(f"amx_gemm.linear_int8: the weight is {packed.dtype}, not int8")
    return _call("int8", x, packed, out_features, (scales, bias))
