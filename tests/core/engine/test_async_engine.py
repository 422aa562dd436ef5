"""The engine thread and its async API: concurrent streams, refusals, cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from tgi_core.engine.async_engine import AsyncEngine
from tgi_core.engine.engine import RequestError
from tgi_core.engine.requests import GenerateRequest, StoppingParams
from tgi_core.model.fixtures import build_engine, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return save_checkpoint(tmp_path_factory.mktemp("async") / "llama", config)


def request(name: str, ids, max_new: int = 8) -> GenerateRequest:
    return GenerateRequest(
        request_id=name,
        prompt_token_ids=tuple(ids),
        stopping=StoppingParams(max_new_tokens=max_new, ignore_eos=True),
    )


@pytest.fixture
def engine(checkpoint: Path):
    engine = AsyncEngine(build_engine(checkpoint, num_blocks=64, block_size=4))
    engine.start()
    yield engine
    engine.shutdown()


def prompts(n: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randint(3, 128, (k,), generator=generator).tolist()
        for k in torch.randint(1, 20, (n,), generator=generator).tolist()
    ]


def test_concurrent_streams_equal_the_offline_engine(engine, checkpoint) -> None:
    requests = [request(f"r{i}", ids) for i, ids in enumerate(prompts(8))]
    offline = build_engine(checkpoint, num_blocks=64, block_size=4).run(requests)

    async def collect(req):
        return [event.token_id async for event in engine.generate(req)]

    async def main():
        return await asyncio.gather(*(collect(r) for r in requests))

    results = asyncio.run(main())
    assert results == [[e.token_id for e in offline[r.request_id]] for r in requests]
    assert engine.stats.kv_blocks_used == 0


def test_a_step_wakes_each_event_loop_once(engine) -> None:
    requests = [request(f"w{i}", ids) for i, ids in enumerate(prompts(8))]
    steps = 0
    step = engine.engine.step

    def counted_step():
        nonlocal steps
        steps += 1
        return step()

    engine.engine.step = counted_step
    wakes = 0

    async def main():
        loop = asyncio.get_running_loop()
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            nonlocal wakes
            wakes += 1
            return call_soon_threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]

        async def collect(req):
            return [event.token_id async for event in engine.generate(req)]

        return await asyncio.gather(*(collect(r) for r in requests))

    results = asyncio.run(main())
    assert [len(tokens) for tokens in results] == [8] * len(requests)
    assert 0 < wakes <= steps < 8 * len(requests)


def test_a_refused_request_raises_and_others_go_on(engine) -> None:
    async def main():
        with pytest.raises(RequestError, match="prompt is empty"):
            async for _ in engine.generate(request("empty", [])):
                pass
        return [e.token_id async for e in engine.generate(request("fine", [5, 6]))]

    assert len(asyncio.run(main())) == 8


def test_a_consumer_that_leaves_cancels_its_request(engine) -> None:
    async def main():
        stream = engine.generate(request("leaver", [5, 6, 7], max_new=200))
        async for _ in stream:
            break  # the client went away after one token
        await stream.aclose()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not engine.engine.has_work():
                break

    asyncio.run(main())
    assert not engine.engine.has_work()
    assert engine.engine.stats().kv_blocks_used == 0


def test_the_engine_thread_takes_the_threads_it_is_given(checkpoint: Path) -> None:
    """``serve`` leaves the main thread one intra-op thread and gives the engine thread
    the machine's (tgi_core.engine.threads); the forward runs with that setting."""
    from tgi_core.engine.threads import reserve_threads_for_engine

    seen: list[int] = []
    engine = AsyncEngine(build_engine(checkpoint, num_blocks=64, block_size=4), threads=1)
    engine.engine.step_observer = lambda *_: seen.append(torch.get_num_threads())
    before = torch.get_num_threads()
    engine.start()
    try:

        async def consume() -> None:
            async for _ in engine.generate(request("t", [5, 6, 7], 3)):
                pass

        asyncio.run(consume())
    finally:
        engine.shutdown()
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before  # the caller's own setting is untouched
    try:
        assert reserve_threads_for_engine() == before
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
