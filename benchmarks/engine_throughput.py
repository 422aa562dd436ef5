"""Offline throughput: the engine serving 64 requests against transformers.generate.

Same process, same random-weight SmolLM-135M-shaped checkpoint, same prompts, same
dtype (the default dtype of this machine): 64 requests of 128 prompt tokens and 128
new tokens, greedy, EOS ignored. The engine gets all 64 at once (continuous batching
over the paged cache), eager and with ``compile`` (warmed up, untimed, first);
transformers runs ``generate`` with a static batch of 32, twice.

    python benchmarks/engine_throughput.py [--requests 64] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import LlamaConfig

from tgi_core.engine.requests import GenerateRequest, StoppingParams
from tgi_core.model.base import default_dtype
from tgi_core.model.fixtures import build_engine, load_reference, save_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from docs_section import write
from machine import describe_machine
from model_step import SMOLLM

BEGIN, END = "<!-- engine-throughput:begin -->", "<!-- engine-throughput:end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--static-batch", type=int, default=32)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = default_dtype()
    prompts = torch.randint(3, SMOLLM["vocab_size"], (args.requests, args.prompt))
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(Path(folder) / "smollm", LlamaConfig(**SMOLLM))
        blocks = args.requests * (-(-(args.prompt + args.new) // 16) + 1)
        requests = [
            GenerateRequest(
                request_id=f"r{i}",
                prompt_token_ids=tuple(p.tolist()),
                stopping=StoppingParams(max_new_tokens=args.new, ignore_eos=True),
            )
            for i, p in enumerate(prompts)
        ]
        runs: dict[str, tuple[int, float]] = {}
        for compile in (False, True):
            engine = build_engine(
                path, dtype=dtype, num_blocks=blocks, block_size=16, compile=compile
            )
            engine.warm_up()
            start = time.perf_counter()
            streams = engine.run(requests)
            seconds = time.perf_counter() - start
            generated = sum(len(events) for events in streams.values())
            label = "tgi engine --compile" if compile else "tgi engine"
            runs[label] = (generated, seconds)
            print(f"{label}: {generated} tokens in {seconds:.1f} s", flush=True)
        model = load_reference(path, dtype)
        model.config._attn_implementation = "sdpa"
        start = time.perf_counter()
        theirs_tokens = 0
        with torch.inference_mode():
            for first in range(0, args.requests, args.static_batch):
                batch = prompts[first : first + args.static_batch]
                out = model.generate(
                    batch,
                    attention_mask=torch.ones_like(batch),
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    do_sample=False,
                    pad_token_id=0,
                )
                theirs_tokens += (out.shape[1] - args.prompt) * out.shape[0]
        theirs = time.perf_counter() - start
        print(f"transformers: {theirs_tokens} tokens in {theirs:.1f} s", flush=True)
    name = str(dtype).removeprefix("torch.")
    lines = [
        BEGIN,
        "## Offline engine throughput (`benchmarks/engine_throughput.py`)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {describe_machine()}, {name} "
        "(this machine's default), "
        f"{args.requests} requests of {args.prompt} prompt "
        f"tokens and {args.new} new tokens, greedy, on the SmolLM-135M-shaped checkpoint. "
        f"tgi: all requests submitted at once to the engine (paged cache, block size 16, "
        f"4096-token step budget), eager and with `--compile` (after a warm-up). "
        f"transformers: `generate` with a static batch of {args.static_batch}, sdpa "
        "attention. Same process, same prompts.",
        "",
        "| system | generated tokens | seconds | tokens/s | vs transformers |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {generated} | {seconds:.1f} | {generated / seconds:.1f} | "
            f"{(generated / seconds) / (theirs_tokens / theirs):.2f}x |"
            for label, (generated, seconds) in runs.items()
        ),
        f"| transformers generate | {theirs_tokens} | {theirs:.1f} | "
        f"{theirs_tokens / theirs:.1f} | 1.00x |",
        END,
    ]
    section = "\n".join(lines)
    print(section)
    if args.write:
        write(args.write, section)


if __name__ == "__main__":
    main()
