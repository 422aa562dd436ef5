"""The CPU paged decode-attention kernel (``tgi_core/kernels/paged_decode.cpp``).

Decode attention reads every cached key and value of every sequence once per layer; the
general path gathers them into a padded copy and runs SDPA over it. The kernel reads
them in place from the paged cache through the block tables, and computes the softmax
in float32 (docs/benchmarks.md has what it bought).

The source is compiled at first use on the machine that runs it (``tgi_core.kernels``:
``-march=native``, a per-user cache, torch's OpenMP threads). Without a compiler, or with
``TGI_CPU_DECODE_KERNEL=0``, :func:`paged_decode` is None and the backend keeps its
general path.

In a decode step the kernel is also called from C++ (``kernels/attention_ops.cpp``, the
CPU kernel of ``tgi::attention``): a backend installs the step's sequences
(:class:`NativeDecodeStep`, around the model's call, compiled or eager) and registers each
layer's caches the first time its Python path runs the kernel
(:meth:`NativeDecodeStep.register`); in later steps the layers' op calls run the kernel
straight from C++. ``TGI_CPU_ATTENTION_OP=0``, or a
failed build, keeps every call on the Python path.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from types import TracebackType

import torch

from tgi_core import kernels
from tgi_core.logging import get_logger

log = get_logger("tgi_core.attention")

#: Set to ``0`` to keep the gather + SDPA decode path (comparisons, debugging).
ENV_SWITCH = "TGI_CPU_DECODE_KERNEL"
#: Set to ``0`` to keep the kernel's scores off AMX tiles (AVX-512 dot products instead).
TILES_SWITCH = "TGI_CPU_AMX_DECODE"
#: Set to ``0`` to keep a decode step's attention calls on the Python path.
OP_SWITCH = "TGI_CPU_ATTENTION_OP"


def load_kernel(march: str = "native") -> ctypes.CDLL:
    """The kernel built for ``-march=march`` (``tgi_core.kernels.load_library``);
    raises ``RuntimeError`` or ``OSError`` when it cannot be built or loaded."""
    library = kernels.load_library("paged_decode.cpp", march)
    int64, pointer = ctypes.c_int64, ctypes.c_void_p
    for name in ("tgi_paged_decode_bf16", "tgi_paged_decode_f32"):
        function = getattr(library, name)
        function.argtypes = [pointer] * 6 + [int64] * 6 + [ctypes.c_float]
        function.argtypes += [pointer] * 3 + [int64] * 3 + [pointer, int64]
        function.restype = ctypes.c_int
    library.tgi_paged_decode_use_tiles.argtypes = [ctypes.c_int]
    library.tgi_paged_decode_use_tiles.restype = ctypes.c_int
    use_tiles(library, os.environ.get(TILES_SWITCH, "1") != "0")
    return library


def use_tiles(library: ctypes.CDLL, enable: bool) -> bool:
    """Turns ``library``'s AMX score path on or off (on needs AMX at build time and the
    OS's grant of the tile state); returns whether it is on."""
    return bool(library.tgi_paged_decode_use_tiles(int(enable)))


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    return kernels.load_or_warn(
        load_kernel, log, "CPU decode-attention kernel unavailable; using gather + SDPA"
    )


def paged_decode_available() -> bool:
    """Whether :func:`paged_decode` can run here (building the kernel if needed)."""
    return _library() is not None


