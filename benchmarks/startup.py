"""Cold-start cost of the CLI and the plugin system, against ``import torch``.

Listing plugins and printing help must stay fast because they never import torch:
each command runs in a fresh interpreter, alternating, ``--repeats`` times, and the
median wall time is reported.

    python benchmarks/startup.py [--repeats 7] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from docs_section import write

COMMANDS = {
    "python -c pass (interpreter floor)": [sys.executable, "-c", "pass"],
    "import tgi_core.plugins": [sys.executable, "-c", "import tgi_core.plugins"],
    "tgi-core plugins --json": [sys.executable, "-m", "tgi_core.cli", "plugins", "--json"],
    "tgi-core serve --help": [sys.executable, "-m", "tgi_core.cli", "serve", "--help"],
    "import torch (for scale)": [sys.executable, "-c", "import torch"],
}
BEGIN, END = "<!-- startup:begin -->", "<!-- startup:end -->"


def measure(repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for command in COMMANDS.values():  # warm the file cache once
        subprocess.run(command, check=True, capture_output=True)
    for _ in range(repeats):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def table(medians: dict[str, float], repeats: int) -> str:
    torch_time = medians["import torch (for scale)"]
    lines = [
        BEGIN,
        "## Startup (`benchmarks/startup.py`)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {platform.machine()}, Python "
        f"{platform.python_version()}; median of {repeats} fresh interpreters each, run "
        "alternately. Reproduce with `make bench`.",
        "",
        "| command | median wall time | vs `import torch` |",
        "|---|---|---|",
    ]
    for name, seconds in medians.items():
        lines.append(f"| `{name}` | {seconds * 1000:.0f} ms | {seconds / torch_time:.2f}× |")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--write", type=Path, help="update this Markdown file's section")
    args = parser.parse_args()
    section = table(measure(args.repeats), args.repeats)
    print(section)
    if args.write:
        write(args.write, section)


if __name__ == "__main__":
    main()
