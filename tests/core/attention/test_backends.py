"""Attention backends agree with dense attention on mixed packed batches over a paged cache."""

from __future__ import annotations

import random

import pytest
import torch

from tgi_core.attention import sdpa
from tgi_core.attention.batch import ForwardBatch, SequenceChunk, slots_for
from tgi_core.attention.kv_cache import KVCache
from tgi_core.attention.reference import ReferenceBackend
from tgi_core.attention.sdpa import SdpaBackend
from tgi_core.model.layers.alibi import alibi_slopes
from tgi_core.model.layers.attention import Attention

BACKENDS = (SdpaBackend, ReferenceBackend)
BLOCK = 4


def dense_attention(q, k, v, *, scale, window=None, slopes=None):
    """One sequence, every position: q [n, H, D] over k, v [n, Hkv, D], causal."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    n = q.shape[0]
    pos = torch.arange(n)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    if slopes is not None:
        scores = scores + slopes[:, None, None] * pos.float()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class Scenario:
    """Sequences with a known full history, split into steps of cached + new tokens."""

    def __init__(self, lengths, heads=4, kv_heads=2, dim=8, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.q = [torch.randn(n, heads, dim, generator=generator) for n in lengths]
        self.k = [torch.randn(n, kv_heads, dim, generator=generator) for n in lengths]
        self.v = [torch.randn(n, kv_heads, dim, generator=generator) for n in lengths]
        free = list(range(200))
        random.Random(seed).shuffle(free)  # blocks anywhere in the cache, not in order
        self.tables = [[free.pop() for _ in range(-(-n // BLOCK))] for n in lengths]

    def run(self, backend, layer, steps, dtype=torch.float32):
        """``steps``: per step, per sequence, the number of new tokens (0: not scheduled);
        q, k and v go in as ``dtype``."""
        cache = KVCache.allocate([layer], 200, BLOCK, backend.kv_cache_dtype(dtype))
        done = [0] * len(self.q)
        outputs = [[] for _ in self.q]
        for step in steps:
            chunks, members = [], []
            for i, n in enumerate(step):
                if n:
                    chunks.append(SequenceChunk(done[i], n, self.tables[i]))
                    members.append(i)
            batch = ForwardBatch.build(chunks, cache, backend)

            def new(xs, step=step, members=members):
                return torch.cat([xs[i][done[i] : done[i] + step[i]] for i in members]).to(dtype)

            out = layer(new(self.q), new(self.k), new(self.v), batch)
            for j, i in enumerate(members):
                rows = out[batch.query_start[j] : batch.query_start[j + 1]]
                outputs[i].append(rows.view(-1, layer.num_heads, layer.head_dim))
                done[i] += step[i]
        return [torch.cat(parts) for parts in outputs], cache


STEPS = [
    [5, 9, 1, 0],  # prompts of different lengths (one a single token), one not yet admitted
    [1, 4, 1, 7],  # decodes, a prefill chunk continuing a cached prefix, a new prompt
    [1, 1, 1, 1],  # all decodes
    [1, 1, 1, 1],
    [3, 1, 1, 1],
]
LENGTHS = [sum(step[i] for step in STEPS) for i in range(4)]


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "window", "alibi"),
    [
        (4, 4, None, False),
        (4, 2, None, False),
        (4, 1, None, False),
        (4, 2, 3, False),
        (4, 4, None, True),
        (6, 6, 5, True),
    ],
)
def test_backend_matches_dense_attention(backend_cls, heads, kv_heads, window, alibi) -> None:
    scenario = Scenario(LENGTHS, heads=heads, kv_heads=kv_heads)
    slopes = alibi_slopes(heads) if alibi else None
    layer = Attention(heads, 8, kv_heads, scale=8**-0.5, sliding_window=window, alibi_slopes=slopes)
    layer.layer_index = 0
    outputs, cache = scenario.run(backend_cls(), layer, STEPS)
    for i, out in enumerate(outputs):
        expected = dense_attention(
            scenario.q[i], scenario.k[i], scenario.v[i], scale=8**-0.5, window=window, slopes=slopes
        )
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        slots = torch.tensor(slots_for(scenario.tables[i], 0, LENGTHS[i], BLOCK))
        assert torch.equal(cache.keys[0][slots], scenario.k[i])  # every K/V landed in its slot
        assert torch.equal(cache.values[0][slots], scenario.v[i])


@pytest.mark.parametrize("native_bf16", [True, False])
@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_bfloat16_inputs_give_bfloat16_outputs(
    backend_cls, native_bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sdpa keeps a bf16 cache and computes in bf16 where the CPU has native bf16, float32
    otherwise; the reference backend always uses float32. Either way the output is bf16
    and within bf16 rounding of exact attention over the same bf16 inputs."""
    monkeypatch.setattr(sdpa, "cpu_has_native_bf16", lambda: native_bf16)
    scenario = Scenario([6, 2], heads=2, kv_heads=2)
    layer = Attention(2, 8, 2, scale=0.3)
    layer.layer_index = 0
    cache = KVCache.allocate([layer], 200, BLOCK, backend_cls().kv_cache_dtype(torch.bfloat16))
    bf16_cache = backend_cls is SdpaBackend and native_bf16
    assert cache.keys[0].dtype == (torch.bfloat16 if bf16_cache else torch.float32)
    assert backend_cls().kv_cache_dtype(torch.float32) == torch.float32
    batch = ForwardBatch.build(
        [SequenceChunk(0, 6, scenario.tables[0]), SequenceChunk(0, 2, scenario.tables[1])],
        cache,
        backend_cls(),
    )
    q, k, v = (torch.cat(t).bfloat16() for t in (scenario.q, scenario.k, scenario.v))
    out = layer(q, k, v, batch)
    assert out.dtype == torch.bfloat16 and out.shape == (8, 16)
    for i, (start, end) in enumerate([(0, 6), (6, 8)]):
        expected = dense_attention(
            q[start:end].float(), k[start:end].float(), v[start:end].float(), scale=0.3
        )
        got = out[start:end].view(-1, 2, 8).float()
        torch.testing.assert_close(got, expected, atol=3e-2, rtol=2e-2, msg=f"sequence {i}")