def paged_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    *,
    new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
    library: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its cached positions ``[0, seq_len)``.

    ``q`` ``[S, H, D]`` in the cache's dtype (bfloat16 or float32); caches ``[slots,
    Hkv, D]``; ``block_tables`` ``[S, max_blocks]`` and ``seq_lens`` ``[S]`` int64 (every
    length at least 1, covered by its table). Returns ``[S, H, D]`` in ``q``'s dtype.
    ``new = (k, v, slots)``: the step's new keys and values ``[S, Hkv, D]`` (any row
    stride; see :func:`can_write_new`), which the kernel writes to the caches at
    ``slots`` ``[S]`` before attending (one call instead of a cache write and a
    kernel call); a slot outside the cache raises ``IndexError``, writing nothing.
    Call only where :func:`paged_decode_available` (or pass a ``library`` from
    :func:`load_kernel`). ``bias``: float32 ``[S, H, L]`` (``L`` at least the longest
    sequence), added to each query head's scaled scores (T5's relative position bias).
    A step's layers share a :class:`DecodeSequences` instead.
    """
    sequences = DecodeSequences(
        block_tables, seq_lens, block_size, None if new is None else new[2], library=library
    )
    new_kv = None if new is None else new[:2]
    return sequences.attend(q, key_cache, value_cache, scale, new_kv, bias=bias)


class DecodeSequences:
    """A step's decode sequences bound for the kernel: block tables, lengths and the
    slots of their new tokens, checked and made contiguous once for all the layers of
    the step (each layer's :meth:`attend` then checks only its own tensors)."""

    def __init__(
        self,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        new_slots: torch.Tensor | None = None,
        *,
        library: ctypes.CDLL | None = None,
    ) -> None:
        library = library or _library()
        assert library is not None, "paged_decode_available() is False"
        self._bf16, self._f32 = library.tgi_paged_decode_bf16, library.tgi_paged_decode_f32
        assert block_tables.dtype == seq_lens.dtype == torch.int64
        self._tables, self._lengths = block_tables.contiguous(), seq_lens.contiguous()
        self.num_seqs = self._lengths.shape[0]
        assert self._tables.shape[0] == self.num_seqs
        self._slots = None
        if new_slots is not None:
            assert new_slots.dtype == torch.int64 and new_slots.shape == (self.num_seqs,)
            self._slots = new_slots.contiguous()
        self._fixed = (
            self._tables.data_ptr(),
            self._lengths.data_ptr(),
            block_size,
            self._tables.shape[1],
        )

    def attend(
        self,
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        scale: float,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        checked: bool = False,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One layer: :func:`paged_decode` of ``q`` over the caches, ``new_kv`` (the new
        keys and values, with the slots given at construction) written first;
        ``checked``: the caller has seen :func:`can_write_new` hold for ``new_kv``;
        ``bias``: as :func:`paged_decode`'s."""
        if q.dtype not in (torch.bfloat16, torch.float32) or key_cache.dtype != q.dtype:
            raise TypeError(f"paged_decode: q {q.dtype}, cache {key_cache.dtype}")
        q = q.contiguous()
        num_seqs, heads, head_dim = q.shape
        kv_heads = key_cache.shape[1]
        if num_seqs != self.num_seqs or heads % kv_heads or key_cache.shape[2] != head_dim:
            raise ValueError("paged_decode: q, cache and sequences disagree")
        assert key_cache.is_contiguous() and value_cache.is_contiguous()
        out = torch.empty_like(q)
        tables, lengths, block_size, max_blocks = self._fixed
        new_rows: tuple[int | None, int | None, int | None, int, int] = (None, None, None, 0, 0)
        if new_kv is not None:
            k, v = new_kv
            assert self._slots is not None and (checked or can_write_new(k, v, key_cache))
            new_rows = (
                k.data_ptr(),
                v.data_ptr(),
                self._slots.data_ptr(),
                k.stride(0),
                v.stride(0),
            )
        bias_args: tuple[int | None, int] = (None, 0)
        if bias is not None:
            if (
                bias.dtype != torch.float32
                or bias.dim() != 3
                or bias.shape[:2] != (num_seqs, heads)
                or bias.shape[2] < int(self._lengths.max())  # only read with a bias
                or not bias.is_contiguous()
            ):
                raise ValueError("paged_decode: the bias must be float32 [S, H, >= longest]")
            bias_args = (bias.data_ptr(), bias.shape[2])
        status = (self._bf16 if q.dtype == torch.bfloat16 else self._f32)(
            q.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), tables, lengths,
            out.data_ptr(), num_seqs, heads, kv_heads, head_dim, block_size, max_blocks, scale,
            *new_rows, key_cache.shape[0], *bias_args,
        )  # fmt: skip
        if status:
            raise IndexError(
                f"paged_decode: a new token's slot is outside the {key_cache.shape[0]}"
            )
        return out


def can_write_new(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether :func:`paged_decode` can write ``k`` / ``v`` (``[S, Hkv, D]``) to ``cache``
    itself: the cache's dtype, on the CPU, each row dense (rows may be strided)."""
    shape = cache.shape[1:]
    for new in (k, v):  # a loop, not all(generator): called for every layer of a step
        if new.dtype != cache.dtype or new.device.type != "cpu" or new.dim() != 3:
            return False
        if new.shape[1:] != shape or new.stride(2) != 1 or new.stride(1) != new.shape[2]:
            return False
    return True


@functools.cache
def _op_library() -> ctypes.CDLL | None:
    """``attention_ops.cpp`` bound to the decode kernel's bf16 entry point; None when
    either is unavailable or the op is switched off (read once: the C++ kernel, once
    registered, stays for the process)."""
    decode = _library()
    if decode is None or os.environ.get(OP_SWITCH, "1") == "0":
        return None
    library = kernels.load_or_warn(
        lambda: kernels.load_torch_library("attention_ops.cpp"),
        log,
        "C++ attention op unavailable; its Python path runs",
    )
    if library is None:
        return None
    int64, pointer = ctypes.c_int64, ctypes.c_void_p
    library.tgi_attention_ops_bind.argtypes = [pointer]
    library.tgi_attention_register_layer.argtypes = [int64, int64, pointer, pointer]
    library.tgi_attention_register_layer.argtypes += [int64, int64, int64, ctypes.c_float]
    library.tgi_attention_set_step.argtypes = [int64, pointer, pointer, pointer]
    library.tgi_attention_set_step.argtypes += [int64, int64, int64]
    for function in (
        library.tgi_attention_ops_bind,
        library.tgi_attention_register_layer,
        library.tgi_attention_set_step,
    ):
        function.restype = None
    library.tgi_attention_ops_bind(ctypes.cast(decode.tgi_paged_decode_bf16, pointer).value)
    return library


_installed = threading.local()
_NO_STEP = (-1, None, None, None, 0, 0, 0)


class NativeDecodeStep:
    """A decode step (one new token per sequence) for the C++ ``tgi::attention`` kernel:
    ``with step:`` installs it in this thread (restoring what was installed on exit).
    Keeps the tensors it hands over alive; made by :meth:`create`."""

    def __init__(
        self,
        library: ctypes.CDLL,
        serial: int,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        new_slots: torch.Tensor,
        block_size: int,
    ) -> None:
        self._library = library
        self._tensors = (block_tables, seq_lens, new_slots)
        self._args = (
            serial,
            block_tables.data_ptr(),
            seq_lens.data_ptr(),
            new_slots.data_ptr(),
            seq_lens.shape[0],
            block_size,
            block_tables.shape[1],
        )
        self._previous: list[tuple[object, ...]] = []

    @classmethod
    def create(
        cls,
        serial: int,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        new_slots: torch.Tensor,
        block_size: int,
    ) -> NativeDecodeStep | None:
        """The step over the caches of the ``KVCache`` numbered ``serial``: int64
        ``block_tables`` ``[S, max_blocks]`` (covering each sequence), ``seq_lens`` ``[S]``
        (new tokens included) and the new tokens' cache slots ``[S]``; None where the C++
        kernel is unavailable."""
        library = _op_library()
        if library is None:
            return None
        num_seqs = seq_lens.shape[0]
        assert block_tables.dtype == seq_lens.dtype == new_slots.dtype == torch.int64
        assert block_tables.shape[0] == num_seqs and new_slots.shape == (num_seqs,)
        return cls(
            library,
            serial,
            block_tables.contiguous(),
            seq_lens.contiguous(),
            new_slots.contiguous(),
            block_size,
        )

    def register(
        self, key: int, key_cache: torch.Tensor, value_cache: torch.Tensor, scale: float
    ) -> None:
        """Layer ``key`` (``Attention.op_key``) attends with ``scale`` over these
        bf16 caches ``[slots, Hkv, D]`` of this step's ``KVCache``, for the C++ kernel from
        now on; call only for a layer whose decode attention is exactly the kernel's, new
        keys and values written first (no bias, ALiBi or window)."""
        assert key_cache.dtype == value_cache.dtype == torch.bfloat16
        assert key_cache.is_contiguous() and value_cache.is_contiguous()
        assert key_cache.shape == value_cache.shape
        slots, kv_heads, head_dim = key_cache.shape
        self._library.tgi_attention_register_layer(
            key, self._args[0], key_cache.data_ptr(), value_cache.data_ptr(),
            slots, kv_heads, head_dim, scale,
        )  # fmt: skip

    def __enter__(self) -> None:
        self._previous.append(getattr(_installed, "args", _NO_STEP))
        _installed.args = self._args
        self._library.tgi_attention_set_step(*self._args)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        _installed.args = previous = self._previous.pop()
        self._library.tgi_attention_set_step(*previous)
