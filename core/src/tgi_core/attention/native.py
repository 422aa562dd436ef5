"""The CPU paged decode-attention kernel (``kernels/paged_decode.cpp``), built at first use.

Decode attention reads every cached key and value of every sequence once per layer; the
general path gathers them into a padded copy and runs SDPA over it. The kernel reads
them in place from the paged cache through the block tables, and computes the softmax
in float32 (docs/benchmarks.md has what it bought).

The source is compiled on the machine that runs it (``-O3 -march=native -fopenmp``, by
``$CXX`` or ``c++``) into a per-user cache (``$TGI_KERNEL_CACHE``, default
``~/.cache/tgi/kernels``), keyed by the source, the flags and the CPU's features, and
loaded with ctypes after torch, so it shares torch's OpenMP runtime and the calling
thread's ``torch.set_num_threads``. Without a compiler, or with
``TGI_CPU_DECODE_KERNEL=0``, :func:`paged_decode` is None and the backend keeps its
general path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from tgi_core.logging import get_logger

log = get_logger("tgi_core.attention")

#: Set to ``0`` to keep the gather + SDPA decode path (comparisons, debugging).
ENV_SWITCH = "TGI_CPU_DECODE_KERNEL"
SOURCE = "paged_decode.cpp"
# -ffast-math would also link crtfastmath.o, which flushes denormals for the whole
# process; these are the parts the kernel's loops need to vectorize
FLAGS = (
    "-O3",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fno-signed-zeros",
    "-fassociative-math",
    "-freciprocal-math",
    "-shared",
    "-fPIC",
)


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(source: str, target: Path, flags: tuple[str, ...]) -> None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler ($CXX, c++ or g++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        cpp, built = Path(scratch) / SOURCE, Path(scratch) / target.name
        cpp.write_text(source)
        result = subprocess.run(
            [compiler, *flags, str(cpp), "-o", str(built)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: processes building at once agree


def load_kernel(march: str = "native") -> ctypes.CDLL:
    """The kernel built for ``-march=march`` (from the per-user cache, or built now);
    raises ``RuntimeError`` or ``OSError`` when it cannot be built or loaded."""
    source = (Path(__file__).parent / "kernels" / SOURCE).read_text()
    flags = (*FLAGS, f"-march={march}")
    features = _cpu_features() if march == "native" else ""
    key = hashlib.sha256("\n".join([source, *flags, features]).encode()).hexdigest()
    cache = Path(os.environ.get("TGI_KERNEL_CACHE") or Path.home() / ".cache/tgi/kernels")
    target = cache / f"paged_decode-{key[:16]}.so"
    if not target.exists():
        _build(source, target, flags)
    library = ctypes.CDLL(str(target))
    int64, pointer = ctypes.c_int64, ctypes.c_void_p
    for name in ("tgi_paged_decode_bf16", "tgi_paged_decode_f32"):
        function = getattr(library, name)
        function.argtypes = [pointer] * 6 + [int64] * 6 + [ctypes.c_float]
        function.restype = None
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        return load_kernel()
    except (OSError, RuntimeError) as exc:
        log.warning("CPU decode-attention kernel unavailable; using gather + SDPA", error=str(exc))
        return None


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
    library: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its cached positions ``[0, seq_len)``.

    ``q`` ``[S, H, D]`` in the cache's dtype (bfloat16 or float32); caches ``[slots,
    Hkv, D]``; ``block_tables`` ``[S, max_blocks]`` and ``seq_lens`` ``[S]`` int64 (every
    length at least 1, covered by its table). Returns ``[S, H, D]`` in ``q``'s dtype.
    Call only where :func:`paged_decode_available` (or pass a ``library`` from
    :func:`load_kernel`).
    """
    library = library or _library()
    assert library is not None, "paged_decode_available() is False"
    if q.dtype not in (torch.bfloat16, torch.float32) or key_cache.dtype != q.dtype:
        raise TypeError(f"paged_decode: q {q.dtype}, cache {key_cache.dtype}")
    q = q.contiguous()
    num_seqs, heads, head_dim = q.shape
    kv_heads = key_cache.shape[1]
    if heads % kv_heads or key_cache.shape[2] != head_dim:
        raise ValueError("paged_decode: q and cache shapes disagree")
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert block_tables.dtype == seq_lens.dtype == torch.int64
    tables, lengths = block_tables.contiguous(), seq_lens.contiguous()
    out = torch.empty_like(q)
    function = (
        library.tgi_paged_decode_bf16 if q.dtype == torch.bfloat16 else library.tgi_paged_decode_f32
    )
    function(
        q.data_ptr(),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        tables.data_ptr(),
        lengths.data_ptr(),
        out.data_ptr(),
        num_seqs,
        heads,
        kv_heads,
        head_dim,
        block_size,
        tables.shape[1],
        scale,
    )
    return out
