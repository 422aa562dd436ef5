"""What tensor parallelism adds to each step: the collectives, on this machine's gloo.

Two (``--world-size``) processes on this machine, one CPU thread each, run the
collectives of one decode step of a SmolLM-135M-shaped Llama (hidden 576, 30 layers,
vocab 49152) through the code the server uses (``ParallelContext``, ``send_plan`` /
``receive_plan``), for B sequences of ``--context`` tokens:

- the step's plan, broadcast by rank 0 (header, then the packed payload);
- ``1 + 2 * layers`` all-reduces of ``[B, hidden]`` (the embedding, then each layer's
  attention output and MLP output: the row-parallel layers);
- one all-gather of the logits, ``[B, vocab / world]`` per rank.

Each figure is rank 0's wall time per step, the median of ``--repeats`` runs of
``--steps`` steps (after a warm-up run). No model runs: this is the overhead that
tensor parallelism puts on top of the compute, which the shards split.

    python benchmarks/collectives.py [--batches 1 32] [--dtype float32 bfloat16]
        [--world-size 2] [--steps 50] [--repeats 5] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tgi_core.distributed.plan import ChunkPlan, PlanKind, StepPlan, receive_plan, send_plan
from tgi_core.model.base import DTYPES
from tgi_core.model.parallel import ParallelContext

sys.path.insert(0, str(Path(__file__).parent))
from docs_section import write

BEGIN, END = "<!-- collectives:begin -->", "<!-- collectives:end -->"
HIDDEN, LAYERS, VOCAB = 576, 30, 49152
ALL_REDUCES = 1 + 2 * LAYERS


def decode_plan(batch: int, context: int, block_size: int = 16) -> StepPlan:
    """The plan of a decode step: one new token for each of ``batch`` sequences."""
    blocks = -(-(context + 1) // block_size)
    chunks = [
        ChunkPlan(context, 1, list(range(i * blocks, (i + 1) * blocks)), [7], "last")
        for i in range(batch)
    ]
    return StepPlan(PlanKind.STEP, chunks)


def timed(repeats: int, steps: int, run: Any, group: Any) -> float:
    """Median seconds per step over ``repeats`` runs of ``steps`` (all ranks in step)."""
    run()  # warm-up: connections, allocations
    times = []
    for _ in range(repeats):
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(steps):
            run()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def rank_main(rank: int, args: argparse.Namespace, port: int, results: Any) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", port, args.world_size, rank == 0, timedelta(seconds=60)
    )
    dist.init_process_group("gloo", store=store, rank=rank, world_size=args.world_size)
    control = dist.new_group(backend="gloo")
    tp = ParallelContext(rank, args.world_size, dist.group.WORLD)
    rows = []
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        for batch in args.batches:
            hidden = torch.randn(batch, HIDDEN).to(dtype)
            logits = torch.randn(batch, VOCAB // args.world_size).to(dtype)
            plan = decode_plan(batch, args.context)

            def plan_step(plan: StepPlan = plan) -> None:
                if rank == 0:
                    send_plan(plan, control)
                else:
                    receive_plan(control)

            def reduce_step(hidden: torch.Tensor = hidden) -> None:
                for _ in range(ALL_REDUCES):
                    tp.all_reduce(hidden.clone())

            def gather_step(logits: torch.Tensor = logits) -> None:
                tp.all_gather_last_dim(logits)

            measured = [
                timed(args.repeats, args.steps, step, control)
                for step in (plan_step, reduce_step, gather_step)
            ]
            rows.append((dtype_name, batch, *measured))
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def table(rows: list[tuple[Any, ...]], args: argparse.Namespace) -> str:
    lines = [
        BEGIN,
        "## Tensor-parallel collectives (`benchmarks/collectives.py`)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d}, torch {torch.__version__}, gloo over "
        f"loopback, {args.world_size} processes on this machine "
        f"({max(1, (os.cpu_count() or 1) // args.world_size)} thread each): the collectives "
        "of one decode step of the SmolLM-135M shape (hidden 576, 30 layers, vocab 49152), "
        f"for B sequences of {args.context} tokens. Rank 0's time per step, median of "
        f"{args.repeats} runs of {args.steps} steps; no model runs. Reproduce with "
        "`make bench`.",
        "",
        f"| dtype | B | plan broadcast | {ALL_REDUCES} all-reduces of [B, 576] | "
        "per all-reduce | all-gather of logits | collectives per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype_name, batch, plan, reduces, gather in rows:
        total = plan + reduces + gather
        lines.append(
            f"| {dtype_name} | {batch} | {plan * 1e3:.2f} ms | {reduces * 1e3:.2f} ms | "
            f"{reduces / ALL_REDUCES * 1e6:.0f} µs | {gather * 1e3:.2f} ms | "
            f"{total * 1e3:.2f} ms |"
        )
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(rank_main, args=(args, free_port(), results), nprocs=args.world_size, join=True)
    rows = results.get()
    for dtype_name, batch, plan, reduces, gather in rows:
        print(
            f"{dtype_name:9} B={batch:<3} plan {plan * 1e3:7.3f} ms   all-reduces "
            f"{reduces * 1e3:7.3f} ms   all-gather {gather * 1e3:7.3f} ms",
            flush=True,
        )
    section = table(rows, args)
    print(section)
    if args.write:
        write(args.write, section)


if __name__ == "__main__":
    main()
