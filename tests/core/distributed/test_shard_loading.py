"""Each rank reads only its slices of the checkpoint and holds about half the weights.

The ranks are simulated in one process (``ParallelContext(rank, 2)`` without a process
group: loading needs no collective). What is measured: the bytes of every parameter a
rank holds, and the bytes it read from the safetensors files (``get_slice`` reads).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tgi_core.model.base import ModelContext
from tgi_core.model.loader import load_model
from tgi_core.model.parallel import ParallelContext
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry

#: The share of the whole model a rank of 2 may hold: half, plus what every rank holds
#: whole (norms, row-parallel biases; with one KV head, the key/value projections).
LIMITS = {"llama-2kv": 0.505, "llama-1kv": 0.53, "bloom": 0.51, "t5": 0.505}


@pytest.mark.parametrize("model", sorted(LIMITS))
def test_a_rank_holds_and_reads_about_half(shard_checkpoints: dict[str, Path], model: str) -> None:
    registry = Registry.build(make_plugin_manager())
    path = str(shard_checkpoints[model])
    whole = load_model(path, registry, ctx=ModelContext(tp=ParallelContext()))
    ranks = [
        load_model(path, registry, ctx=ModelContext(tp=ParallelContext(rank, 2)))
        for rank in range(2)
    ]
    for rank in ranks:
        assert rank.weight_bytes <= LIMITS[model] * whole.weight_bytes
        assert rank.bytes_read <= LIMITS[model] * whole.bytes_read
    # together the ranks hold every weight at least once
    assert sum(rank.weight_bytes for rank in ranks) >= whole.weight_bytes
