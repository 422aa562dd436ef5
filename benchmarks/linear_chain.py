"""Every linear layer of a model step, in order, on packed bf16 weights: our kernel
(``tgi_core.model.layers.amx_gemm``: AMX, or AVX-512 BF16 without AMX) against oneDNN
(``_linear_pointwise`` on weights reordered once), at several numbers of rows (a decode
batch, a prefill chunk).

The weights are the SmolLM-135M shape's (30 layers of fused QKV, output, fused gate/up
and down projections, then the 49152-row LM head: ~268 MB in bf16), distinct per layer
so that each chain streams them all from memory, as a model step does. Outputs are
allocated per call, as the model's are. Alternating runs, medians.

    python benchmarks/linear_chain.py [--rows 1 8 32 64 128 512] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from docs_section import write
from machine import describe_machine
from shapes import SMOLLM_135M

from tgi_core.model.layers import amx_gemm

BEGIN, END = "<!-- linear-chain:begin -->", "<!-- linear-chain:end -->"


def layer_shapes(config: dict) -> list[tuple[int, int]]:
    """``(out, in)`` of each linear of one step, in order."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    per_layer = [
        ((heads + 2 * kv_heads) * head_dim, hidden),
        (hidden, heads * head_dim),
        (2 * inter, hidden),
        (hidden, inter),
    ]
    return per_layer * config["num_hidden_layers"] + [(config["vocab_size"], hidden)]


def chain(shapes: list[tuple[int, int]], rows: int, method: str) -> Callable[[], None]:
    """A function running the whole chain once with ``method`` (``amx`` or ``onednn``)."""
    weights = [torch.randn(out, inp).mul_(0.02).bfloat16() for out, inp in shapes]
    inputs = {inp: torch.randn(rows, inp).bfloat16() for _, inp in shapes}
    if method == "amx":
        packed = [amx_gemm.pack(w) for w in weights]

        def run() -> None:
            for (out, inp), w in zip(shapes, packed, strict=True):
                amx_gemm.linear(inputs[inp], w, None, out)

        return run
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]

    def run_onednn() -> None:
        for (_, inp), w in zip(shapes, packed, strict=True):
            torch.ops.mkldnn._linear_pointwise(inputs[inp], w, None, "none", [], "")

    return run_onednn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32, 64, 128, 512])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    if not amx_gemm.available():
        raise SystemExit("neither the AMX nor the AVX-512 kernel runs on this machine")
    kernel = "AMX" if amx_gemm.kind() == "amx" else "AVX-512"
    shapes = layer_shapes(SMOLLM_135M)
    weight_bytes = sum(out * inp * 2 for out, inp in shapes)
    lines = [
        BEGIN,
        "## Linear layers: our kernel vs oneDNN (`benchmarks/linear_chain.py`)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {describe_machine()}, the {kernel} "
        "kernel: every linear layer of one SmolLM-135M-shaped "
        f"step in order ({len(shapes)} GEMMs, {weight_bytes / 1e6:.0f} MB of bf16 weights, "
        f"distinct per layer), median of {args.repeats} alternating runs.",
        "",
        f"| rows | {kernel} kernel | oneDNN, packed | {kernel} / oneDNN | "
        f"{kernel} weight read rate |",
        "|---|---|---|---|---|",
    ]
    for rows in args.rows:
        runs = {method: chain(shapes, rows, method) for method in ("amx", "onednn")}
        times: dict[str, list[float]] = {method: [] for method in runs}
        for _ in range(args.repeats):
            for method, run in runs.items():
                start = time.perf_counter()
                run()
                times[method].append(time.perf_counter() - start)
        amx, onednn = (statistics.median(times[m]) for m in ("amx", "onednn"))
        lines.append(
            f"| {rows} | {amx * 1e3:.1f} ms | {onednn * 1e3:.1f} ms | {amx / onednn:.2f} | "
            f"{weight_bytes / amx / 1e9:.1f} GB/s |"
        )
        print(lines[-1], flush=True)
        del runs
    lines.append(END)
    if args.write:
        write(args.write, "\n".join(lines))


if __name__ == "__main__":
    main()
