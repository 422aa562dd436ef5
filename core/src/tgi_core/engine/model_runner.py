"""Runs one scheduled step through the model over the paged KV cache.

Packs the step's tokens without padding, builds positions, slots and block tables
(``ForwardBatch``), calls the model with the selected attention backend, and computes
logits only for the sequences whose pending tokens this step completes.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from torch import nn

from tgi_core.attention.backend import AttentionBackend
from tgi_core.attention.batch import ForwardBatch, SequenceChunk
from tgi_core.attention.kv_cache import KVCache
from tgi_core.engine.scheduler import ScheduledChunk
from tgi_core.model.compiled import ModelForward, compile_forward, eager_forward
from tgi_core.model.layers.attention import Attention


def _sequence_chunk(chunk: ScheduledChunk) -> SequenceChunk:
    """What attention needs of a scheduled chunk; a source is encoded when its sequence
    starts (or restarts after a preemption) with an empty cache."""
    seq = chunk.seq
    encode = bool(seq.encoder_ids) and chunk.num_cached == 0
    return SequenceChunk(
        chunk.num_cached,
        chunk.num_new,
        seq.block_table,
        encoder_len=len(seq.encoder_ids),
        encoder_ids=seq.encoder_ids if encode else None,
    )


class ModelRunner:
    """Owns the KV cache; turns scheduled chunks into logits."""

    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        *,
        num_blocks: int,
        block_size: int,
        model_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        compile: bool = False,
    ) -> None:
        self.model, self.backend, self.device = model, backend, torch.device(device)
        #: the model's forward, compiled by inductor with ``compile`` (model/compiled.py)
        self.forward: ModelForward = compile_forward(model) if compile else eager_forward(model)
        layers = [module for module in model.modules() if isinstance(module, Attention)]
        self.kv_cache = KVCache.allocate(
            layers, num_blocks, block_size, backend.kv_cache_dtype(model_dtype), self.device
        )
        self.block_size = block_size

    def copy_blocks(self, copies: Seq[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (source, destination) in every layer."""
        for source, target in copies:
            src = torch.arange(source * self.block_size, (source + 1) * self.block_size)
            dst = torch.arange(target * self.block_size, (target + 1) * self.block_size)
            for tensors in (self.kv_cache.keys, self.kv_cache.values):
                for layer in tensors:
                    layer.index_copy_(0, dst, layer.index_select(0, src))

    @torch.inference_mode()
    def execute(
        self, chunks: Seq[ScheduledChunk], logits_for: Seq[str]
    ) -> list[torch.Tensor | None]:
        """Run the step. ``logits_for[i]`` is ``"none"``, ``"last"`` (the chunk's last
        token) or ``"all"`` (every token of the chunk); returns logits per chunk, in the
        model's dtype."""
        batch = ForwardBatch.build(
            [_sequence_chunk(c) for c in chunks],
            self.kv_cache,
            self.backend,
            self.device,
        )
        ids = [t for c in chunks for t in c.seq.token_ids[c.num_cached : c.num_cached + c.num_new]]
        hidden = self.forward(
            torch.tensor(ids, dtype=torch.int64, device=self.device), batch.positions, batch
        )
        rows: list[int] = []
        spans: list[tuple[int, int] | None] = []
        for i, mode in enumerate(logits_for):
            start, end = batch.query_start[i], batch.query_start[i + 1]
            chosen = [] if mode == "none" else [end - 1] if mode == "last" else range(start, end)
            spans.append((len(rows), len(rows) + len(chosen)) if chosen else None)
            rows.extend(chosen)
        if not rows:
            return [None] * len(chunks)
        # in the model's dtype: the sampler widens what it edits (a float32 copy of 64 x
        # 49152 bf16 logits cost ~0.4 ms a step)
        logits: torch.Tensor = self.model.compute_logits(hidden[rows])  # type: ignore[operator]
        return [None if span is None else logits[span[0] : span[1]] for span in spans]
