"""What ``tgi-core bench`` prints: a table per sweep, or JSON with ``--json``."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from tgi_core.bench.stats import Distribution, LevelReport
from tgi_core.listing import print_table


def as_json(settings: dict[str, Any], reports: Sequence[LevelReport]) -> dict[str, Any]:
    """``{"settings": {...}, "levels": [one object per concurrency level]}``; times in
    seconds, distributions as ``{count, mean, p50, p95, min, max}`` or null."""
    return {"settings": settings, "levels": [dataclasses.asdict(r) for r in reports]}


def _ms(dist: Distribution | None, key: str) -> str:
    return "-" if dist is None else f"{getattr(dist, key) * 1000:.1f}"


def _s(dist: Distribution | None, key: str) -> str:
    return "-" if dist is None else f"{getattr(dist, key):.2f}"


def _mean(dist: Distribution | None) -> str:
    return "-" if dist is None else f"{dist.mean:.0f}"


def table(reports: Sequence[LevelReport]) -> Table:
    """One row per concurrency level."""
    result = Table(box=None, pad_edge=False, header_style="bold")
    for title in (
        "clients",
        "requests",
        "errors",
        "short",
        "prompt\ntokens",
        "output\ntokens",
        "output\ntokens/s",
        "req/s",
        "TTFT p50\nms",
        "TTFT p95\nms",
        "ITL p50\nms",
        "ITL p95\nms",
        "e2e p50\ns",
        "e2e p95\ns",
    ):
        result.add_column(title, justify="right")
    for r in reports:
        result.add_row(
            str(r.concurrency),
            str(r.requests),
            str(r.errors),
            str(r.short),
            _mean(r.prompt_tokens),
            _mean(r.output_tokens_per_request),
            f"{r.output_tokens_per_s:.1f}",
            f"{r.requests_per_s:.2f}",
            _ms(r.ttft_s, "p50"),
            _ms(r.ttft_s, "p95"),
            _ms(r.itl_s, "p50"),
            _ms(r.itl_s, "p95"),
            _s(r.e2e_s, "p50"),
            _s(r.e2e_s, "p95"),
        )
    return result


def print_report(reports: Sequence[LevelReport], shown_errors: int = 3) -> None:
    """The table on stdout (prompt and output tokens are means per request), then the
    most frequent error messages of each level that had errors."""
    print_table(table(reports))
    for r in reports:
        messages = list(r.error_messages.items())
        for message, count in messages[:shown_errors]:
            print(f"{r.concurrency} clients: {count} x {message}")
        if len(messages) > shown_errors:
            rest = sum(count for _, count in messages[shown_errors:])
            print(f"{r.concurrency} clients: {rest} more errors (--json lists them all)")
    sys.stdout.flush()
