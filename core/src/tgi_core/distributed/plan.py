"""A step's plan, as rank 0 broadcasts it: int64 tensors, never pickles.

Every step, rank 0 sends what every rank needs to run the same forward on its shard:
per sequence its cached and new token counts, block table, source length (and, in the
step that encodes it, its source tokens) and which logits it wants; the step's token ids;
the copy-on-write block copies to apply first. A plan is two broadcasts on the control
group: a fixed header of ``HEADER_SIZE`` int64 (the kind and the sizes), then one packed
int64 payload whose length the header gives (none for heartbeats and shutdown).

Payload layout, in order: ``FIELDS_PER_CHUNK`` values per chunk (``num_cached``,
``num_new``, ``encoder_len``, block-table length, whether its source is sent, logits
mode), the block tables, the token ids, the sources sent, the block copies as
(source, destination) pairs.

On the receiving side, :meth:`StepPlan.runner_inputs` rebuilds stand-ins of the
scheduler's chunks, so every rank calls the very same ``ModelRunner.execute`` with the
same arguments and issues the same collectives in the same order.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tgi_core.engine.scheduler import ScheduledChunk

HEADER_SIZE = 8
FIELDS_PER_CHUNK = 6
#: ``ModelRunner.execute``'s logits modes, as sent
LOGITS_MODES = ("none", "last", "all")


class PlanKind(enum.IntEnum):
    STEP = 0
    HEARTBEAT = 1  # nothing to run; proves rank 0 is alive while the engine is idle
    SHUTDOWN = 2  # leave the loop: the group is shutting down


@dataclass(slots=True)
class ChunkPlan:
    """One sequence's share of a step."""

    num_cached: int
    num_new: int
    block_table: list[int]
    #: the tokens computed this step (positions ``num_cached`` .. ``num_cached + num_new``)
    token_ids: list[int]
    logits: str = "none"
    #: encoder-decoder models: the source's length, and its tokens when they are encoded
    encoder_len: int = 0
    encoder_ids: list[int] | None = None


