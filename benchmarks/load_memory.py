"""Peak memory while loading a checkpoint, against the size of the loaded weights.

Each case runs in a fresh process: after the imports, the model is loaded while a thread
samples the process's anonymous (private) memory every 2 ms; the growth of its peak is
compared with the bytes of the model's parameters. The loader copies each tensor into
its parameter in 16 MiB slices, so the peak should stay near 1x the weights. The peak
resident set size (``VmHWM``) is reported too: it also counts the checkpoint's pages
that safetensors maps from the file while reading, which belong to the page cache and
are reclaimable, not to the process.

    python benchmarks/load_memory.py [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

BEGIN, END = "<!-- load-memory:begin -->", "<!-- load-memory:end -->"
CHILD = """
import json, sys
import torch, transformers
from tgi_core.model.base import DTYPES, ModelContext
from tgi_core.model.loader import load_model
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

import threading, time
from transformers import AutoConfig
registry = Registry.build(make_plugin_manager())
AutoConfig.from_pretrained(sys.argv[1])  # transformers' config classes, imported once
open("/proc/self/clear_refs", "w").write("5")
before_rss, before_anon = status("VmRSS"), status("RssAnon")
peak_anon, done = [before_anon], []
def sample():
    while not done:
        peak_anon.append(status("RssAnon"))
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
model = load_model(sys.argv[1], registry, ctx=ModelContext(dtype=DTYPES[sys.argv[2]])).model
done.append(True)
sampler.join()
peak = max(peak_anon) - before_anon
peak_rss = status("VmHWM") - before_rss
weights = sum(p.numel() * p.element_size() for p in model.parameters())
largest = max(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak": peak, "peak_rss": peak_rss, "weights": weights,
                  "largest": largest}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from docs_section import write
    from model_step import SMOLLM
    from transformers import LlamaConfig

    from tgi_core.model.fixtures import save_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(Path(folder) / "smollm", LlamaConfig(**SMOLLM))
        for dtype in ("float32", "bfloat16"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), dtype],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            result = json.loads(out.strip().splitlines()[-1])
            rows.append((dtype, result))
            print(dtype, result, f"ratio {result['peak'] / result['weights']:.2f}", flush=True)
    lines = [
        BEGIN,
        "## Peak memory while loading (`benchmarks/load_memory.py`)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d}: the SmolLM-135M-shaped checkpoint (float32 "
        "safetensors, tied embeddings) loaded in a fresh process; growth of the peak resident "
        "anonymous memory during `load_model` against the bytes of the loaded parameters "
        "(and the peak resident set size, which also counts the file pages safetensors "
        "maps while reading: page cache, reclaimable).",
        "",
        "| load as | weights | largest tensor | peak anonymous growth | peak / weights "
        "| peak RSS growth (incl. mapped file) |",
        "|---|---|---|---|---|---|",
    ]
    mib = 1024 * 1024
    for dtype, r in rows:
        lines.append(
            f"| {dtype} | {r['weights'] / mib:.0f} MiB | {r['largest'] / mib:.0f} MiB "
            f"| {r['peak'] / mib:.0f} MiB | {r['peak'] / r['weights']:.2f} "
            f"| {r['peak_rss'] / mib:.0f} MiB |"
        )
    lines.append(END)
    section = "\n".join(lines)
    print(section)
    if args.write:
        write(args.write, section)


if __name__ == "__main__":
    main()
