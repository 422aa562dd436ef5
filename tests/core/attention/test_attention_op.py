"""The C++ kernel of ``tgi::attention`` (``kernels/attention_ops.cpp``).

In a decode step installed by :class:`NativeDecodeStep`, a registered layer's call runs
the paged decode kernel from C++, writing the new keys and values first; every other
call goes to the Python implementation. Called outside ``current_batch()``, that Python
path raises, which is how these tests see which path ran.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from tgi_core.attention import native
from tgi_core.attention.native import NativeDecodeStep, paged_decode
from tgi_core.attention.sdpa import SdpaBackend
from tgi_core.engine.requests import GenerateRequest, StoppingParams
from tgi_core.model.fixtures import build_engine
from tgi_core.model.layers.opaque import register_layer

pytestmark = pytest.mark.skipif(
    native._op_library() is None, reason="no C++ compiler to build the attention op"
)

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 4
PYTHON_PATH = "outside current_batch"


def scenario(lengths: list[int], seed: int = 0):
    """bf16 caches with blocks scattered through them, each sequence's new token at its
    last position, and the new keys and values as strided rows of a fused projection."""
    generator = torch.Generator().manual_seed(seed)
    blocks_each = max(-(-n // BLOCK) for n in lengths)
    num_blocks = len(lengths) * blocks_each + 3
    order = torch.randperm(num_blocks, generator=generator)
    tables = order[: len(lengths) * blocks_each].view(len(lengths), blocks_each).contiguous()
    shape = (num_blocks * BLOCK, KV_HEADS, HEAD_DIM)
    keys = torch.randn(shape, generator=generator).bfloat16()
    values = torch.randn(shape, generator=generator).bfloat16()
    seqs = len(lengths)
    q = torch.randn(seqs, HEADS, HEAD_DIM, generator=generator).bfloat16()
    fused = torch.randn(seqs, HEADS + 2 * KV_HEADS, HEAD_DIM, generator=generator).bfloat16()
    k, v = fused[:, HEADS : HEADS + KV_HEADS], fused[:, HEADS + KV_HEADS :]
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    last = lengths_t - 1
    slots = tables[torch.arange(seqs), last // BLOCK] * BLOCK + last % BLOCK
    return q, k, v, keys, values, tables, lengths_t, slots


def fresh_key() -> int:
    """A layer key no other test registered."""
    return register_layer(nn.Identity())


def expected_output(q, k, v, keys, values, tables, lengths, slots, scale=0.125):
    written_keys, written_values = keys.clone(), values.clone()
    written_keys[slots], written_values[slots] = k, v
    out = paged_decode(q, written_keys, written_values, tables, lengths, BLOCK, scale)
    return out.flatten(1), written_keys, written_values


def test_a_registered_layer_of_the_installed_step_runs_the_kernel() -> None:
    """Bit for bit the Python path's kernel call, the new rows written first; mixed
    lengths, a sequence of one position included."""
    q, k, v, keys, values, tables, lengths, slots = scenario([1, 17, 40, 5])
    expected, written_keys, written_values = expected_output(
        q, k, v, keys, values, tables, lengths, slots
    )
    key = fresh_key()
    step = NativeDecodeStep.create(7001, tables, lengths, slots, BLOCK)
    assert step is not None
    step.register(key, keys, values, 0.125)
    with step:
        got = torch.ops.tgi.attention(q, k, v, key)
    assert torch.equal(got, expected)
    assert torch.equal(keys, written_keys) and torch.equal(values, written_values)


def test_every_other_call_goes_to_the_python_path() -> None:
    q, k, v, keys, values, tables, lengths, slots = scenario([6, 9])
    key, unregistered = fresh_key(), fresh_key()
    step = NativeDecodeStep.create(7002, tables, lengths, slots, BLOCK)
    other_cache = NativeDecodeStep.create(7003, tables, lengths, slots, BLOCK)
    assert step is not None and other_cache is not None
    step.register(key, keys, values, 0.125)
    untouched = keys.clone()
    with pytest.raises(RuntimeError, match=PYTHON_PATH):  # no step installed
        torch.ops.tgi.attention(q, k, v, key)
    with other_cache, pytest.raises(RuntimeError, match=PYTHON_PATH):  # another cache's
        torch.ops.tgi.attention(q, k, v, key)
    transposed = k.contiguous().transpose(1, 2).contiguous().transpose(1, 2)  # rows not dense
    calls = {
        "unregistered layer": (q, k, v, unregistered),
        "float32 queries": (q.float(), k, v, key),
        "no new keys (cross-attention)": (q, None, None, key),
        "a row per sequence missing": (q[:1], k[:1], v[:1], key),
        "keys not dense per row": (q, transposed, v, key),
        "float32 keys": (q, k.float(), v, key),
    }
    with step:
        for name, args in calls.items():
            with pytest.raises(RuntimeError, match=PYTHON_PATH):
                torch.ops.tgi.attention(*args)
                pytest.fail(f"{name}: the C++ kernel ran it")
    assert torch.equal(keys, untouched)


def test_a_slot_outside_the_cache_is_refused_before_anything_is_written() -> None:
    q, k, v, keys, values, tables, lengths, _ = scenario([3, 2])
    key = fresh_key()
    before = keys.clone()
    for bad in (keys.shape[0], -1):
        slots = torch.tensor([0, bad])
        step = NativeDecodeStep.create(7004, tables, lengths, slots, BLOCK)
        assert step is not None
        step.register(key, keys, values, 0.125)
        with step, pytest.raises(IndexError, match="outside"):
            torch.ops.tgi.attention(q, k, v, key)
        assert torch.equal(keys, before)


def test_a_step_is_installed_for_its_thread_and_restored_on_exit() -> None:
    q, k, v, keys, values, tables, lengths, slots = scenario([5, 8])
    expected, _, _ = expected_output(q, k, v, keys, values, tables, lengths, slots)
    key = fresh_key()
    outer = NativeDecodeStep.create(7005, tables, lengths, slots, BLOCK)
    inner = NativeDecodeStep.create(7006, tables, lengths, slots, BLOCK)
    assert outer is not None and inner is not None
    outer.register(key, keys, values, 0.125)
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            torch.ops.tgi.attention(q, k, v, key)
        except RuntimeError as exc:
            errors.append(exc)

    with outer:
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        with inner, pytest.raises(RuntimeError, match=PYTHON_PATH):  # the inner cache's
            torch.ops.tgi.attention(q, k, v, key)
        assert torch.equal(torch.ops.tgi.attention(q, k, v, key), expected)
    assert len(errors) == 1 and PYTHON_PATH in str(errors[0])
    with pytest.raises(RuntimeError, match=PYTHON_PATH):
        torch.ops.tgi.attention(q, k, v, key)


def generate(path: Path, prompt_lengths: list[int], compile: bool) -> dict[str, list[int]]:
    engine = build_engine(path, dtype=torch.bfloat16, num_blocks=64, block_size=4, compile=compile)
    generator = torch.Generator().manual_seed(3)
    requests = [
        GenerateRequest(
            request_id=f"r{i}",
            prompt_token_ids=tuple(torch.randint(3, 256, (n,), generator=generator).tolist()),
            stopping=StoppingParams(max_new_tokens=12, ignore_eos=True),
        )
        for i, n in enumerate(prompt_lengths)
    ]
    out = engine.run(requests)
    assert engine.stats().kv_blocks_used == 0
    return {rid: [event.token_id for event in events] for rid, events in out.items()}


@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_an_engine_decodes_the_same_tokens_on_the_cpp_path(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, compile: bool
) -> None:
    """Greedy bf16 generation, a batch of mixed lengths, compiled or eager: the same tokens
    with decode steps installed for the C++ kernel as without, and the Python path then
    runs only the steps that register the layers (the first decode step) and the
    prefills."""
    calls = {"python": 0}
    forward = SdpaBackend.forward

    def counting(self, layer, q, k, v, batch):  # type: ignore[no-untyped-def]
        calls["python"] += 1
        return forward(self, layer, q, k, v, batch)

    monkeypatch.setattr(SdpaBackend, "forward", counting)
    lengths = [7, 3, 30, 12]
    with_cpp = generate(tiny_llama, lengths, compile)
    cpp_calls, calls["python"] = calls["python"], 0
    monkeypatch.setattr(NativeDecodeStep, "create", classmethod(lambda cls, *args: None))
    without = generate(tiny_llama, lengths, compile)
    assert with_cpp == without
    assert all(len(tokens) == 12 for tokens in with_cpp.values())
    assert cpp_calls < calls["python"] / 3
