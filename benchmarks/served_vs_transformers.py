"""Served tgi (HTTP, streaming) against transformers.generate, side by side, in one run.

For each checkpoint shape (random weights saved by transformers, a word-level tokenizer
so every prompt has exactly the asked number of tokens):

- **streams**: `tgi-core serve` is started as a subprocess and loaded by `tgi-core
  bench`'s load generator (OpenAI `/v1/completions`, streamed, greedy, `ignore_eos` so
  every request generates all its tokens; prompts sent as token ids, because
  transformers 5 loads a Qwen2 checkpoint's tokenizer as its own byte-level BPE class,
  which cannot read a word-level tokenizer.json): S concurrent clients, each sending
  ``--rounds`` requests back to back. transformers runs ``generate`` on the very same
  prompts, in static batches of S (``min_new_tokens`` so no sequence stops early), in
  each of ``--hf-dtypes``; its faster dtype is the reference of the ratio.
- **prefix**: every prompt starts with the same ``--prefix``-token system prompt; the
  server runs once with prefix caching and once without (``--no-prefix-caching``), and
  time to first token is compared.

    python benchmarks/served_vs_transformers.py --write docs/benchmarks.md
    python benchmarks/served_vs_transformers.py --shapes smollm --streams 1 2 \\
        --prompt 16 --new 8 --rounds 1 --layers 2 --vocab-size 4096 --prefix 32   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from tgi_core.bench.command import BenchSettings, Plans, make_plans, run_plans
from tgi_core.bench.stats import LevelReport, summarize
from tgi_core.bench.workload import LengthRange, PlannedRequest, TokenizerPrompts
from tgi_core.model.fixtures import save_checkpoint, train_word_level_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from docs_section import write
from machine import describe_machine
from shapes import QWEN25_05B, SMOLLM_135M

BEGIN, END = "<!-- served-vs-transformers:begin -->", "<!-- served-vs-transformers:end -->"
SPECIAL = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
SHAPES: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "smollm": (
        "SmolLM-135M-shaped Llama",
        LlamaConfig,
        SMOLLM_135M,
    ),
    "qwen": (
        "Qwen2.5-0.5B-shaped Qwen2",
        Qwen2Config,
        QWEN25_05B,
    ),
}


@dataclass
class StreamsRow:
    shape: str
    streams: int
    served: LevelReport
    hf: dict[str, float]  # dtype -> tokens/s


@dataclass
class PrefixRow:
    shape: str
    streams: int
    on: LevelReport
    off: LevelReport


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`tgi-core serve` in a subprocess, stopped with SIGTERM on exit."""

    def __init__(self, checkpoint: Path, log: Path, *flags: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("MODEL_ID", "PORT", "DTYPE")}
        command = [
            sys.executable, "-m", "tgi_core.cli", "serve", "--model-id", str(checkpoint),
            "--hostname", "127.0.0.1", "--port", str(self.port), "--json-output", *flags,
        ]  # fmt: skip
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 900
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the server is not healthy after 900 s ({self.log})")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def __exit__(self, *_: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve_and_load(
    checkpoint: Path, log: Path, flags: list[str], settings: BenchSettings, plans: Plans
) -> list[LevelReport]:
    with Server(checkpoint, log, *flags) as server:
        target = replace(settings, url=server.base).target()
        runs = asyncio.run(run_plans(target, plans))
    return [summarize(run) for run in runs]


@torch.inference_mode()
def hf_tokens_per_s(model: Any, prompts: list[list[int]], streams: int, new: int) -> float:
    """``generate`` over ``prompts`` in static batches of ``streams``; tokens/s."""
    generated, elapsed = 0, 0.0
    for first in range(0, len(prompts), streams):
        batch = torch.tensor(prompts[first : first + streams])
        start = time.perf_counter()
        out = model.generate(
            batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=SPECIAL["pad_token_id"],
        )
        elapsed += time.perf_counter() - start
        generated += (out.shape[1] - batch.shape[1]) * out.shape[0]
    return generated / elapsed


