"""Drive a model over a paged KV cache: sequences in, logits out.

``PagedRunner`` is the smallest complete runner: it owns the KV cache and a free list of
blocks, packs the pending tokens of the sequences it is asked to step into one forward
(prefill and decode alike, optionally in chunks), and returns logits. Tests and
benchmarks use it directly; the engine's scheduler drives the same calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tgi_core.attention.backend import AttentionBackend
from tgi_core.attention.batch import ForwardBatch, SequenceChunk
from tgi_core.attention.kv_cache import KVCache
from tgi_core.model.compiled import ModelForward, compile_forward, eager_forward
from tgi_core.model.layers.attention import Attention


@dataclass
class _Sequence:
    tokens: list[int]
    num_cached: int = 0
    blocks: list[int] = field(default_factory=list)
    encoder_ids: list[int] = field(default_factory=list)


class PagedRunner:
    """Runs ``model`` for sequences whose KV lives in blocks of ``block_size`` tokens."""

    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        *,
        num_blocks: int,
        block_size: int = 16,
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
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.sequences: dict[int, _Sequence] = {}
        self._next_id = 0

    def add(self, token_ids: Sequence[int], encoder_ids: Sequence[int] = ()) -> int:
        """Start a sequence; returns its id. An encoder-decoder model's source is
        ``encoder_ids`` (encoded at the sequence's first step), ``token_ids`` its decoder
        tokens."""
        seq_id, self._next_id = self._next_id, self._next_id + 1
        self.sequences[seq_id] = _Sequence(list(token_ids), encoder_ids=list(encoder_ids))
        return seq_id

    def append(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Queue tokens (e.g. the one just sampled) to be computed at the next step."""
        self.sequences[seq_id].tokens.extend(token_ids)

    def free(self, seq_id: int) -> None:
        """Forget a sequence and give its blocks back."""
        self.free_blocks.extend(reversed(self.sequences.pop(seq_id).blocks))

    def _reserve(self, seq: _Sequence, length: int) -> None:
        needed = -(-length // self.block_size) - len(seq.blocks)
        if needed > len(self.free_blocks):
            raise RuntimeError(
                f"KV cache full: {needed} blocks needed, {len(self.free_blocks)} free"
            )
        seq.blocks.extend(self.free_blocks.pop() for _ in range(needed))

    @torch.inference_mode()
    def step(
        self, seq_ids: Sequence[int], *, max_tokens: int | None = None, all_logits: bool = False
    ) -> list[torch.Tensor]:
        """Compute the pending tokens of ``seq_ids`` (at most ``max_tokens`` each) in one pass.

        Returns per sequence the logits ``[vocab]`` of its last computed token, or with
        ``all_logits`` those ``[n, vocab]`` of every token computed in this step.
        """
        chunks, input_ids = [], []
        for seq_id in seq_ids:
            seq = self.sequences[seq_id]
            pending = seq.tokens[seq.num_cached :]
            if max_tokens is not None:
                pending = pending[:max_tokens]
            self._reserve(seq, max(seq.num_cached + len(pending), len(seq.encoder_ids)))
            chunks.append(
                SequenceChunk(
                    seq.num_cached,
                    len(pending),
                    list(seq.blocks),
                    encoder_len=len(seq.encoder_ids),
                    encoder_ids=seq.encoder_ids if seq.encoder_ids and not seq.num_cached else None,
                )
            )
            input_ids.extend(pending)
        batch = ForwardBatch.build(chunks, self.kv_cache, self.backend, self.device)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        hidden = self.forward(ids, batch.positions, batch)
        rows = torch.arange(batch.num_tokens) if all_logits else batch.last_token_indices()
        logits = self.model.compute_logits(hidden[rows]).float()  # type: ignore[operator]
        for seq_id, chunk in zip(seq_ids, chunks, strict=True):
            self.sequences[seq_id].num_cached += chunk.num_new
        if not all_logits:
            return list(logits)
        return [logits[batch.query_start[i] : batch.query_start[i + 1]] for i in range(len(chunks))]