def test_batch_metadata() -> None:
    cache = KVCache(keys=[], values=[], num_blocks=8, block_size=4)
    batch = ForwardBatch.build(
        [SequenceChunk(5, 2, [3, 1]), SequenceChunk(0, 3, [6])], cache, ReferenceBackend()
    )
    assert batch.positions.tolist() == [5, 6, 0, 1, 2]
    assert batch.slot_mapping.tolist() == [1 * 4 + 1, 1 * 4 + 2, 24, 25, 26]
    assert batch.query_start == [0, 2, 5]
    assert batch.last_token_indices().tolist() == [1, 4]
    assert batch.seq_lens_per_token().tolist() == [7, 7, 3, 3, 3]
    with pytest.raises(ValueError, match="block table of 1 blocks cannot hold 7 tokens"):
        ForwardBatch.build([SequenceChunk(5, 2, [3])], cache, ReferenceBackend())


def test_builtin_spec_features_match_the_backends(tgi_registry) -> None:
    for backend_cls in BACKENDS:
        spec = tgi_registry.attention_backends[backend_cls.name]
        assert spec.load() is backend_cls
        assert spec.features == backend_cls.features


@pytest.mark.parametrize("dim", [64, 8])
def test_bfloat16_prefills_attend_through_a_kernel(
    dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a bf16 cache on a CPU without AMX, prompts and chunks continuing a cached
    prefix attend in place from the cache: a step's prefills in one call of the prefill
    kernel where it takes the head size (64) and the CPU has AVX-512 BF16; else through
    the decode kernel, each query over the cache up to its own position (8: as many
    calls as prefills, not one per query). Within bf16 rounding of exact attention."""
    from tgi_core.attention import flash_prefill, native

    if not native.paged_decode_available():
        pytest.skip("no C++ compiler to build the decode kernel")
    prefill_kernel = flash_prefill.flash_prefill_available(dim)
    if dim == 64 and not prefill_kernel:
        pytest.skip("no AVX-512 BF16 for the prefill kernel")
    monkeypatch.setattr(sdpa, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(sdpa, "_has_amx", lambda: False)  # the path CPUs without AMX take
    lengths_per_query: list[list[int]] = []
    attend = native.DecodeSequences.attend

    def recorded(self, q, *args, **kwargs):
        lengths_per_query.append(self._lengths.tolist())
        return attend(self, q, *args, **kwargs)

    monkeypatch.setattr(native.DecodeSequences, "attend", recorded)
    prefill_calls: list[tuple[list[int], list[int]]] = []
    attend_prefills = flash_prefill.PrefillSequences.attend

    def recorded_prefills(self, *args, **kwargs):
        prefill_calls.append((self._q_len.tolist(), self._q_pos.tolist()))
        return attend_prefills(self, *args, **kwargs)

    monkeypatch.setattr(flash_prefill.PrefillSequences, "attend", recorded_prefills)
    scenario = Scenario(LENGTHS, heads=4, kv_heads=2, dim=dim)
    layer = Attention(4, dim, 2, scale=dim**-0.5)
    layer.layer_index = 0
    outputs, _ = scenario.run(SdpaBackend(), layer, STEPS, dtype=torch.bfloat16)
    if prefill_kernel:  # (queries, first position) of each prefill, per step with any
        assert prefill_calls == [([5, 9], [0, 0]), ([4, 7], [9, 0]), ([3], [8])]
    else:
        assert not prefill_calls
        assert [1, 2, 3, 4, 5] in lengths_per_query  # sequence 0's prompt, step 1
        assert [10, 11, 12, 13] in lengths_per_query  # sequence 1's chunk after 9 cached
    for i, out in enumerate(outputs):
        q, k, v = (t[i].bfloat16().float() for t in (scenario.q, scenario.k, scenario.v))
        expected = dense_attention(q, k, v, scale=dim**-0.5)
        torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=2e-2)
