"""What one forward step computes: packed tokens of several sequences over a paged cache.

A step packs, without padding, the new tokens of every scheduled sequence: whole or
chunked prompts (prefill) and single tokens (decode) alike. ``ForwardBatch.build``
derives everything attention needs from each sequence's ``SequenceChunk``: positions,
the KV slot each new token is written to, and the block table to read the past from.

Encoder-decoder models add, per sequence, its source length (cross-attention reads
that many cache slots) and, in the step a sequence is admitted, its source tokens:
those are packed into ``EncoderBatch``, run through the encoder once, and their
cross-attention keys and values written to the sequence's slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tgi_core.attention.backend import AttentionBackend
    from tgi_core.attention.kv_cache import KVCache


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    """One sequence's share of a step.

    :param num_cached: tokens of the sequence already in the KV cache.
    :param num_new: tokens computed in this step (written to the cache).
    :param block_table: the cache blocks holding the sequence, in order; it must cover
        ``num_cached + num_new`` tokens.
    """

    num_cached: int
    num_new: int
    block_table: Sequence[int]
    #: encoder-decoder models: the source's length, and its tokens in the step that
    #: runs the encoder for it (None otherwise)
    encoder_len: int = 0
    encoder_ids: Sequence[int] | None = None

    @property
    def seq_len(self) -> int:
        return self.num_cached + self.num_new


def slots_for(block_table: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions ``[start, end)`` of a sequence."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


@dataclass
class EncoderBatch:
    """The sources encoded in this step, packed: ``input_ids`` ``[T_enc]``."""

    input_ids: torch.Tensor
    positions: torch.Tensor  # [T_enc] position of each token in its source
    query_start: list[int]  # [E + 1] offsets of each source in the packed tokens
    slot_mapping: torch.Tensor  # [T_enc] where each token's cross-attention K/V go

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]


@dataclass
class ForwardBatch:
    """Metadata of one forward step; built once, read by every layer."""

    chunks: list[SequenceChunk]
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    query_start: list[int]  # [S + 1]: offsets of each sequence's tokens in the packed batch
    block_size: int
    kv_cache: KVCache
    backend: AttentionBackend
    #: the sources to encode this step (encoder-decoder models), if any
    encoder: EncoderBatch | None = None
    #: whatever the backend's ``prepare`` computed for this step
    state: Any = None
    #: set by a backend's ``prepare`` for a step that the C++ ``tgi::attention`` kernel
    #: can run by itself: a context manager that installs it around a compiled call
    #: (``attention/native.py``'s ``NativeDecodeStep``)
    native_decode: Any = None
    _seq_lens_per_token: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        chunks: Sequence[SequenceChunk],
        kv_cache: KVCache,
        backend: AttentionBackend,
        device: torch.device | str = "cpu",
    ) -> ForwardBatch:
        """Derive positions, slots and offsets, then let the backend prepare."""
        block_size = kv_cache.block_size
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        encoder_ids: list[int] = []
        encoder_positions: list[int] = []
        encoder_slots: list[int] = []
        encoder_start = [0]
        for chunk in chunks:
            if chunk.num_new <= 0:
                raise ValueError("every sequence in a step must compute at least one token")
            needed = max(chunk.seq_len, chunk.encoder_len)
            if len(chunk.block_table) * block_size < needed:
                raise ValueError(
                    f"block table of {len(chunk.block_table)} blocks cannot hold {needed} tokens"
                )
            positions.extend(range(chunk.num_cached, chunk.seq_len))
            slots.extend(slots_for(chunk.block_table, chunk.num_cached, chunk.seq_len, block_size))
            query_start.append(query_start[-1] + chunk.num_new)
            if chunk.encoder_ids is not None:
                if len(chunk.encoder_ids) != chunk.encoder_len or not chunk.encoder_ids:
                    raise ValueError("a source to encode must be encoder_len tokens, not none")
                encoder_ids.extend(chunk.encoder_ids)
                encoder_positions.extend(range(chunk.encoder_len))
                encoder_slots.extend(slots_for(chunk.block_table, 0, chunk.encoder_len, block_size))
                encoder_start.append(encoder_start[-1] + chunk.encoder_len)
        encoder = None
        if encoder_ids:
            encoder = EncoderBatch(
                input_ids=torch.tensor(encoder_ids, dtype=torch.int64, device=device),
                positions=torch.tensor(encoder_positions, dtype=torch.int64, device=device),
                query_start=encoder_start,
                slot_mapping=torch.tensor(encoder_slots, dtype=torch.int64, device=device),
            )
        batch = cls(
            chunks=list(chunks),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start=query_start,
            block_size=block_size,
            kv_cache=kv_cache,
            backend=backend,
            encoder=encoder,
        )
        batch.state = backend.prepare(batch)
        return batch

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.chunks)

    def last_token_indices(self) -> torch.Tensor:
        """Index of each sequence's last new token in the packed batch."""
        return torch.tensor(self.query_start[1:], dtype=torch.int64) - 1

    def seq_lens_per_token(self) -> torch.Tensor:
        """For each packed token, its sequence's length after this step (dynamic rope)."""
        if self._seq_lens_per_token is None:
            lengths = torch.tensor([chunk.seq_len for chunk in self.chunks])
            counts = torch.tensor([chunk.num_new for chunk in self.chunks])
            self._seq_lens_per_token = lengths.repeat_interleave(counts)
        return self._seq_lens_per_token
