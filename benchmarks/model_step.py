"""One forward step of a SmolLM-135M-shaped Llama: tgi-llama against transformers.

Both run in this process on the same random-weight checkpoint (saved by transformers),
in the same dtype, alternating, and the median of the repeats is reported:

- decode: one new token for each of B sequences that already hold ``--context`` tokens
  (ours: through the paged cache with the default backend; transformers: its forward
  with its own DynamicCache), averaged over ``--steps`` consecutive steps;
- prefill: one 512-token prompt (transformers computes only the last logits, as
  ``generate`` does; so do we).

Ours runs twice: eager, and with ``--compile`` (the forward through torch.compile; its
compiling happens in the untimed warm-up run).

    python benchmarks/model_step.py [--dtype bfloat16 float32] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from docs_section import write
from shapes import SMOLLM_135M
from transformers import DynamicCache, LlamaConfig

from tgi_core.model.base import DTYPES, ModelContext
from tgi_core.model.fixtures import load_reference, save_checkpoint
from tgi_core.model.loader import load_model
from tgi_core.model.runner import PagedRunner
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry

SMOLLM = dict(SMOLLM_135M)
BEGIN, END = "<!-- model-step:begin -->", "<!-- model-step:end -->"


def ours_decode(
    model, backend, dtype, batch: int, context: int, steps: int, compile: bool
) -> float:
    runner = PagedRunner(
        model,
        backend,
        num_blocks=batch * ((context + steps) // 16 + 2),
        block_size=16,
        model_dtype=dtype,
        compile=compile,
    )
    ids = [runner.add(torch.randint(0, 49152, (context,)).tolist()) for _ in range(batch)]
    for seq_id in ids:  # prefill one by one (not timed)
        runner.step([seq_id])
    start = time.perf_counter()
    for _ in range(steps):
        for seq_id in ids:
            runner.append(seq_id, [1])
        runner.step(ids)
    return (time.perf_counter() - start) / steps


@torch.inference_mode()
def hf_decode(model, batch: int, context: int, steps: int) -> float:
    cache = DynamicCache(config=model.config)
    model(
        input_ids=torch.randint(0, 49152, (batch, context)),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    start = time.perf_counter()
    for _ in range(steps):
        model(input_ids=torch.ones(batch, 1, dtype=torch.int64), cache=cache, use_cache=True)
    return (time.perf_counter() - start) / steps


def ours_prefill(model, backend, dtype, length: int, compile: bool) -> float:
    runner = PagedRunner(
        model,
        backend,
        num_blocks=length // 16 + 2,
        block_size=16,
        model_dtype=dtype,
        compile=compile,
    )
    seq = runner.add(torch.randint(0, 49152, (length,)).tolist())
    start = time.perf_counter()
    runner.step([seq])
    return time.perf_counter() - start


@torch.inference_mode()
def hf_prefill(model, length: int) -> float:
    ids = torch.randint(0, 49152, (1, length))
    start = time.perf_counter()
    model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


Row = tuple[str, float, float, float]  # step, ours eager, ours compiled, transformers


def measure(
    path: Path, dtype_name: str, batches: list[int], context: int, steps: int, repeats: int
) -> list[Row]:
    dtype = DTYPES[dtype_name]
    registry = Registry.build(make_plugin_manager())
    ours = load_model(str(path), registry, ctx=ModelContext(dtype=dtype)).model
    backend = registry.attention_backends["sdpa"].load()()
    theirs = load_reference(path, dtype)
    theirs.config._attn_implementation = "sdpa"  # transformers' fastest CPU attention
    cases = [
        (
            f"decode, batch {b}",
            lambda compile, b=b: ours_decode(ours, backend, dtype, b, context, steps, compile),
            lambda b=b: hf_decode(theirs, b, context, steps),
        )
        for b in batches
    ]
    cases.append(
        (
            "prefill, 512 tokens",
            lambda compile: ours_prefill(ours, backend, dtype, 512, compile),
            lambda: hf_prefill(theirs, 512),
        )
    )
    rows: list[Row] = []
    for name, run_ours, run_theirs in cases:
        run_ours(False), run_ours(True), run_theirs()  # warm-up (and compiling)
        eager, compiled, their_times = [], [], []
        for _ in range(repeats):
            eager.append(run_ours(False))
            compiled.append(run_ours(True))
            their_times.append(run_theirs())
        rows.append(
            (
                name,
                statistics.median(eager),
                statistics.median(compiled),
                statistics.median(their_times),
            )
        )
        ours_ms, compiled_ms, theirs_ms = (t * 1000 for t in rows[-1][1:])
        print(
            f"{dtype_name:9} {name:20} ours {ours_ms:8.1f} ms   compiled {compiled_ms:8.1f} ms"
            f"   transformers {theirs_ms:8.1f} ms   ratios {ours_ms / theirs_ms:.2f} "
            f"{compiled_ms / theirs_ms:.2f}",
            flush=True,
        )
    return rows


def table(results: dict[str, list[Row]], args: argparse.Namespace) -> str:
    lines = [
        BEGIN,
        "## One model step (`benchmarks/model_step.py`)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads: a SmolLM-135M-shaped Llama (hidden 576, 30 "
        "layers, 9 heads, 3 KV heads, vocab 49152, tied; random weights). Decode: one token "
        f"for each of B sequences holding {args.context} tokens, mean of {args.steps} "
        f"consecutive steps; median of {args.repeats} alternating runs. tgi: tgi-llama over "
        "the paged cache (sdpa backend, block size 16), eager and with `--compile`; "
        "transformers: its forward with its own DynamicCache and sdpa attention. Reproduce "
        "with `make bench`.",
        "",
        "| dtype | step | tgi | tgi --compile | transformers | tgi / transformers | "
        "tgi --compile / transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype_name, rows in results.items():
        for name, ours, compiled, theirs in rows:
            lines.append(
                f"| {dtype_name} | {name} | {ours * 1000:.1f} ms | {compiled * 1000:.1f} ms | "
                f"{theirs * 1000:.1f} ms | {ours / theirs:.2f} | {compiled / theirs:.2f} |"
            )
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(Path(folder) / "smollm", LlamaConfig(**SMOLLM))
        results = {
            name: measure(path, name, args.batches, args.context, args.steps, args.repeats)
            for name in args.dtype
        }
    section = table(results, args)
    print(section)
    if args.write:
        write(args.write, section)


if __name__ == "__main__":
    main()
