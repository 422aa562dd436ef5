"""The model contract, and what a model's factory receives.

A model plugin's ``ModelSpec.factory`` is called as ``factory(hf_config, ctx)`` with the
checkpoint's transformers config and a :class:`ModelContext`, and returns a
``torch.nn.Module`` that:

- computes ``forward(input_ids [T], positions [T], batch: ForwardBatch) -> hidden [T, H]``
  over the packed tokens of a step, attention through ``layers.Attention`` modules;
- computes ``compute_logits(hidden [N, H]) -> [N, vocab]`` for the rows that need them;
- names its parameters like the checkpoint's tensors, and declares
  ``packed_modules_mapping`` (``{"q_proj": ("qkv_proj", "q"), ...}``) for tensors that
  load into a part of a fused parameter, and optionally ``ignored_checkpoint_tensors``
  (regular expressions) and ``map_checkpoint_name(name) -> str | None``.

Parameters are created with ``torch.empty`` (or ones/zeros) in the default dtype: the
loader sets the dtype while the model is built, then fills every parameter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from tgi_core.model.parallel import ParallelContext, current_parallel_context

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelContext:
    """Where and how a model is built."""

    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp: ParallelContext = field(default_factory=current_parallel_context)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX-512 BF16 or AMX)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as file:
                cpuinfo = file.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def default_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The fastest dtype for the device, chosen by measurement (docs/benchmarks.md).

    CPUs with native bf16 (AVX-512 BF16, AMX) run bf16 matmuls about 2x faster than
    float32, so bfloat16; without it bf16 is emulated, measured 5x slower than float32
    on an AVX-512 Xeon, so float32. CUDA: bfloat16 where supported, else float16.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@contextmanager
def default_torch_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules with ``dtype`` as torch's default floating dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
