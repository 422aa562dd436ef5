"""The CPU prefill-attention kernel (``tgi_core/kernels/flash_prefill.cpp``).

Many queries per sequence (a prompt, a chunk over a cached prefix, a T5 source) in one
pass over the keys: 16 queries and the query heads of one key/value head to a work item,
the scores and the weighted values as AVX-512 BF16 dot products, the softmax online in
float32. Keys and values are read in place, from the paged cache through the block
tables or from packed rows (a T5 encoder's). Every sequence of a step goes in one call.

Built at first use like the decode kernel (``tgi_core.kernels``). It needs AVX-512 BF16;
elsewhere, without a compiler, or with ``TGI_CPU_PREFILL_KERNEL=0``,
:func:`flash_prefill_available` is False and the backend keeps SDPA.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from typing import Any

import torch

from tgi_core import kernels
from tgi_core.logging import get_logger

log = get_logger("tgi_core.attention")

#: Set to ``0`` to keep prefills on SDPA (comparisons, debugging).
ENV_SWITCH = "TGI_CPU_PREFILL_KERNEL"
#: The head sizes the kernel is built for.
HEAD_DIMS = frozenset({16, 32, 64, 80, 96, 128, 256})
#: The bias table's margin past the longest query run (the kernel reads 16 lanes at once).
_BIAS_MARGIN = 16


def load_kernel(march: str = "native") -> ctypes.CDLL:
    """The kernel built for ``-march=march``; raises ``RuntimeError`` or ``OSError`` when
    it cannot be built or loaded."""
    library = kernels.load_library("flash_prefill.cpp", march)
    int64, pointer = ctypes.c_int64, ctypes.c_void_p
    function = library.tgi_flash_prefill_bf16
    # q, strides, k, v, out, S; q_start, q_len, q_pos, kv_len, kv_start, tables; the
    # sizes; scale, causal; the bias, its stride and offset
    argtypes: list[Any] = [pointer, int64] * 3 + [pointer, int64] + [pointer] * 6
    argtypes += [int64] * 5 + [ctypes.c_float, ctypes.c_int, pointer, int64, int64]
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    library.tgi_flash_prefill_supported.restype = ctypes.c_int
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    library = kernels.load_or_warn(
        load_kernel, log, "CPU prefill-attention kernel unavailable; using SDPA"
    )
    return library if library is not None and library.tgi_flash_prefill_supported() else None


def flash_prefill_available(head_dim: int) -> bool:
    """Whether the kernel runs here (AVX-512 BF16, built) for heads of ``head_dim``."""
    return head_dim in HEAD_DIMS and _library() is not None


def relative_bias_table(
    position_bias: torch.nn.Module | object, longest: int
) -> tuple[torch.Tensor, int]:
    """T5's relative position bias as the kernel reads it: float32 ``[H, W]`` and the
    offset of distance 0 (``table[h, offset + query_pos - key_pos]``), covering the
    distances of runs of up to ``longest`` queries and keys."""
    offset = longest - 1
    distances = torch.arange(2 * longest - 1 + _BIAS_MARGIN)
    table = position_bias(distances, torch.tensor([offset]))  # type: ignore[operator]
    return table.squeeze(-1).float().contiguous(), offset


class PrefillSequences:
    """A step's prefill sequences bound for the kernel, checked and made tensors once
    for all its layers.

    Sequence ``s`` has the query rows ``[q_start[s], q_start[s] + q_len[s])`` of the
    packed queries, the first at position ``q_pos[s]``, and ``kv_len[s]`` keys: in the
    paged cache through ``block_tables`` (``[S, B]`` int64), or, without tables, packed
    rows from ``kv_start[s]`` of the keys and values passed to :meth:`attend`.
    """

    def __init__(
        self,
        q_start: Sequence[int],
        q_len: Sequence[int],
        q_pos: Sequence[int],
        kv_len: Sequence[int],
        *,
        block_tables: torch.Tensor | None = None,
        block_size: int = 1,
        kv_start: Sequence[int] | None = None,
        library: ctypes.CDLL | None = None,
    ) -> None:
        library = library or _library()
        assert library is not None, "flash_prefill_available() is False"
        assert (block_tables is None) != (kv_start is None), "tables or packed rows"
        self._function = library.tgi_flash_prefill_bf16
        self.num_seqs = len(q_start)
        counts = {len(q_len), len(q_pos), len(kv_len), len(kv_start or q_start)}
        if counts != {self.num_seqs}:
            raise ValueError("flash_prefill: one start, length and position per sequence")
        if min([*q_start, *(kv_start or ())], default=0) < 0:
            raise ValueError("flash_prefill: rows start at 0 or later")
        if any(n < 1 for n in q_len) or any(
            p < 0 or p + n > kv for p, n, kv in zip(q_pos, q_len, kv_len, strict=True)
        ):
            raise ValueError("flash_prefill: each sequence's queries must lie in its keys")
        self._q_start = torch.tensor(q_start, dtype=torch.int64)
        self._q_len = torch.tensor(q_len, dtype=torch.int64)
        self._q_pos = torch.tensor(q_pos, dtype=torch.int64)
        self._kv_len = torch.tensor(kv_len, dtype=torch.int64)
        self.rows = int((self._q_start + self._q_len).max()) if self.num_seqs else 0
        self.longest = max([*q_len, *kv_len], default=1)
        self._kv_start = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int64)
        self._tables = None if block_tables is None else block_tables.contiguous()
        self._blocks_read = 0  # blocks a cache must have for the tables' entries
        if self._tables is not None:
            if self._tables.dtype != torch.int64 or self._tables.dim() != 2:
                raise TypeError("flash_prefill: block tables must be int64 [S, max_blocks]")
            if self._tables.shape[0] != self.num_seqs:
                raise ValueError("flash_prefill: one block table per sequence")
            widths = -(-self._kv_len // block_size)
            if self.num_seqs and int(widths.max()) > self._tables.shape[1]:
                raise ValueError("flash_prefill: a block table is shorter than its keys")
            if self._tables.numel():
                if int(self._tables.min()) < 0:
                    raise ValueError("flash_prefill: a block table holds a negative block")
                self._blocks_read = int(self._tables.max()) + 1
        self._block_size = block_size

    def attend(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        out: torch.Tensor,
        scale: float,
        *,
        causal: bool,
        bias: tuple[torch.Tensor, int] | None = None,
    ) -> torch.Tensor:
        """Writes the sequences' rows of ``out`` ``[T, H, D]`` (bf16, dense), other rows
        untouched; returns ``out``. ``q`` ``[T, H, D]`` bf16 (rows may be strided); ``keys``
        and ``values``: the caches ``[slots, Hkv, D]``, or packed rows ``[rows, Hkv, D]``
        (rows may be strided). ``causal``: a query sees the keys up to its own position.
        ``bias``: ``(table, offset)`` from :func:`relative_bias_table`."""
        if self.num_seqs == 0:
            return out
        num_rows, heads, head_dim = q.shape
        kv_heads = keys.shape[1]
        for name, tensor in (("q", q), ("keys", keys), ("values", values), ("out", out)):
            if tensor.dtype != torch.bfloat16 or tensor.dim() != 3:
                raise TypeError(f"flash_prefill: {name} must be bf16 [rows, heads, head_dim]")
        q, keys, values = (_dense_rows(x) for x in (q, keys, values))
        if (
            heads % kv_heads
            or keys.shape[2] != head_dim
            or values.shape[1:] != keys.shape[1:]
            or out.shape != q.shape
            or not out.is_contiguous()
            or self.rows > num_rows
        ):
            raise ValueError("flash_prefill: q, keys, values and out disagree")
        bias_args: tuple[int | None, int, int] = (None, 0, 0)
        if bias is not None:
            table, offset = bias
            needed = offset + self.longest + _BIAS_MARGIN
            if table.dtype != torch.float32 or table.dim() != 2 or table.shape[0] != heads:
                raise ValueError("flash_prefill: the bias table must be float32 [heads, W]")
            if offset < self.longest - 1:
                raise ValueError("flash_prefill: the bias table does not cover the sequences")
            if not table.is_contiguous() or table.shape[1] < needed:
                raise ValueError("flash_prefill: the bias table does not cover the sequences")
            bias_args = (table.data_ptr(), table.shape[1], offset)
        if self._kv_start is not None and int((self._kv_start + self._kv_len).max()) > len(keys):
            raise ValueError("flash_prefill: packed keys are shorter than the sequences")
        if self._blocks_read * self._block_size > keys.shape[0]:
            raise ValueError("flash_prefill: a block table points past the cache")
        tables = None if self._tables is None else self._tables.data_ptr()
        status = self._function(
            q.data_ptr(), q.stride(0), keys.data_ptr(), keys.stride(0),
            values.data_ptr(), values.stride(0), out.data_ptr(), self.num_seqs,
            self._q_start.data_ptr(), self._q_len.data_ptr(), self._q_pos.data_ptr(),
            self._kv_len.data_ptr(),
            None if self._kv_start is None else self._kv_start.data_ptr(), tables,
            0 if self._tables is None else self._tables.shape[1], self._block_size,
            heads, kv_heads, head_dim, scale, int(causal), *bias_args,
        )  # fmt: skip
        if status == -2:
            raise MemoryError("flash_prefill: no memory for the kernel's buffers")
        if status:
            raise ValueError(f"flash_prefill: heads of {head_dim} are not supported")
        return out


def _dense_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[rows, heads, D]`` with each row dense (rows may stay strided)."""
    if x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        return x
    return x.contiguous()
