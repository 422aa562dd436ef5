"""C++ kernels for the CPU, compiled on the machine that runs them, at first use.

Each ``*.cpp`` here is a plain C-ABI library (no torch headers, so a build takes a
second or two, not minutes). :func:`load_library` compiles it with ``-O3
-march=native -fopenmp`` (by ``$CXX``, ``c++`` or ``g++``) into a per-user cache
(``$TGI_KERNEL_CACHE``, default ``~/.cache/tgi/kernels``), keyed by the source, the
flags and the CPU's features, and loads it with ctypes after torch: it shares torch's
OpenMP runtime, so its parallel regions use the calling thread's
``torch.set_num_threads``, and ctypes releases the GIL around each call.

:func:`load_torch_library` builds the files that include torch's headers (``*_ops.cpp``:
custom-op kernels of the dispatcher) against the installed torch, in a few seconds more.

Callers treat a failed build as "kernel unavailable" and keep a PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# -ffast-math would also link crtfastmath.o, which flushes denormals for the whole
# process; these are the parts the kernels' loops need to vectorize
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


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def _build(
    source_name: str,
    source: str,
    target: Path,
    flags: tuple[str, ...],
    libraries: tuple[str, ...] = (),
) -> None:
    """Compile ``source`` (its ``#include "..."`` headers found in this package), linked
    with ``libraries`` (flags that follow the source)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler ($CXX, c++ or g++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        cpp, built = Path(scratch) / source_name, Path(scratch) / target.name
        cpp.write_text(source)
        result = subprocess.run(
            [
                compiler,
                *flags,
                f"-I{Path(__file__).parent}",
                str(cpp),
                "-o",
                str(built),
                *libraries,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: processes building at once agree


def _load_cached(
    source_name: str,
    source: str,
    stamp: list[str],
    flags: tuple[str, ...],
    libraries: tuple[str, ...] = (),
) -> ctypes.CDLL:
    """The library of ``source`` from the per-user cache, keyed by ``stamp`` (everything
    the build depends on), or built into it now."""
    key = hashlib.sha256("\n".join(stamp).encode()).hexdigest()
    cache = Path(os.environ.get("TGI_KERNEL_CACHE") or Path.home() / ".cache/tgi/kernels")
    target = cache / f"{Path(source_name).stem}-{key[:16]}.so"
    if not target.exists():
        _build(source_name, source, target, flags, libraries)
    return ctypes.CDLL(str(target))


def load_library(source_name: str, march: str = "native") -> ctypes.CDLL:
    """The library built from ``source_name`` (a file in this package) for
    ``-march=march``, from the per-user cache or built now; raises ``RuntimeError`` or
    ``OSError`` when it cannot be built or loaded. Declaring the functions' argument
    types is the caller's job."""
    folder = Path(__file__).parent
    source = (folder / source_name).read_text()
    headers = [header.read_text() for header in sorted(folder.glob("*.h"))]
    flags = (*FLAGS, f"-march={march}")
    features = " ".join(sorted(cpu_flags())) if march == "native" else ""
    return _load_cached(source_name, source, [source, *headers, *flags, features], flags)


def load_torch_library(source_name: str, *, vectorize: bool = False) -> ctypes.CDLL:
    """The library built from ``source_name`` against the installed torch (its headers,
    ``libc10`` and ``libtorch_cpu``, its C++ ABI), from the per-user cache (keyed by the
    source and torch's version and path) or built now; loading it runs its
    ``TORCH_LIBRARY_IMPL`` registrations. Raises ``RuntimeError`` or ``OSError`` when it
    cannot be built or loaded.

    ``vectorize``: ``-O3 -march=native`` (the CPU's features join the key), without
    floating-point contraction (each product rounds, as in PyTorch), for a source whose
    own loops do the work."""
    import torch  # this package's C-ABI libraries do not need it
    from torch.utils import cpp_extension

    folder = Path(__file__).parent
    source = (folder / source_name).read_text()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    optimization = ("-O3", "-march=native", "-ffp-contract=off") if vectorize else ("-O2",)
    flags = (
        *optimization,
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-w",  # torch's headers warn under -std=c++17
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in cpp_extension.include_paths()),
    )
    lib_dirs = cpp_extension.library_paths()
    libraries = (
        *(f"-L{path}" for path in lib_dirs),
        *(f"-Wl,-rpath,{path}" for path in lib_dirs),
        "-lc10",
        "-ltorch_cpu",
    )
    stamp = [source, *flags, *libraries, torch.__version__, torch.__file__]
    if vectorize:
        stamp.append(" ".join(sorted(cpu_flags())))
    return _load_cached(source_name, source, stamp, flags, libraries)


def load_or_warn(load: Callable[[], T], log: Any, message: str) -> T | None:
    """``load()``, or None after logging ``message`` (with the error) at warning level
    when the library cannot be built or loaded (``RuntimeError`` or ``OSError``)."""
    try:
        return load()
    except (OSError, RuntimeError) as exc:
        log.warning(message, error=str(exc))
        return None
