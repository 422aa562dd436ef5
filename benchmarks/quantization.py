"""Quantization side by side: weight memory, tokens/s and perplexity for bf16, int8, int4, nf4.

For each shape (random-weight SmolLM-135M- and Qwen2.5-0.5B-shaped checkpoints), each
method runs in a fresh process, ``--rounds`` times in alternating order (medians are
reported, since the machines are shared): the model is loaded in bfloat16
(this CPU's default dtype) and quantized while loading; the process reports the bytes
of the linear layers' weights and of the whole model (parameters and buffers), its
resident set size after loading (and the growth from loading), then the engine's
greedy throughput for 1 stream (the median of ``--repeats`` runs: it is short, and one
slow second of a shared machine moves it) and for 32 concurrent streams (all submitted
at once, EOS ignored), after a short warm-up. Quality: perplexity of the demo model (the
``demo`` model source of tgi-demo, or ``--demo-model DIR``) on held-out Python text,
in windows of ``--ppl-window`` tokens, with each method (by default the demo's own
held-out split of the standard library, which it never trained on).

Targets (issue 10): int8 single-stream >= 1.5x bf16 on the SmolLM shape; int8 weights
<= 55% of bf16's bytes; perplexity within 1% of bf16 for int8 and 5% for 4-bit.

    python benchmarks/quantization.py [--write docs/benchmarks.md]

With ``--compile`` each process serves its model compiled (``torch.compile``, warmed up
first, as ``tgi-core serve --compile`` does), the perplexity is skipped (compiling
changes no weight), and the table goes to its own section of the docs
(``quantization-compiled``), beside the eager one:

    python benchmarks/quantization.py --compile --methods bf16 int8 --shapes smollm \
        --write docs/benchmarks.md

Smoke run (a tiny shape, a few tokens, a part of the held-out text):

    python benchmarks/quantization.py --shapes tiny --streams 1 4 --prompt 8 --new 8 \
        --rounds 1 --repeats 1 --ppl-tokens 2048 --ppl-window 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from machine import describe_machine
from shapes import QWEN25_05B, SMOLLM_135M


def markers(compiled: bool) -> tuple[str, str]:
    """The docs section's begin and end markers: eager and compiled runs have their own."""
    name = "quantization-compiled" if compiled else "quantization"
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


SHAPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "smollm": (
        "SmolLM-135M",
        "LlamaConfig",
        SMOLLM_135M,
    ),
    "qwen": (
        "Qwen2.5-0.5B",
        "Qwen2Config",
        QWEN25_05B,
    ),
    "tiny": (
        "tiny (smoke runs)",
        "LlamaConfig",
        dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        ),
    ),
}
#: method name -> (--quantize, plugin sections)
METHODS: dict[str, tuple[str | None, dict[str, dict[str, Any]]]] = {
    "bf16": (None, {}),
    "int8": ("int8", {}),
    "int4": ("int4", {"int4": {"group_size": 64}}),
    "nf4": ("bitsandbytes-nf4", {}),
}

CHILD_COMMON = """
import json, statistics, sys, time
import torch
from tgi_core.model.base import ModelContext
from tgi_core.model.layers.linear import LinearBase
from tgi_core.model.loader import load_model
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def tensor_bytes(modules):
    seen = {}
    for module in modules:
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())

def sections(registry, raw):
    out = {}
    for name, values in raw.items():
        out[name] = registry.config_sections[name].schema(**values)
    return out

args = json.loads(sys.argv[1])
registry = Registry.build(make_plugin_manager())
torch.manual_seed(0)
"""

