"""Peak memory while loading a checkpoint, against the size of the loaded weights.

Each case runs in a fresh process: after the imports, the peak resident set size is
reset (``/proc/self/clear_refs``), the model is loaded, and the growth of the peak
(``VmHWM``) is compared with the bytes of the model's parameters. The loader reads one
tensor at a time, so the peak should stay near 1x the weights plus the largest tensor.

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

registry = Registry.build(make_plugin_manager())
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
model = load_model(sys.argv[1], registry, ctx=ModelContext(dtype=DTYPES[sys.argv[2]])).model
peak = status("VmHWM") - before
weights = sum(p.numel() * p.element_size() for p in model.parameters())
largest = max(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak": peak, "weights": weights, "largest": largest}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from model_step import SMOLLM, write
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
        "set size during `load_model` against the bytes of the loaded parameters.",
        "",
        "| load as | weights | largest tensor | peak growth | peak / weights |",
        "|---|---|---|---|---|",
    ]
    mib = 1024 * 1024
    for dtype, r in rows:
        lines.append(
            f"| {dtype} | {r['weights'] / mib:.0f} MiB | {r['largest'] / mib:.0f} MiB "
            f"| {r['peak'] / mib:.0f} MiB | {r['peak'] / r['weights']:.2f} |"
        )
    lines.append(END)
    section = "\n".join(lines)
    print(section)
    if args.write:
        write(args.write, section)


if __name__ == "__main__":
    main()
