"""Which dtype is fastest on this CPU: matmul throughput in float32 and bfloat16.

``tgi_core.model.base.default_dtype`` picks bfloat16 only where the CPU has native bf16
(AVX-512 BF16 or AMX); this measures the shapes that matter to check that choice.

    python benchmarks/dtype_choice.py [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from tgi_core.model.base import cpu_has_native_bf16, default_dtype

BEGIN, END = "<!-- dtype-choice:begin -->", "<!-- dtype-choice:end -->"
SHAPES = [(2048, 2048, 2048), (1, 576, 1536), (32, 576, 1536), (32, 1536, 576), (512, 576, 1536)]


def gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 7) -> float:
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    runs = max(1, int(2e9 / (2 * m * k * n)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(runs):
            F.linear(x, w)
        times.append((time.perf_counter() - start) / runs)
    return 2 * m * k * n / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    lines = [
        BEGIN,
        "## Default dtype (`benchmarks/dtype_choice.py`)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; native bf16 on this CPU: "
        f"{'yes' if cpu_has_native_bf16() else 'no'}; default dtype chosen: "
        f"{str(default_dtype()).removeprefix('torch.')}. `F.linear` throughput, median of 7:",
        "",
        "| shape (M x K x N) | float32 GFLOP/s | bfloat16 GFLOP/s | bf16 / fp32 |",
        "|---|---|---|---|",
    ]
    for m, k, n in SHAPES:
        fp32, bf16 = gflops(m, k, n, torch.float32), gflops(m, k, n, torch.bfloat16)
        lines.append(f"| {m} x {k} x {n} | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f} |")
        print(lines[-1], flush=True)
    lines.append(END)
    section = "\n".join(lines)
    print(section)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from docs_section import write

        write(args.write, section)


if __name__ == "__main__":
    main()