CHILD_SPEED = (
    CHILD_COMMON
    + """
from tgi_core.engine.engine import Engine, EngineConfig
from tgi_core.engine.model_runner import ModelRunner
from tgi_core.engine.requests import GenerateRequest, StoppingParams

from transformers import AutoConfig
AutoConfig.from_pretrained(args["path"])  # transformers' config classes, imported once
before = status("VmRSS")
loaded = load_model(args["path"], registry, ctx=ModelContext(dtype=torch.bfloat16),
                    quantize=args["quantize"], plugin_sections=sections(registry, args["sections"]))
model = loaded.model
result = {
    "rss": status("VmRSS"), "rss_growth": status("VmRSS") - before, "peak_rss": status("VmHWM"),
    "linear_bytes": tensor_bytes(m for m in model.modules() if isinstance(m, LinearBase)),
    "total_bytes": tensor_bytes(model.modules()),
}
streams, prompt, new = max(args["streams"]), args["prompt"], args["new"]
blocks = streams * (-(-(prompt + new) // 16) + 1)
runner = ModelRunner(model, registry.attention_backends["sdpa"].load()(), num_blocks=blocks,
                     block_size=16, model_dtype=torch.bfloat16, compile=args["compile"])
engine = Engine(runner, EngineConfig(num_blocks=blocks, block_size=16, eos_token_ids=()))
vocab = model.config.vocab_size
def run(count, prompt, new, tag):
    requests = [GenerateRequest(request_id=f"{tag}{i}",
                                prompt_token_ids=tuple(torch.randint(3, vocab, (prompt,)).tolist()),
                                stopping=StoppingParams(max_new_tokens=new, ignore_eos=True))
                for i in range(count)]
    start = time.perf_counter()
    out = engine.run(requests)
    return sum(len(events) for events in out.values()) / (time.perf_counter() - start)
if args["compile"]:
    engine.warm_up()  # compiles the prefill and the one-token graphs
run(2, 16, 4, "warm")
def measure(count):  # a single stream is short and noisy: its median of a few runs
    runs = args["repeats"] if count == 1 else 1
    return statistics.median(run(count, prompt, new, f"s{count}-{i}-") for i in range(runs))
result["tokens_per_s"] = {str(n): measure(n) for n in args["streams"]}
print(json.dumps(result))
"""
)

CHILD_PERPLEXITY = (
    CHILD_COMMON
    + """
from transformers import AutoTokenizer
from tgi_core.model.runner import PagedRunner

loaded = load_model(args["path"], registry, ctx=ModelContext(dtype=torch.bfloat16),
                    quantize=args["quantize"], plugin_sections=sections(registry, args["sections"]))
tokenizer = AutoTokenizer.from_pretrained(args["path"])
text = "\\n".join(open(path, encoding="utf-8", errors="ignore").read() for path in args["files"])
ids = tokenizer.encode(text)[: args["tokens"]]
window = args["window"]
backend = registry.attention_backends["sdpa"].load()()
runner = PagedRunner(loaded.model, backend, num_blocks=-(-window // 16) + 1, block_size=16,
                     model_dtype=torch.bfloat16)
nll, count = 0.0, 0
for start in range(0, len(ids) - 1, window):
    chunk = ids[start : start + window + 1]
    if len(chunk) < 2:
        break
    seq = runner.add(chunk[:-1])
    logits = runner.step([seq], all_logits=True)[0].float()
    runner.free(seq)
    targets = torch.tensor(chunk[1:])
    nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    count += len(targets)
print(json.dumps({"perplexity": float(torch.exp(torch.tensor(nll / count))), "tokens": count}))
"""
)


