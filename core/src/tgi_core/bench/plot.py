"""The PNG of a sweep: throughput and latencies against concurrency (matplotlib, the
``plot`` extra of tgi-core, imported only here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tgi_core.bench.stats import Distribution, LevelReport
from tgi_core.errors import TGIError


class PlotError(TGIError):
    """matplotlib is missing."""


def _series(reports: Sequence[LevelReport], attr: str, key: str) -> list[float]:
    values: list[float] = []
    for r in reports:
        dist: Distribution | None = getattr(r, attr)
        values.append(float("nan") if dist is None else getattr(dist, key) * 1000)
    return values


def write_plot(reports: Sequence[LevelReport], path: str | Path, title: str = "") -> Path:
    """Four panels against concurrency: output tokens/s, TTFT, ITL and end-to-end
    latency (p50 and p95, in ms), saved as a PNG at ``path``."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError(
            "--plot needs matplotlib: pip install 'tgi-core[plot]' (or matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [r.concurrency for r in reports]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    panels = (
        (axes[0][0], "output tokens/s", None),
        (axes[0][1], "time to first token (ms)", "ttft_s"),
        (axes[1][0], "inter-token latency (ms)", "itl_s"),
        (axes[1][1], "end-to-end latency (ms)", "e2e_s"),
    )
    for ax, label, attr in panels:
        if attr is None:
            ax.plot(clients, [r.output_tokens_per_s for r in reports], marker="o")
        else:
            ax.plot(clients, _series(reports, attr, "p50"), marker="o", label="p50")
            ax.plot(clients, _series(reports, attr, "p95"), marker="s", label="p95")
            ax.legend()
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        if len(clients) > 1 and min(clients) > 0 and max(clients) / min(clients) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.grid(True, alpha=0.3)
    if title:
        figure.suptitle(title)
    out = Path(path)
    figure.savefig(out, format="png", dpi=110)
    plt.close(figure)
    return out