@dataclass(slots=True)
class StepPlan:
    kind: PlanKind
    chunks: list[ChunkPlan] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def from_scheduled(
        cls,
        chunks: Sequence[ScheduledChunk],
        logits_for: Sequence[str],
        copies: Sequence[tuple[int, int]] = (),
    ) -> StepPlan:
        """The plan of a step the engine runs (``ModelRunner.execute``'s arguments).

        A source is sent when its sequence starts with an empty cache: that is the step
        that encodes it (at admission, or again after a preemption).
        """
        planned = []
        for chunk, mode in zip(chunks, logits_for, strict=True):
            seq = chunk.seq
            end = chunk.num_cached + chunk.num_new
            encode = bool(seq.encoder_ids) and chunk.num_cached == 0
            planned.append(
                ChunkPlan(
                    chunk.num_cached,
                    chunk.num_new,
                    list(seq.block_table),
                    list(seq.token_ids[chunk.num_cached : end]),
                    mode,
                    len(seq.encoder_ids),
                    list(seq.encoder_ids) if encode else None,
                )
            )
        return cls(PlanKind.STEP, planned, list(copies))

    # -- wire format ------------------------------------------------------------------
    def to_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(header [HEADER_SIZE], payload [n])``, both int64 on the CPU."""
        meta: list[int] = []
        tables: list[int] = []
        tokens: list[int] = []
        sources: list[int] = []
        for chunk in self.chunks:
            sent = chunk.encoder_ids is not None
            meta += [
                chunk.num_cached,
                chunk.num_new,
                chunk.encoder_len,
                len(chunk.block_table),
                int(sent),
                LOGITS_MODES.index(chunk.logits),
            ]
            tables += chunk.block_table
            tokens += chunk.token_ids
            if chunk.encoder_ids is not None:
                sources += chunk.encoder_ids
        pairs = [index for pair in self.copies for index in pair]
        payload = meta + tables + tokens + sources + pairs
        header = [
            int(self.kind),
            len(self.chunks),
            len(tables),
            len(tokens),
            len(sources),
            len(self.copies),
            len(payload),
            0,
        ]
        return (
            torch.tensor(header, dtype=torch.int64),
            torch.tensor(payload, dtype=torch.int64),
        )

    @classmethod
    def from_tensors(cls, header: torch.Tensor, payload: torch.Tensor) -> StepPlan:
        kind, num_chunks, _tables, _tokens, _sources, num_copies, size, _ = header.tolist()
        values: list[int] = payload.tolist()
        if len(values) != size:
            raise ValueError(f"plan payload of {len(values)} values, header says {size}")
        meta_end = num_chunks * FIELDS_PER_CHUNK
        metas = [values[i : i + FIELDS_PER_CHUNK] for i in range(0, meta_end, FIELDS_PER_CHUNK)]
        cursor = meta_end
        tables = []
        for meta in metas:
            tables.append(values[cursor : cursor + meta[3]])
            cursor += meta[3]
        tokens = []
        for meta in metas:
            tokens.append(values[cursor : cursor + meta[1]])
            cursor += meta[1]
        chunks = []
        for meta, table, ids in zip(metas, tables, tokens, strict=True):
            num_cached, num_new, encoder_len, _, sent, mode = meta
            encoder_ids = None
            if sent:
                encoder_ids = values[cursor : cursor + encoder_len]
                cursor += encoder_len
            chunks.append(
                ChunkPlan(
                    num_cached, num_new, table, ids, LOGITS_MODES[mode], encoder_len, encoder_ids
                )
            )
        flat = values[cursor : cursor + 2 * num_copies]
        copies = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        return cls(PlanKind(kind), chunks, copies)

    # -- the receiving side -----------------------------------------------------------
    def runner_inputs(self) -> tuple[list[Any], list[str]]:
        """``ModelRunner.execute``'s arguments: stand-ins of the scheduled chunks, and the
        logits modes."""
        chunks = [
            _PlannedChunk(
                _PlannedSequence(
                    _TokenWindow(c.num_cached, c.token_ids),
                    c.block_table,
                    _source(c),
                ),
                c.num_cached,
                c.num_new,
            )
            for c in self.chunks
        ]
        return chunks, [c.logits for c in self.chunks]


def _source(chunk: ChunkPlan) -> Sequence[int]:
    """The source as the runner reads it: its tokens when sent, else only its length."""
    if chunk.encoder_ids is not None:
        return tuple(chunk.encoder_ids)
    return _Unsent(chunk.encoder_len)


class _Unsent(Sequence[int]):
    """A source that was encoded in an earlier step: its length matters, not its tokens."""

    def __init__(self, length: int) -> None:
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> Any:
        raise RuntimeError("a source is read only in the step that encodes it")


class _TokenWindow(Sequence[int]):
    """A sequence's token ids as far as one step needs them: positions ``start`` to
    ``start + len(ids)``, indexed by position in the sequence."""

    def __init__(self, start: int, ids: list[int]) -> None:
        self._start, self._ids = start, ids

    def __len__(self) -> int:
        return self._start + len(self._ids)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1 or (start < self._start and stop > start):
                raise IndexError(f"positions {start}:{stop} are outside this step's tokens")
            return self._ids[max(start - self._start, 0) : max(stop - self._start, 0)]
        position = index + len(self) if index < 0 else index
        if not self._start <= position < len(self):
            raise IndexError(f"position {index} is outside this step's tokens")
        return self._ids[position - self._start]


@dataclass(slots=True)
class _PlannedSequence:
    """What ``ModelRunner.execute`` reads of a :class:`~tgi_core.engine.sequence.Sequence`."""

    token_ids: Sequence[int]
    block_table: list[int]
    encoder_ids: Sequence[int]


@dataclass(slots=True)
class _PlannedChunk:
    """What ``ModelRunner.execute`` reads of a ``ScheduledChunk``."""

    seq: _PlannedSequence
    num_cached: int
    num_new: int


def send_plan(plan: StepPlan, group: Any) -> None:
    """Broadcast ``plan`` from rank 0 on ``group`` (the gloo control group)."""
    import torch.distributed as dist

    header, payload = plan.to_tensors()
    dist.broadcast(header, src=0, group=group)
    if payload.numel():
        dist.broadcast(payload, src=0, group=group)


def receive_plan(group: Any) -> StepPlan:
    """Wait for rank 0's next plan (raises when the group's timeout passes first)."""
    import torch.distributed as dist

    header = torch.empty(HEADER_SIZE, dtype=torch.int64)
    dist.broadcast(header, src=0, group=group)
    payload = torch.empty(int(header[6]), dtype=torch.int64)
    if payload.numel():
        dist.broadcast(payload, src=0, group=group)
    return StepPlan.from_tensors(header, payload)
