"""How many collectives one step issues, per model family: the figures the collectives
benchmark and docs/benchmarks.md rest on (and a guard against an extra one creeping in).

The ranks are simulated: a ``ParallelContext`` of rank 0 of 2 whose collectives only
count (and return their input), so the numbers are meaningless but the calls are real.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tgi_core.distributed.plan import ChunkPlan, PlanKind, StepPlan
from tgi_core.engine.model_runner import ModelRunner
from tgi_core.model.base import ModelContext
from tgi_core.model.loader import load_model
from tgi_core.model.parallel import ParallelContext
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry


@dataclass(frozen=True)
class Counting(ParallelContext):
    calls: list[str] = field(default_factory=list)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append("all_reduce")
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append("all_gather")
        return torch.cat([tensor] * self.world_size, dim=-1)


def step(runner: ModelRunner, chunks: list[ChunkPlan]) -> None:
    stand_ins, modes = StepPlan(PlanKind.STEP, chunks).runner_inputs()
    runner.execute(stand_ins, modes)


@pytest.mark.parametrize(
    ("model", "encode", "decode"),
    [
        # 2 layers: the embedding, then each layer's attention and MLP outputs
        ("llama-2kv", 5, 5),
        ("bloom", 5, 5),
        # encoder (2 layers) 1 + 2 * 2, only when a source is encoded; decoder (2 layers)
        # 1 + 3 * 2 (self-attention, cross-attention, feed-forward)
        ("t5", 5 + 7, 7),
    ],
)
def test_all_reduces_and_one_logits_gather_per_step(
    shard_checkpoints: dict[str, Path], model: str, encode: int, decode: int
) -> None:
    tp = Counting(rank=0, world_size=2)
    registry = Registry.build(make_plugin_manager())
    loaded = load_model(str(shard_checkpoints[model]), registry, ctx=ModelContext(tp=tp))
    backend = registry.attention_backends["sdpa"].load()()
    runner = ModelRunner(loaded.model, backend, num_blocks=8, block_size=4)
    source = [5, 6, 7, 8] if model == "t5" else None
    prompt = [0] if model == "t5" else [5, 6, 7, 8]
    step(runner, [ChunkPlan(0, len(prompt), [0, 1], prompt, "last", len(source or []), source)])
    assert tp.calls == ["all_reduce"] * encode + ["all_gather"]
    tp.calls.clear()
    step(runner, [ChunkPlan(len(prompt), 1, [0, 1], [9], "last", len(source or []))])
    assert tp.calls == ["all_reduce"] * decode + ["all_gather"]
    tp.calls.clear()
    step(runner, [ChunkPlan(len(prompt) + 1, 1, [0, 1], [9], "none", len(source or []))])
    assert tp.calls == ["all_reduce"] * decode  # no logits wanted: no gather
