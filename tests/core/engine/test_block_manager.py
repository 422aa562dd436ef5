"""The block manager and scheduler: prefix caching, copy-on-write, preemption, and
property-based runs that never leak or double-free a block."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from tgi_core.engine.block_manager import BlockManager
from tgi_core.engine.requests import GenerateRequest, StoppingParams
from tgi_core.engine.scheduler import Scheduler
from tgi_core.engine.sequence import Sequence, Status

_arrivals = iter(range(10**9))


def seq(tokens, max_new=4, name=None) -> Sequence:
    request = GenerateRequest(
        request_id=name or f"r{next(_arrivals)}",
        prompt_token_ids=tuple(tokens),
        stopping=StoppingParams(max_new_tokens=max_new),
    )
    return Sequence(request, arrival=next(_arrivals))


def assert_references_match(blocks: BlockManager, live: list[Sequence]) -> None:
    blocks.check()
    held = Counter(block for s in live for block in s.block_table)
    for block in range(blocks.num_blocks):
        assert blocks.ref_counts[block] == held[block], block


def run_to_completion(scheduler: Scheduler, max_steps: int = 10_000) -> list[Sequence]:
    """Step like the engine: compute the scheduled tokens, append one, finish at max_new."""
    done = []
    for _ in range(max_steps):
        if not scheduler.has_work():
            return done
        plan = scheduler.schedule()
        done += plan.refused
        for chunk in plan.chunks:
            scheduler.complete(chunk)
            s = chunk.seq
            if s.num_pending == 0:
                if s.num_generated + 1 >= s.request.stopping.max_new_tokens:
                    s.token_ids.append(7)
                    scheduler.finish(s)
                    done.append(s)
                else:
                    s.token_ids.append(7)
        live = scheduler.running + [w for w in scheduler.waiting if w.block_table]
        assert_references_match(scheduler.blocks, live)
    raise AssertionError("did not finish")


def test_prefix_blocks_are_reused_and_counted() -> None:
    blocks = BlockManager(16, 4)
    first = seq(range(10))
    blocks.allocate(first, 10)
    first.num_computed = 10
    blocks.commit(first)  # two full blocks registered
    second = seq([*range(8), 99, 98, 97])
    assert blocks.match_prefix(second) == 8
    assert second.block_table == first.block_table[:2]
    third = seq(range(8))  # the last token is always computed: only one block matches
    assert blocks.match_prefix(third) == 4
    assert_references_match(blocks, [first, second, third])


def test_freed_prefix_stays_cached_until_evicted() -> None:
    blocks = BlockManager(4, 2)
    first = seq([1, 2, 3, 4, 5])
    blocks.allocate(first, 5)
    first.num_computed = 5
    blocks.commit(first)
    blocks.free(first)
    assert (blocks.num_cached, blocks.num_used, blocks.num_free) == (2, 0, 4)
    again = seq([1, 2, 3, 4, 9])
    assert blocks.match_prefix(again) == 4
    assert blocks.num_cached == 0
    blocks.free(again)
    hog = seq(range(100, 108))  # needs all four blocks: the cached ones are evicted
    assert blocks.allocate(hog, 8)
    assert blocks.num_cached == 0 and blocks.by_hash == {}
    assert blocks.match_prefix(seq([1, 2, 3, 4, 9])) == 0


def test_fork_shares_blocks_and_copies_a_partial_tail_on_write() -> None:
    blocks = BlockManager(8, 4)
    parent = seq(range(6))
    blocks.allocate(parent, 6)
    parent.num_computed = 6
    child = seq(range(6))
    blocks.fork(parent, child)
    assert child.block_table == parent.block_table
    assert blocks.allocate(child, 7)  # writes into the shared half-full block
    assert child.block_table[0] == parent.block_table[0]
    assert child.block_table[1] != parent.block_table[1]
    assert blocks.take_copies() == [(parent.block_table[1], child.block_table[1])]
    assert blocks.allocate(parent, 7)  # now the parent's tail is its own: no copy
    assert blocks.take_copies() == []
    assert_references_match(blocks, [parent, child])


def test_prefix_hits_are_counted_once_on_admission() -> None:
    scheduler = Scheduler(BlockManager(4, 2), max_batch_tokens=64)
    first = seq([1, 2, 3, 4, 5], max_new=1)
    run_to_completion_with(scheduler, [first])
    blocker = seq(range(10, 14), max_new=1)  # holds two of the four blocks
    scheduler.add(blocker)
    scheduler.schedule()
    again = seq([1, 2, 3, 4, 9, 8, 7], max_new=1)  # matches 4 tokens but cannot fit yet
    scheduler.add(again)
    for _ in range(3):
        scheduler.schedule()
    assert scheduler.blocks.prefix_hit_tokens == 0
    scheduler.finish(blocker)
    scheduler.schedule()
    assert scheduler.blocks.prefix_hit_tokens == 4


def run_to_completion_with(scheduler: Scheduler, sequences: list[Sequence]) -> None:
    for s in sequences:
        scheduler.add(s)
    run_to_completion(scheduler)


def test_scheduler_is_fifo_and_respects_the_token_budget() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_batch_tokens=10)
    a, b, c = seq(range(6)), seq(range(20, 27)), seq(range(40, 43))
    for s in (a, b, c):
        scheduler.add(s)
    plan = scheduler.schedule()
    assert [(ch.seq, ch.num_new) for ch in plan.chunks] == [(a, 6), (b, 4)]  # b is chunked
    for chunk in plan.chunks:
        scheduler.complete(chunk)
    a.token_ids.append(1)
    plan = scheduler.schedule()
    assert [(ch.seq, ch.num_cached, ch.num_new) for ch in plan.chunks] == [
        (a, 6, 1),
        (b, 4, 3),
        (c, 0, 3),
    ]


def test_without_chunking_a_prompt_waits_for_room() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_batch_tokens=10, chunked_prefill=False)
    a, b = seq(range(6)), seq(range(20, 27))
    scheduler.add(a)
    scheduler.add(b)
    assert [ch.seq for ch in scheduler.schedule().chunks] == [a]
    lone = Scheduler(BlockManager(64, 4), max_batch_tokens=10, chunked_prefill=False)
    big = seq(range(30))
    lone.add(big)
    assert [(ch.seq, ch.num_new) for ch in lone.schedule().chunks] == [(big, 30)]


def test_preemption_frees_the_youngest_and_everything_completes() -> None:
    scheduler = Scheduler(BlockManager(6, 4), max_batch_tokens=64)
    sequences = [seq(range(i * 10, i * 10 + 7), max_new=9) for i in range(3)]
    for s in sequences:
        scheduler.add(s)
    done = run_to_completion(scheduler)
    assert set(done) == set(sequences)
    assert all(s.num_generated == 9 for s in done)
    assert scheduler.num_preemptions > 0
    assert scheduler.blocks.num_used == 0


def test_a_sequence_that_can_never_fit_is_refused() -> None:
    scheduler = Scheduler(BlockManager(2, 4), max_batch_tokens=64)
    too_big, fine = seq(range(20)), seq(range(3))
    scheduler.add(too_big)
    scheduler.add(fine)
    plan = scheduler.schedule()
    assert plan.refused == [too_big] and [c.seq for c in plan.chunks] == [fine]


def test_max_batch_size() -> None:
    scheduler = Scheduler(BlockManager(64, 4), max_batch_tokens=64, max_batch_size=2)
    for i in range(3):
        scheduler.add(seq(range(i, i + 3)))
    assert len(scheduler.schedule().chunks) == 2


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 3), st.integers(1, 30), st.integers(1, 12)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    operations,
    st.integers(4, 24),
    st.integers(1, 6),
    st.integers(2, 40),
    st.booleans(),
    st.booleans(),
)
def test_random_traffic_never_leaks(ops, num_blocks, block_size, budget, chunked, caching) -> None:
    """Random arrivals (some sharing prefixes), steps, cancellations; then drain."""
    blocks = BlockManager(num_blocks, block_size, prefix_caching=caching)
    scheduler = Scheduler(blocks, max_batch_tokens=budget, chunked_prefill=chunked)
    every, finished = [], set()
    for op in ops:
        if op[0] == "add":
            _, family, length, max_new = op
            s = seq([family] * 3 + list(range(length)), max_new=max_new)
            every.append(s)
            scheduler.add(s)
        elif op[0] == "step":
            for _ in range(op[1]):
                if scheduler.has_work():
                    plan = scheduler.schedule()
                    finished.update(plan.refused)
                    for chunk in plan.chunks:
                        scheduler.complete(chunk)
                        if chunk.seq.num_pending == 0:
                            chunk.seq.token_ids.append(5)
                            if chunk.seq.num_generated >= chunk.seq.request.stopping.max_new_tokens:
                                scheduler.finish(chunk.seq)
                                finished.add(chunk.seq)
        else:
            live = [s for s in every if s not in finished]
            if live:
                victim = live[op[1] % len(live)]
                scheduler.finish(victim)  # a cancelled request gives its blocks back
                finished.add(victim)
        live_tables = scheduler.running + [w for w in scheduler.waiting if w.block_table]
        assert_references_match(blocks, live_tables)
    finished.update(run_to_completion(scheduler))
    assert finished == set(every)
    assert all(s.status is Status.FINISHED for s in every)
    assert blocks.num_used == 0 and blocks.num_free == num_blocks


def test_a_waiting_sequence_does_not_pin_its_cached_prefix() -> None:
    """Found by hypothesis: without chunking, C matched A's cached prefix, could not be
    admitted (no room in the step's budget) and kept holding the block; B, ahead of C
    and preempted, then needed every block of the cache and never ran again."""
    blocks = BlockManager(6, 1, prefix_caching=True)
    scheduler = Scheduler(blocks, max_batch_tokens=2, chunked_prefill=False)
    first, second, third = seq([2, 2, 2, 0], 1), seq([1, 1, 1, 0], 3), seq([2, 2, 2, 0], 1)
    for s in (first, second, third):
        scheduler.add(s)
    done = run_to_completion(scheduler, max_steps=50)
    assert {id(s) for s in done} == {id(first), id(second), id(third)}
    assert blocks.num_used == 0