def as_token_ids(maker: TokenizerPrompts, plans: Plans) -> Plans:
    """The plans with each prompt as its token ids (checked to be as long as planned)."""

    def convert(plan: list[PlannedRequest]) -> list[PlannedRequest]:
        converted = []
        for r in plan:
            assert isinstance(r.prompt, str)
            ids = tuple(maker.tokenizer.encode(r.prompt).ids)
            assert len(ids) == r.prompt_tokens, (len(ids), r.prompt_tokens)
            converted.append(replace(r, prompt=ids))
        return converted

    return Plans(convert(plans.warmup), [(c, convert(plan)) for c, plan in plans.levels])


def run_shape(
    name: str, args: argparse.Namespace, folder: Path
) -> tuple[list[StreamsRow], list[PrefixRow]]:
    title, config_class, shape = SHAPES[name]
    shape = dict(shape, **SPECIAL)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if args.vocab_size:
        shape["vocab_size"] = args.vocab_size
    checkpoint = folder / name
    print(f"[{name}] saving the checkpoint and training the tokenizer", flush=True)
    save_checkpoint(checkpoint, config_class(**shape))
    train_word_level_tokenizer(checkpoint, shape["vocab_size"])
    maker = TokenizerPrompts.load(checkpoint)
    server_flags = ["--dtype", args.server_dtype] if args.server_dtype else []
    if args.compile:
        server_flags.append("--compile")
    longest = max(args.prompt + args.new, args.prefix + args.prompt + args.prefix_new)
    kv_tokens = max([*args.streams, *args.prefix_streams]) * (longest + 16)
    server_flags += ["--max-batch-total-tokens", str(kv_tokens)]
    streams_rows: list[StreamsRow] = []
    prefix_rows: list[PrefixRow] = []

    if "streams" in args.workloads:
        settings = BenchSettings(
            api="openai",
            concurrency=tuple(args.streams),
            prompt_tokens=LengthRange(args.prompt, args.prompt),
            max_new_tokens=LengthRange(args.new, args.new),
            tokenizer=str(checkpoint),
            ignore_eos=True,
            requests_per_client=args.rounds,
            seed=args.seed,
            warmup=1,
        )
        plans = as_token_ids(maker, make_plans(settings, maker))
        print(f"[{name}] served: {', '.join(map(str, args.streams))} streams", flush=True)
        reports = serve_and_load(checkpoint, folder / f"{name}.log", server_flags, settings, plans)
        for report in reports:
            print(
                f"  {report.concurrency} streams: {report.output_tokens_per_s:.1f} tok/s, "
                f"{report.errors} errors, {report.short} short",
                flush=True,
            )
        hf: dict[int, dict[str, float]] = {s: {} for s in args.streams}
        for dtype in args.hf_dtypes:
            model = AutoModelForCausalLM.from_pretrained(
                str(checkpoint), dtype=getattr(torch, dtype), attn_implementation="sdpa"
            ).eval()
            for streams, plan in plans.levels:
                prompts = [list(r.prompt) for r in plan]
                hf_tokens_per_s(model, prompts[:streams], streams, 2)  # warm-up, this shape
                hf[streams][dtype] = hf_tokens_per_s(model, prompts, streams, args.new)
                print(
                    f"  transformers {dtype}, batch {streams}: {hf[streams][dtype]:.1f} tok/s",
                    flush=True,
                )
            del model
        streams_rows += [StreamsRow(title, r.concurrency, r, hf[r.concurrency]) for r in reports]

    if "prefix" in args.workloads:
        settings = BenchSettings(
            api="openai",
            concurrency=tuple(args.prefix_streams),
            prompt_tokens=LengthRange(args.prompt, args.prompt),
            max_new_tokens=LengthRange(args.prefix_new, args.prefix_new),
            shared_prefix=args.prefix,
            tokenizer=str(checkpoint),
            ignore_eos=True,
            requests_per_client=args.prefix_rounds,
            seed=args.seed + 1,
            warmup=1,
        )
        plans = as_token_ids(maker, make_plans(settings, maker))
        results = {}
        for caching in ("on", "off"):
            flags = server_flags + ([] if caching == "on" else ["--no-prefix-caching"])
            print(
                f"[{name}] shared {args.prefix}-token prefix, prefix caching {caching}", flush=True
            )
            results[caching] = serve_and_load(
                checkpoint, folder / f"{name}-prefix-{caching}.log", flags, settings, plans
            )
        prefix_rows += [
            PrefixRow(title, on.concurrency, on, off)
            for on, off in zip(results["on"], results["off"], strict=True)
        ]
    return streams_rows, prefix_rows


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def section(args: argparse.Namespace, streams: list[StreamsRow], prefix: list[PrefixRow]) -> str:
    dtype = args.server_dtype or "its default"
    lines = [
        BEGIN,
        "## Served vs transformers (`benchmarks/served_vs_transformers.py`)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {describe_machine()}. Random-weight checkpoints "
        f"saved by transformers, word-level tokenizers (every prompt exactly {args.prompt} "
        f"tokens). tgi: `tgi-core serve` ({dtype} dtype"
        f"{', `--compile`' if args.compile else ''}) in its own process, loaded over "
        f"HTTP by `tgi-core bench`'s client (OpenAI `/v1/completions`, streamed, greedy, "
        f"`ignore_eos`, prompts as token ids): S concurrent streams, {args.rounds} "
        f"request(s) each, {args.new} new tokens per request. transformers: `generate` "
        f"on the same prompts in static batches of S (sdpa attention, `min_new_tokens` = "
        f"`max_new_tokens`), in {' and '.join(args.hf_dtypes)}; the ratio is against its "
        f"faster dtype. Reproduce with `python benchmarks/served_vs_transformers.py "
        f"{' '.join(sys.argv[1:])}`.",
    ]
    if streams:
        head = "| model | streams | tgi tokens/s | TTFT p50 | ITL p50 | errors |"
        rule = "|---|---|---|---|---|---|"
        for dtype in args.hf_dtypes:
            head += f" transformers {dtype} tokens/s |"
            rule += "---|"
        lines += ["", head + " tgi / best transformers |", rule + "---|"]
        for row in streams:
            best = max(row.hf.values())
            served = row.served
            lines.append(
                f"| {row.shape} | {row.streams} | {served.output_tokens_per_s:.1f} | "
                f"{ms(served.ttft_s and served.ttft_s.p50)} | "
                f"{ms(served.itl_s and served.itl_s.p50)} | {served.errors} | "
                + "".join(f"{row.hf[d]:.1f} | " for d in args.hf_dtypes)
                + f"{served.output_tokens_per_s / best:.2f}x |"
            )
    if prefix:
        lines += [
            "",
            f"Shared system prompt: every prompt is the same {args.prefix}-token prefix and "
            f"{args.prompt} tokens of its own; {args.prefix_new} new tokens; S streams, "
            f"{args.prefix_rounds} requests each, after one warm-up request (which puts the "
            f"prefix in the cache). The server runs twice, with prefix caching on and off.",
            "",
            "| model | streams | TTFT p50 on | TTFT p50 off | TTFT p95 on | TTFT p95 off | "
            "TTFT p50 off / on | errors |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in prefix:
            on, off = row.on.ttft_s, row.off.ttft_s
            gain = f"{off.p50 / on.p50:.2f}x" if on and off else "-"
            lines.append(
                f"| {row.shape} | {row.streams} | {ms(on and on.p50)} | {ms(off and off.p50)} | "
                f"{ms(on and on.p95)} | {ms(off and off.p95)} | {gain} | "
                f"{row.on.errors + row.off.errors} |"
            )
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["smollm", "qwen"])
    parser.add_argument(
        "--workloads", nargs="+", choices=["streams", "prefix"], default=["streams", "prefix"]
    )
    parser.add_argument("--streams", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="requests per stream")
    parser.add_argument("--hf-dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--server-dtype", choices=["bfloat16", "float32", "float16"])
    parser.add_argument(
        "--compile", action="store_true", help="serve with --compile (torch.compile)"
    )
    parser.add_argument("--prefix", type=int, default=512, help="shared prefix tokens")
    parser.add_argument("--prefix-streams", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prefix-new", type=int, default=16)
    parser.add_argument("--prefix-rounds", type=int, default=4, help="requests per stream")
    parser.add_argument("--layers", type=int, help="override every shape's layer count")
    parser.add_argument("--vocab-size", type=int, help="override every shape's vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, help="write the section into this file")
    args = parser.parse_args()
    streams: list[StreamsRow] = []
    prefix: list[PrefixRow] = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.shapes:
            more_streams, more_prefix = run_shape(name, args, Path(folder))
            streams += more_streams
            prefix += more_prefix
    text = section(args, streams, prefix)
    print(text)
    if args.write:
        write(args.write, text)


if __name__ == "__main__":
    main()