def child(code: str, payload: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(payload)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def save_shape(folder: Path, shape: str, layers: int | None) -> Path:
    import torch
    import transformers

    from tgi_core.model.fixtures import save_checkpoint

    _, config_class, values = SHAPES[shape]
    values = dict(values, **({"num_hidden_layers": layers} if layers else {}))
    config = getattr(transformers, config_class)(**values)
    # transformers' default init (0.02) keeps a random model's activations sane
    return save_checkpoint(
        folder / shape, config, dtype=torch.bfloat16, init_std=0.02, weight_std=0.02
    )


def held_out_files(given: list[Path] | None) -> tuple[list[str], str]:
    """The text for perplexity, and how to name it: the given files (every .py under
    given folders), else the demo model's held-out split of the standard library (files
    it never trained on; ``tgi_demo.corpus``), else the standard library's [t-z]*.py."""
    if given:
        files = [f for g in given for f in (sorted(g.rglob("*.py")) if g.is_dir() else [g])]
        return [str(f) for f in files], ", ".join(str(g) for g in given)
    try:
        from tgi_demo.corpus import split, stdlib_folder, stdlib_sources
    except ImportError:
        files = sorted(Path(os.__file__).parent.glob("[t-z]*.py"))
        return [str(f) for f in files], "the standard library's [t-z]*.py"
    _, held_out = split(stdlib_sources())
    root = stdlib_folder()
    return [str(root / f.path) for f in held_out], (
        f"the demo model's {len(held_out)} held-out standard-library files"
    )


def demo_dir(given: Path | None) -> Path | None:
    if given is not None:
        return given
    from tgi_core.errors import ConfigError
    from tgi_core.model.sources import resolve_model_id
    from tgi_core.plugins import make_plugin_manager
    from tgi_core.registry import Registry

    try:
        folder, _, _ = resolve_model_id("demo", Registry.build(make_plugin_manager()))
    except ConfigError as exc:
        print(f"no demo model ({exc}); perplexity skipped", flush=True)
        return None
    return Path(folder)


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's memory figures, with each stream count's median tokens/s."""
    merged = dict(results[0])
    merged["tokens_per_s"] = {
        streams: statistics.median(r["tokens_per_s"][streams] for r in results)
        for streams in results[0]["tokens_per_s"]
    }
    return merged


def mib(value: float) -> str:
    return f"{value / 2**20:.0f} MiB" if value >= 2**20 else f"{value / 2**10:.0f} KiB"


def section(
    args: argparse.Namespace,
    speed: dict[str, dict[str, dict[str, Any]]],
    quality: dict[str, dict[str, Any]],
) -> str:
    single, multi = str(min(args.streams)), str(max(args.streams))
    begin, end = markers(args.compile)
    title = "Quantization, compiled (`benchmarks/quantization.py --compile`)"
    lines = [
        begin,
        f"## {title if args.compile else 'Quantization (`benchmarks/quantization.py`)'}",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {describe_machine()}. Random-weight checkpoints "
        "saved in bfloat16; each method in a fresh process, the model in bfloat16 "
        "(activations too), quantized while loading: int8 per output channel (tgi-core's "
        "packed-weight kernel where the CPU has AMX, or AVX-512 BF16 and VBMI, else "
        "`_weight_int8pack_mm`), int4 group-wise, groups "
        "of 64 "
        "(`_weight_int4pack_mm_for_cpu`), nf4 through bitsandbytes (its fused CPU kernel). "
        "int8 also quantizes the (tied) embedding and LM head table; the other methods keep "
        "it bfloat16. Weights: bytes of the parameters "
        "and buffers of the linear layers / of the whole model. RSS: the process after "
        f"loading (growth from loading in brackets). Throughput: greedy, {args.prompt} "
        f"prompt tokens and {args.new} new per request, EOS ignored, {single} stream and "
        f"{multi} streams submitted at once to the engine; the median of {args.rounds} "
        "processes of each method, in alternating order (in each process, the single "
        f"stream's figure is the median of {args.repeats} runs)."
        + (
            " Compiled: each model served through `torch.compile` (warmed up before timing); "
            "perplexity in the eager section above."
            if args.compile
            else ""
        ),
        "",
        (
            "| shape | method | linear weights | vs bf16 | all weights | RSS | "
            + "".join(f"{n}-stream tok/s | vs bf16 | " for n in dict.fromkeys([single, multi]))
        ).rstrip(),
        "|---|---|---|---|---|---|" + "---|---|" * len(dict.fromkeys([single, multi])),
    ]
    for shape, rows in speed.items():
        for method, result in rows.items():
            lines.append(row(shape, method, result, rows.get("bf16"), [single, multi]))
    targets = []
    smollm = speed.get("smollm", {})
    if "bf16" in smollm and "int8" in smollm:
        b, i = smollm["bf16"], smollm["int8"]
        speedup = i["tokens_per_s"][single] / b["tokens_per_s"][single]
        share = i["linear_bytes"] / b["linear_bytes"]
        share_all = i["total_bytes"] / b["total_bytes"]
        targets += [
            f"- int8 single-stream on the SmolLM shape: {speedup:.2f}x bf16 (target >= 1.5x: "
            f"{'met' if speedup >= 1.5 else 'not met'}).",
            f"- int8 weights: {share:.0%} of bf16's bytes in the linear layers (target <= 55%: "
            f"{'met' if share <= 0.55 else 'not met'}); {share_all:.0%} of the whole model, "
            "the embedding and LM head table included.",
        ]
    if quality:
        base = quality.get("bf16")
        tokens = next(iter(quality.values()))["tokens"]
        lines += [
            "",
            f"Perplexity of the demo model ({args.ppl_source}) on {tokens} "
            f"tokens of held-out Python text ({args.ppl_text}), windows of {args.ppl_window} "
            "tokens:",
            "",
            "| method | perplexity | vs bf16 | target |",
            "|---|---|---|---|",
        ]
        for method, r in quality.items():
            change = r["perplexity"] / base["perplexity"] - 1 if base else 0.0
            limit = {"bf16": None, "int8": 0.01}.get(method, 0.05)
            verdict = (
                "-"
                if limit is None
                else (f"within {limit:.0%}: {'met' if change <= limit else 'not met'}")
            )
            lines.append(f"| {method} | {r['perplexity']:.3f} | {change:+.2%} | {verdict} |")
    if targets:
        lines += ["", *targets]
    lines.append(end)
    return "\n".join(lines)


def row(
    shape: str,
    method: str,
    r: dict[str, Any],
    base: dict[str, Any] | None,
    streams: list[str],
) -> str:
    def versus(value: float, reference: float) -> str:
        return f"{value / reference:.2f}x" if base else "-"

    tps = r["tokens_per_s"]
    cells = "".join(
        f"{tps[n]:.1f} | {versus(tps[n], base['tokens_per_s'][n] if base else 1)} | "
        for n in dict.fromkeys(streams)
    )
    return (
        f"| {SHAPES[shape][0]} | {method} | {mib(r['linear_bytes'])} | "
        f"{versus(r['linear_bytes'], base['linear_bytes'] if base else 1)} | "
        f"{mib(r['total_bytes'])} | {mib(r['rss'])} (+{mib(r['rss_growth'])}) | {cells}"
    ).rstrip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["smollm", "qwen"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--streams", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="processes of each method (median)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="single-stream runs in each process (median)"
    )
    parser.add_argument("--layers", type=int, help="override every shape's layer count")
    parser.add_argument("--demo-model", type=Path, help="checkpoint for perplexity")
    parser.add_argument("--text", type=Path, nargs="+", help="held-out .py files or folders")
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--ppl-window", type=int, default=512)
    parser.add_argument("--compile", action="store_true", help="serve each model compiled")
    parser.add_argument("--write", type=Path, help="write the section into this file")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from docs_section import write

    speed: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes:
            path = save_shape(Path(folder), shape, args.layers)
            runs: dict[str, list[dict[str, Any]]] = {method: [] for method in args.methods}
            for round_ in range(args.rounds):  # alternate the order: drifts hit every method
                order = args.methods if round_ % 2 == 0 else args.methods[::-1]
                for method in order:
                    quantize, sections = METHODS[method]
                    payload = {
                        "path": str(path),
                        "quantize": quantize,
                        "sections": sections,
                        "streams": args.streams,
                        "prompt": args.prompt,
                        "new": args.new,
                        "compile": args.compile,
                        "repeats": args.repeats,
                    }
                    runs[method].append(child(CHILD_SPEED, payload))
                    print(shape, method, json.dumps(runs[method][-1]), flush=True)
            speed[shape] = {method: median_run(results) for method, results in runs.items()}
    quality: dict[str, dict[str, Any]] = {}
    model = demo_dir(args.demo_model)
    files, args.ppl_text = held_out_files(args.text)
    args.ppl_source = "--demo-model" if args.demo_model else "the `demo` model source"
    if model is not None and not args.compile:
        for method in args.methods:
            quantize, sections = METHODS[method]
            payload = {
                "path": str(model),
                "quantize": quantize,
                "sections": sections,
                "files": files,
                "tokens": args.ppl_tokens,
                "window": args.ppl_window,
            }
            quality[method] = child(CHILD_PERPLEXITY, payload)
            print("perplexity", method, json.dumps(quality[method]), flush=True)
    text = section(args, speed, quality)
    print(text)
    if args.write:
        write(args.write, text)


if __name__ == "__main__":
    main()
