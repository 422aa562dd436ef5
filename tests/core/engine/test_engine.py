"""The engine over a tiny Llama: continuous batching gives transformers.generate's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tgi_core.engine.requests import GenerateRequest, SamplingParams, StoppingParams
from tgi_core.model.fixtures import build_engine

VOCAB = 320


@pytest.fixture(scope="module")
def checkpoint(tiny_llama: Path) -> Path:
    return tiny_llama


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint))


def prompts(count: int = 16, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (count,), generator=generator).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def greedy(ids: list[int], name: str, max_new: int = 12, **stopping) -> GenerateRequest:
    return GenerateRequest(
        request_id=name,
        prompt_token_ids=tuple(ids),
        stopping=StoppingParams(max_new_tokens=max_new, **stopping),
    )


@pytest.fixture(scope="module")
def expected(checkpoint: Path) -> dict[str, list[int]]:
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    result = {}
    for n, ids in enumerate(prompts()):
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=1, pad_token_id=2
        )
        result[f"r{n}"] = out[0, len(ids) :].tolist()
    return result


def tokens(streams) -> dict[str, list[int]]:
    for events in streams.values():
        assert events and events[-1].finish_reason is not None, events[-1:]
    return {name: [e.token_id for e in events] for name, events in streams.items()}


@pytest.mark.parametrize(
    "config",
    [
        dict(num_blocks=256),  # everything fits
        dict(num_blocks=14, block_size=4),  # so little KV that sequences are preempted
        dict(num_blocks=256, max_batch_tokens=7),  # every prompt split in chunks
        dict(num_blocks=256, chunked_prefill=False, max_batch_tokens=40),
        dict(num_blocks=256, max_batch_size=3),
    ],
    ids=["roomy", "preempting", "chunked", "unchunked", "batch-of-3"],
)
def test_sixteen_concurrent_greedy_requests_match_generate(checkpoint, expected, config):
    engine = build_engine(checkpoint, **config)
    requests = [greedy(ids, f"r{n}") for n, ids in enumerate(prompts())]
    assert tokens(engine.run(requests)) == expected
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.queue_size == 0 and stats.batch_size == 0
    if config.get("num_blocks") == 14:
        assert stats.preemptions > 0


def test_finish_reasons(checkpoint, expected) -> None:
    engine = build_engine(checkpoint, num_blocks=256)
    streams = engine.run([greedy(ids, f"r{n}") for n, ids in enumerate(prompts())])
    for name, events in streams.items():
        reason = "eos_token" if expected[name][-1] == 1 and len(expected[name]) < 12 else "length"
        assert events[-1].finish_reason == reason
        assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
        assert events[-1].generated_tokens == len(events)


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(checkpoint) -> None:
    sampling = SamplingParams(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=42)
    probe = GenerateRequest(
        request_id="probe",
        prompt_token_ids=(5, 6, 7, 8),
        sampling=sampling,
        stopping=StoppingParams(max_new_tokens=10, ignore_eos=True),
    )
    alone = tokens(build_engine(checkpoint, num_blocks=256).run([probe]))["probe"]
    crowd = [
        GenerateRequest(
            request_id=f"c{n}",
            prompt_token_ids=tuple(ids),
            sampling=SamplingParams(do_sample=True, seed=n),
            stopping=StoppingParams(max_new_tokens=10),
        )
        for n, ids in enumerate(prompts(8, seed=3))
    ]
    crowded = build_engine(checkpoint, num_blocks=256, max_batch_tokens=16).run(
        [*crowd[:4], probe, *crowd[4:]]
    )
    assert tokens(crowded)["probe"] == alone
    assert crowded["probe"][-1].seed == 42
    other_seed = GenerateRequest(
        request_id="probe",
        prompt_token_ids=(5, 6, 7, 8),
        sampling=SamplingParams(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=43),
        stopping=StoppingParams(max_new_tokens=10, ignore_eos=True),
    )
    assert tokens(build_engine(checkpoint, num_blocks=256).run([other_seed]))["probe"] != alone


def test_shared_prefix_is_served_from_cache(checkpoint, expected) -> None:
    engine = build_engine(checkpoint, num_blocks=256, block_size=4)
    system = prompts(1, seed=9)[0] * 2  # a long shared prefix
    first = engine.run([greedy([*system, 11], "a")])
    hits_before = engine.stats().prefix_hit_tokens
    second = engine.run([greedy([*system, 12], "b"), greedy([*system, 11], "a2")])
    assert engine.stats().prefix_hit_tokens - hits_before >= 2 * (len(system) // 4) * 4
    assert tokens(second)["a2"] == tokens(first)["a"]
    fresh = build_engine(checkpoint, num_blocks=256, block_size=4, prefix_caching=False)
    assert tokens(fresh.run([greedy([*system, 12], "b")]))["b"] == tokens(second)["b"]


def test_stop_sequence_split_across_tokens(checkpoint, tokenizer) -> None:
    base = build_engine(checkpoint, num_blocks=256, tokenizer=tokenizer)
    prompt = tokenizer.encode("def main(self):\n    return")
    free_run = base.run([greedy(prompt, "free", max_new=24, ignore_eos=True)])["free"]
    text = "".join(e.text for e in free_run)
    pieces = [tokenizer.decode([e.token_id]) for e in free_run]
    # a stop string spanning the boundary between two generated tokens
    boundary = next(i for i in range(1, len(pieces)) if pieces[i - 1].strip() and pieces[i].strip())
    start = sum(len(p) for p in pieces[:boundary])
    stop = text[start - 1 : start + 1]
    engine = build_engine(checkpoint, num_blocks=256, tokenizer=tokenizer)
    events = engine.run([greedy(prompt, "s", max_new=24, ignore_eos=True, stop=(stop,))])["s"]
    assert events[-1].finish_reason == "stop_sequence"
    streamed = "".join(e.text for e in events)
    assert streamed == text[: text.find(stop)]
    assert stop not in streamed


def test_cancelled_requests_return_every_block(checkpoint) -> None:
    engine = build_engine(checkpoint, num_blocks=64, block_size=4)
    for n, ids in enumerate(prompts(6)):
        engine.add_request(greedy(ids, f"r{n}", max_new=50))
    for _ in range(3):
        engine.step()
    assert engine.stats().kv_blocks_used > 0
    for n in range(6):
        engine.abort(f"r{n}")
    assert engine.stats().kv_blocks_used == 0 and not engine.has_work()


def test_requests_that_cannot_be_served(checkpoint) -> None:
    from tgi_core.engine.engine import RequestError

    engine = build_engine(checkpoint, num_blocks=4, block_size=4)
    with pytest.raises(RequestError, match="exceed the KV cache"):
        engine.add_request(greedy(list(range(3, 20)), "big"))
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request(greedy([], "empty"))


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(checkpoint) -> None:
    engine = build_engine(checkpoint, num_blocks=64)
    original = engine.runner.execute
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    engine.runner.execute = flaky
    engine.add_request(greedy([5, 6, 7], "bad"))
    events = engine.step()
    assert events[0].error == "generation failed: boom"
    assert engine.stats().kv_blocks_used == 0
    good = engine.run([greedy([5, 6, 7], "good", max_new=3)])
    assert len(good["good"]) == 3


def test_prompt_logprobs_match_transformers(checkpoint) -> None:
    ids = prompts(1, seed=5)[0] + [9, 10, 11]
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    with torch.no_grad():
        log_probs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [log_probs[p, ids[p + 1]].item() for p in range(len(ids) - 1)]
    for budget in (4096, 5):  # whole, and in chunks
        engine = build_engine(checkpoint, num_blocks=64, block_size=4, max_batch_tokens=budget)
        request = GenerateRequest(
            request_id="p",
            prompt_token_ids=tuple(ids),
            prompt_logprobs=True,
            stopping=StoppingParams(max_new_tokens=2),
        )
        events = engine.run([request])["p"]
        prompt = events[0].prompt_logprobs
        assert [t.id for t in prompt] == ids and prompt[0].logprob is None
        assert [t.logprob for t in prompt[1:]] == pytest.approx(expected, abs=1e-4)
        assert events[1].prompt_logprobs is None


def test_n_samples_share_the_prompt_and_each_equals_its_own_seed(checkpoint) -> None:
    ids = tuple(prompts(1, seed=6)[0] * 2)
    sampling = SamplingParams(do_sample=True, temperature=1.0, seed=100)
    stopping = StoppingParams(max_new_tokens=8, ignore_eos=True)
    engine = build_engine(checkpoint, num_blocks=64, block_size=4)
    engine.add_request(
        GenerateRequest(
            request_id="n", prompt_token_ids=ids, n=3, sampling=sampling, stopping=stopping
        )
    )
    events, peak_blocks = [], 0
    while engine.has_work():
        events += engine.step()
        peak_blocks = max(peak_blocks, engine.stats().kv_blocks_used)
    by_index = {i: [e.token_id for e in events if e.index == i] for i in range(3)}
    assert all(len(tokens) == 8 for tokens in by_index.values())
    assert len({tuple(t) for t in by_index.values()}) > 1  # the samples differ
    assert [e.done for e in events].count(True) == 1 and events[-1].done
    prompt_blocks = len(ids) // 4
    assert peak_blocks < 3 * (prompt_blocks + 3)  # the prompt's blocks are shared
    assert engine.stats().kv_blocks_used == 0
    for i in range(3):
        alone = GenerateRequest(
            request_id="one",
            prompt_token_ids=ids,
            stopping=stopping,
            sampling=SamplingParams(do_sample=True, seed=100 + i),
        )
        single = build_engine(checkpoint, num_blocks=64, block_size=4).run([alone])["one"]
        assert [e.token_id for e in single] == by_index[i]


def test_a_failure_after_the_forward_fails_only_its_requests(checkpoint) -> None:
    engine = build_engine(checkpoint, num_blocks=64)
    original = engine._sample
    engine._sample = lambda *args: (_ for _ in ()).throw(ValueError("sampler broke"))
    engine.add_request(greedy([5, 6, 7], "bad"))
    events = engine.step()
    assert events[0].error == "generation failed: sampler broke" and events[0].done
    assert engine.stats().kv_blocks_used == 0 and not engine.has_work()
    engine._sample = original
    assert len(engine.run([greedy([5, 6, 7], "good", max_new=3)])["good"]) == 3


def test_last_token_rows_are_batched_without_a_copy_when_consecutive() -> None:
    """A step's last-token logits (consecutive rows of one tensor) become the batch
    as a view; rows that are not (a forked request's shared row) are stacked."""
    from tgi_core.engine.engine import _stack_rows

    logits = torch.randn(5, 7)
    rows = [logits[i] for i in range(1, 4)]
    batched = _stack_rows(rows)
    assert torch.equal(batched, torch.stack(rows))
    assert batched.data_ptr() == logits[1].data_ptr()  # no copy
    shared = [logits[2], logits[2], logits[4]]
    stacked = _stack_rows(shared)
    assert torch.equal(stacked, torch.stack(shared)) and stacked.data_ptr() != logits.data_ptr()
