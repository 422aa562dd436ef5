"""T5 throughput: the engine serving 32 requests against transformers.generate.

Same process, same random-weight t5-small-shaped checkpoint (d_model 512, 6+6 layers,
8 heads, d_ff 2048, vocab 32128), same sources, same dtype (this machine's default):
32 requests of 128 source tokens and 64 new tokens, greedy, EOS ignored. The engine
gets all 32 at once (sources encoded on admission, continuous batching over the paged
cache), eager and with ``compile`` (warmed up, untimed, first); transformers runs
``generate`` with one static batch of 32.

    python benchmarks/t5_throughput.py [--requests 32] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import AutoModelForSeq2SeqLM, T5Config

from tgi_core.engine.requests import GenerateRequest, StoppingParams
from tgi_core.model.base import default_dtype
from tgi_core.model.fixtures import build_engine, save_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from docs_section import write
from machine import describe_machine

BEGIN, END = "<!-- t5-throughput:begin -->", "<!-- t5-throughput:end -->"
T5_SMALL = dict(
    vocab_size=32128,
    d_model=512,
    d_kv=64,
    d_ff=2048,
    num_layers=6,
    num_decoder_layers=6,
    num_heads=8,
    feed_forward_proj="relu",
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--source", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds (median)")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = default_dtype()
    sources = torch.randint(3, T5_SMALL["vocab_size"], (args.requests, args.source))
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(Path(folder) / "t5", T5Config(**T5_SMALL), weight_std=0.05)
        blocks = args.requests * (-(-max(args.source, args.new + 1) // 16) + 1)
        requests = [
            GenerateRequest(
                request_id=f"r{i}",
                prompt_token_ids=tuple(s.tolist()),
                stopping=StoppingParams(max_new_tokens=args.new, ignore_eos=True),
            )
            for i, s in enumerate(sources)
        ]
        engines = {}
        for compile in (False, True):
            engine = build_engine(
                path,
                dtype=dtype,
                num_blocks=blocks,
                block_size=16,
                decoder_start_token_id=0,
                compile=compile,
            )
            engine.warm_up()
            engines["tgi engine --compile" if compile else "tgi engine"] = engine
        model = AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=dtype).eval()

        def generate() -> int:
            with torch.inference_mode():
                out = model.generate(
                    sources,
                    attention_mask=torch.ones_like(sources),
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    do_sample=False,
                )
            return (out.shape[1] - 1) * out.shape[0]  # less the start token

        # each system's median over alternating rounds: one round lasts under 2 s
        seconds: dict[str, list[float]] = {name: [] for name in [*engines, "transformers"]}
        for _ in range(args.repeats):
            for label, engine in engines.items():
                start = time.perf_counter()
                streams = engine.run(requests)
                seconds[label].append(time.perf_counter() - start)
                generated = sum(len(events) for events in streams.values())
            start = time.perf_counter()
            theirs_tokens = generate()
            seconds["transformers"].append(time.perf_counter() - start)
        runs = {label: (generated, statistics.median(seconds[label])) for label in engines}
        theirs = statistics.median(seconds["transformers"])
        for label, (count, median) in runs.items():
            print(f"{label}: {count} tokens in {median:.2f} s", flush=True)
        print(f"transformers: {theirs_tokens} tokens in {theirs:.2f} s", flush=True)
    name = str(dtype).removeprefix("torch.")
    lines = [
        BEGIN,
        "## T5 throughput (`benchmarks/t5_throughput.py`)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {describe_machine()}, {name} "
        "(this machine's default), "
        f"{args.requests} requests of {args.source} source "
        f"tokens and {args.new} new tokens, greedy, EOS ignored, on a t5-small-shaped "
        "checkpoint (d_model 512, 6+6 layers, 8 heads, d_ff 2048, vocab 32128). tgi: all "
        "requests submitted at once to the engine (sources encoded on admission, paged "
        "cache, block size 16), eager and with `--compile` (after a warm-up). "
        "transformers: `generate` with one static batch, its default "
        f"attention. Same process, same sources; median of {args.repeats} alternating rounds.",
        "",
        "| system | generated tokens | seconds | tokens/s | vs transformers |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {count} | {median:.2f} | {count / median:.1f} | "
            f"{(count / median) / (theirs_tokens / theirs):.2f}x |"
            for label, (count, median) in runs.items()
        ),
        f"| transformers generate | {theirs_tokens} | {theirs:.2f} | "
        f"{theirs_tokens / theirs:.1f} | 1.00x |",
        END,
    ]
    section = "\n".join(lines)
    print(section)
    if args.write:
        write(args.write, section)


if __name__ == "__main__":
    main()
