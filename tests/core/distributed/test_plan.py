"""The step plan: its wire format, and the stand-ins workers run the same step with.

A worker calls the very same ``ModelRunner.execute`` as rank 0, with chunks rebuilt
from the plan; running a step both ways on one model must give identical logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tgi_core.distributed.plan import ChunkPlan, PlanKind, StepPlan
from tgi_core.engine.model_runner import ModelRunner
from tgi_core.engine.requests import GenerateRequest
from tgi_core.engine.scheduler import ScheduledChunk
from tgi_core.engine.sequence import Sequence


def roundtrip(plan: StepPlan) -> StepPlan:
    header, payload = plan.to_tensors()
    assert header.dtype == payload.dtype == torch.int64
    return StepPlan.from_tensors(header.clone(), payload.clone())


def test_a_mixed_step_survives_the_wire() -> None:
    plan = StepPlan(
        PlanKind.STEP,
        [
            ChunkPlan(0, 5, [3, 7], [10, 11, 12, 13, 14], "all"),  # a prompt, logprobs
            ChunkPlan(17, 1, [1, 2, 9], [42], "last"),  # a decode
            ChunkPlan(4, 3, [5], [1, 2, 3], "none"),  # a middle chunk of a prompt
            ChunkPlan(0, 1, [8, 6], [0], "last", encoder_len=19, encoder_ids=list(range(19))),
            ChunkPlan(2, 1, [4, 0], [9], "last", encoder_len=30),  # source encoded before
        ],
        [(3, 11), (7, 12)],
    )
    assert roundtrip(plan) == plan


@pytest.mark.parametrize("kind", [PlanKind.HEARTBEAT, PlanKind.SHUTDOWN])
def test_control_plans_have_no_payload(kind: PlanKind) -> None:
    _header, payload = StepPlan(kind).to_tensors()
    assert payload.numel() == 0
    assert roundtrip(StepPlan(kind)) == StepPlan(kind)


def test_a_truncated_payload_is_refused() -> None:
    header, payload = StepPlan(PlanKind.STEP, [ChunkPlan(0, 2, [0], [5, 6])]).to_tensors()
    with pytest.raises(ValueError, match="header says"):
        StepPlan.from_tensors(header, payload[:-1])


def test_stand_ins_read_only_this_steps_tokens() -> None:
    plan = roundtrip(StepPlan(PlanKind.STEP, [ChunkPlan(6, 2, [0, 1], [7, 8], "last")]))
    (chunk,), modes = plan.runner_inputs()
    assert modes == ["last"]
    assert chunk.seq.token_ids[6:8] == [7, 8]
    assert len(chunk.seq.token_ids) == 8
    with pytest.raises(IndexError):
        chunk.seq.token_ids[0:8]


def _request(request_id: str, prompt: list[int]) -> GenerateRequest:
    return GenerateRequest(request_id=request_id, prompt_token_ids=tuple(prompt))


def _runner(path: Path) -> ModelRunner:
    from tgi_core.model.base import ModelContext
    from tgi_core.model.loader import load_model
    from tgi_core.plugins import make_plugin_manager
    from tgi_core.registry import Registry

    registry = Registry.build(make_plugin_manager())
    loaded = load_model(str(path), registry, ctx=ModelContext(dtype=torch.float32))
    backend = registry.attention_backends["sdpa"].load()()
    return ModelRunner(loaded.model, backend, num_blocks=16, block_size=4)


@pytest.mark.parametrize("model", ["llama-2kv", "t5"])
def test_stand_ins_give_the_same_logits_as_the_scheduled_chunks(
    shard_checkpoints: dict[str, Path], model: str
) -> None:
    """Three steps (two prefills with a chunked one, then decodes with a block copy),
    run on two runners over the same weights: one with the engine's chunks, one with
    the chunks a worker rebuilds from the plan."""
    ours, theirs = _runner(shard_checkpoints[model]), _runner(shard_checkpoints[model])
    theirs.model = ours.model  # identical weights, separate caches
    encoder = model == "t5"
    sequences = []
    for index, prompt in enumerate(([5, 6, 7, 8, 9, 10, 11], [20, 21, 22])):
        request = _request(f"r{index}", prompt)
        seq = Sequence(request, arrival=index)
        if encoder:
            seq = Sequence(request, arrival=index, token_ids=[0], encoder_ids=tuple(prompt))
        seq.block_table = [4 * index, 4 * index + 1, 4 * index + 2]
        sequences.append(seq)
    first, second = sequences
    if encoder:  # each source is encoded whole in the step that admits its sequence
        steps = [([ScheduledChunk(first, 0, 1), ScheduledChunk(second, 0, 1)], ["last", "last"])]
    else:  # the first prompt in two chunks, the second whole with every logit
        steps = [
            ([ScheduledChunk(first, 0, 4), ScheduledChunk(second, 0, 3)], ["none", "all"]),
            ([ScheduledChunk(first, 4, 3)], ["last"]),
        ]
    for tokens in ([30, 31], [32, 33]):
        for seq, token in zip(sequences, tokens, strict=True):
            seq.token_ids.append(token)
        decode = [ScheduledChunk(seq, len(seq.token_ids) - 1, 1) for seq in sequences]
        steps.append((decode, ["last", "last"]))
    for index, (chunks, modes) in enumerate(steps):
        copies = [(4, 9), (0, 10)] if index == 1 else []  # copy-on-write, as for a fork
        plan = roundtrip(StepPlan.from_scheduled(chunks, modes, copies))
        assert plan.copies == copies
        ours.copy_blocks(copies)
        expected = ours.execute(chunks, modes)
        theirs.copy_blocks(plan.copies)
        stand_ins, planned_modes = plan.runner_inputs()
        got = theirs.execute(stand_ins, planned_modes)
        for want, have in zip(expected, got, strict=True):
            assert (want is None) == (have is None)
            if want is not None and have is not None:
                assert torch.equal(want, have)
    for layer_keys, their_keys in zip(ours.kv_cache.keys, theirs.kv_cache.keys, strict=True):
        assert torch.equal(layer_keys, their_keys)
