"""Write a benchmark's section into docs/benchmarks.md, between its markers."""

from __future__ import annotations

from pathlib import Path


def write(path: Path, section: str) -> None:
    """Replace the section between its ``<!-- name:begin -->``/``end`` markers, or append it."""
    begin = section.splitlines()[0]
    end = section.splitlines()[-1]
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
