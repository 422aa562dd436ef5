"""Continuous batching: which tokens of which sequences go into the next forward step.

Pure Python, no torch. Each step spends a token budget (``max_batch_tokens``, the
server's ``max_batch_prefill_tokens``): first on the running sequences, oldest first
(one token each when decoding, the next chunk of a prompt being prefilled), then on
admitting waiting sequences in arrival order (FIFO: a request is never overtaken by a
later one). With chunked prefill a prompt larger than what is left of the budget is
split, and its first chunk runs in the same forward as the others' decode tokens. An
encoder-decoder sequence's source, encoded whole when it is admitted, counts against the
budget too.

When the KV cache has no block for a running sequence, the youngest running sequence
is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed later (its prefix may still be cached). So nothing fails for lack of KV as
long as one sequence fits the cache; one that can never fit is refused.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tgi_core.engine.block_manager import BlockManager
from tgi_core.engine.sequence import Sequence, Status


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """``num_new`` tokens of ``seq`` computed this step, after ``num_cached`` in the cache."""

    seq: Sequence
    num_cached: int
    num_new: int


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    refused: list[Sequence] = field(default_factory=list)  # can never fit the KV cache


class Scheduler:
    """Waiting and running queues over a :class:`BlockManager`."""

    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_batch_tokens: int,
        max_batch_size: int | None = None,
        chunked_prefill: bool = True,
    ) -> None:
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the youngest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Add a sequence that already holds its blocks (a fork) to the running set."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or cancelled sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _fits_ever(self, seq: Sequence) -> bool:
        positions = seq.kv_positions(len(seq.token_ids))
        return -(-positions // self.blocks.block_size) <= self.blocks.num_blocks

    def schedule(self) -> StepPlan:
        """Choose this step's work; blocks for every scheduled token are allocated."""
        plan = StepPlan()
        budget = self.max_batch_tokens
        # running sequences, oldest first
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_pending, budget)
            while not self.blocks.allocate(seq, seq.num_computed + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # it was the youngest: nothing after it runs either
            plan.chunks.append(ScheduledChunk(seq, seq.num_computed, num_new))
            budget -= num_new
            index += 1
        # admissions, first come first served, unless this step had to preempt
        while self.waiting and budget > 0 and not plan.preempted:
            if self.max_batch_size is not None and len(self.running) >= self.max_batch_size:
                break
            seq = self.waiting[0]
            if not self._fits_ever(seq):
                self.waiting.popleft()
                seq.status = Status.FINISHED
                plan.refused.append(seq)
                continue
            if not seq.block_table and not seq.request.prompt_logprobs:
                seq.num_cached_prompt_tokens = self.blocks.match_prefix(seq)
            num_new = seq.num_pending
            encoded = len(seq.encoder_ids) if seq.num_computed == 0 else 0
            if encoded:  # the source is encoded whole in the step that admits it
                fits = encoded + num_new <= budget
            else:
                if num_new > budget and self.chunked_prefill:
                    num_new = budget
                fits = num_new <= budget
            # alone in a step, a whole prompt (or source) runs whatever its size; otherwise
            # it waits for a step with room for it
            if (not fits and plan.chunks) or not self.blocks.allocate(
                seq, seq.num_computed + num_new
            ):
                # a waiting sequence holds no blocks: its matched prefix would pin blocks
                # that the sequences ahead of it may need (and they could never run)
                self.blocks.free(seq)
                break
            self.waiting.popleft()
            self.blocks.prefix_hit_tokens += seq.num_cached_prompt_tokens
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.chunks.append(ScheduledChunk(seq, seq.num_computed, num_new))
            budget -= num_new + encoded
        return plan

    def complete(self, chunk: ScheduledChunk) -> None:
        """Record that ``chunk``'s tokens are now in the cache."""
        chunk.seq.num_computed = chunk.num_cached + chunk.num_new
        self.blocks.commit(chunk.seq)
