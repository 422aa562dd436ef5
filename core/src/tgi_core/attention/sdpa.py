"""The default backend: PyTorch's ``scaled_dot_product_attention`` over the paged cache.

Per step, ``prepare`` splits the sequences in two groups and builds their index tensors
once for every layer:

- decode sequences (one new token each) are attended together: in place from a bf16
  cache by the native kernel (``attention/native.py``) when the layer has no ALiBi or
  window (the kernel adds T5's relative position bias itself); otherwise in one batched
  SDPA call, their keys gathered from the cache into ``[S, max_len]`` (padding masked);
- prefill sequences (a prompt or a chunk of one): where the native kernels apply and
  the CPU has no AMX, all of the step's in one call of the prefill kernel
  (``attention/flash_prefill.py``) in place from the cache (the chunks' keys are
  written first), or, for head sizes it is not built for, each query of a chunk as one
  of the decode kernel's sequences over the cache up to its own position; otherwise one
  by one through SDPA, a fresh prompt over its own new keys with a causal mask, a chunk
  that continues a cached prefix over its past gathered from the cache.

Encoder-decoder models (T5) add two kinds of layers: encoder layers attend within each
source of the step (bidirectional, no cache; on the prefill kernel where it applies, the
step's sources in one call), and cross-attention layers attend to the
sequence's source keys and values, kept in the cache since its encoder ran. T5's
relative position bias is computed once per step and shared by every layer.

The cache and the attention math are bfloat16 for a bfloat16 model on a CPU that
computes bf16 natively (AVX-512 BF16 or AMX: there bf16 SDPA measured 2-3x faster than
float32, and the gathers move half the bytes), float32 otherwise (where bf16 is emulated,
bf16 SDPA is several times slower; docs/benchmarks.md). Layers with an additive position
bias that grows with the position (ALiBi) always compute in float32, so the bias keeps its
precision, reading a bf16 cache through a conversion.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tgi_core import kernels
from tgi_core.attention.backend import AttentionBackend
from tgi_core.attention.batch import ForwardBatch, slots_for
from tgi_core.attention.flash_prefill import (
    PrefillSequences,
    flash_prefill_available,
    relative_bias_table,
)
from tgi_core.attention.native import (
    DecodeSequences,
    NativeDecodeStep,
    can_write_new,
    paged_decode,
    paged_decode_available,
)
from tgi_core.model.base import cpu_has_native_bf16
from tgi_core.model.layers.attention import Attention


@functools.cache
def _has_amx() -> bool:
    """Whether this CPU has AMX (bf16 SDPA is fast at every shape there)."""
    return "amx_bf16" in kernels.cpu_flags()


def _block_tables(
    block_tables: Sequence[Sequence[int]], lengths: Sequence[int], block_size: int
) -> torch.Tensor:
    """Per sequence, the blocks covering its first ``lengths[i]`` positions ``[S, B]``,
    padded with block 0 (present in every cache, and masked or never read)."""
    width = -(-max(lengths) // block_size)
    rows = []  # one tensor from lists: a copy per row cost ~10 us each, ~0.6 ms a step
    for table, length in zip(block_tables, lengths, strict=True):
        used = -(-length // block_size)
        rows.append([*table[:used], *itertools.repeat(0, width - used)])
    return torch.tensor(rows, dtype=torch.int64).view(len(lengths), width)


def _slots(tables: torch.Tensor, longest: int, block_size: int) -> torch.Tensor:
    """The cache slots of positions ``[0, longest)`` through ``tables`` ``[S, B]``
    (:func:`_block_tables`): ``[S, longest]``, padding block 0's."""
    positions = torch.arange(longest)
    return tables[:, positions // block_size] * block_size + positions % block_size


@dataclass
class _Decodes:
    """The step's decode sequences (one new token each). What only the gather + SDPA
    path reads (slots, masks) is built on first use: the kernel path never does."""

    rows: torch.Tensor  # [S] packed index of each decode token
    query_pos: torch.Tensor  # [S] position of each decode token
    block_tables: torch.Tensor  # [S, max_blocks] each sequence's blocks (padded with 0)
    lengths: torch.Tensor  # [S] positions each sequence attends to
    max_len: int
    block_size: int
    #: the sequences bound for the decode kernel, once a step (by: new rows written?)
    bound: dict[bool, DecodeSequences] = field(default_factory=dict)

    @functools.cached_property
    def slots(self) -> torch.Tensor:
        """``[S, max_len]`` cache slots of each sequence's positions (padding: block 0)."""
        return _slots(self.block_tables, self.max_len, self.block_size)

    @functools.cached_property
    def flat_slots(self) -> torch.Tensor:
        return self.slots.flatten()

    @functools.cached_property
    def all_valid(self) -> bool:
        """Every sequence has max_len positions (no padding)."""
        return bool((self.lengths == self.max_len).all())

    @functools.cached_property
    def valid(self) -> torch.Tensor:
        """``[S, max_len]`` bool: the position exists."""
        return torch.arange(self.max_len)[None, :] < self.lengths[:, None]

    @functools.cached_property
    def key_pos(self) -> torch.Tensor:
        """``[max_len]`` float positions (ALiBi, position biases)."""
        return torch.arange(self.max_len).float()

    def bind(self, writes: bool, slots: torch.Tensor | None = None) -> DecodeSequences:
        """The step's sequences for the decode kernel; with ``writes``, the kernel also
        writes each sequence's new key and value row, to ``slots`` (``[S]``)."""
        sequences = self.bound.get(writes)
        if sequences is None:
            sequences = DecodeSequences(
                self.block_tables, self.lengths, self.block_size, slots if writes else None
            )
            self.bound[writes] = sequences
        return sequences


@dataclass
class _Prefill:
    start: int
    end: int
    num_cached: int
    block_table: Sequence[int]
    block_size: int

    @functools.cached_property
    def slots(self) -> torch.Tensor | None:
        """Every position's slot when a cached prefix is attended (SDPA), else None."""
        if not self.num_cached:
            return None
        end = self.num_cached + self.end - self.start
        return torch.tensor(slots_for(self.block_table, 0, end, self.block_size))

    @functools.cached_property
    def as_decodes(self) -> DecodeSequences:
        """Each query of the chunk as one sequence of the decode kernel, over the cached
        positions up to its own (the chunk's keys are in the cache by then)."""
        n = self.end - self.start
        used = -(-(self.num_cached + n) // self.block_size)
        table = torch.tensor(list(self.block_table[:used]), dtype=torch.int64)
        lengths = torch.arange(self.num_cached + 1, self.num_cached + n + 1)
        return DecodeSequences(table.expand(n, used).contiguous(), lengths, self.block_size)


@dataclass
class _Cross:
    """Where each sequence's source keys live, for cross-attention; the slots and mask
    that only the SDPA paths read are built on first use."""

    tables: torch.Tensor  # [S, B] each sequence's blocks (padded with 0)
    lengths: torch.Tensor  # [S] each sequence's source length
    longest: int
    single_rows: list[int]  # the sequences with one query (batched together)
    rows: torch.Tensor  # their packed query index
    single_tables: torch.Tensor  # their block tables, for the decode kernel
    single_lengths: torch.Tensor  # their sources' lengths
    block_size: int

    @functools.cached_property
    def slots(self) -> torch.Tensor:
        """``[S, E]`` cache slots of each sequence's source (padding: block 0)."""
        return _slots(self.tables, self.longest, self.block_size)

    @functools.cached_property
    def valid(self) -> torch.Tensor:
        """``[S, E]`` bool: the source position exists."""
        return torch.arange(self.longest)[None, :] < self.lengths[:, None]


@dataclass
class _Plan:
    decodes: _Decodes | None
    prefills: list[_Prefill]
    cross: _Cross | None = None
    #: per-step tensors every layer shares (position biases), built on first use
    memo: dict[Any, Any] = field(default_factory=dict)
    _sources: PrefillSequences | None = None

    @property
    def decode_only(self) -> bool:
        return self.decodes is not None and not self.prefills

    @functools.cached_property
    def prefill_sequences(self) -> PrefillSequences:
        """The step's prefills bound for the prefill kernel (their keys in the cache),
        once for every layer."""
        lengths = [p.num_cached + p.end - p.start for p in self.prefills]
        block_size = self.prefills[0].block_size
        return PrefillSequences(
            [p.start for p in self.prefills],
            [p.end - p.start for p in self.prefills],
            [p.num_cached for p in self.prefills],
            lengths,
            block_tables=_block_tables([p.block_table for p in self.prefills], lengths, block_size),
            block_size=block_size,
        )

    def encoder_sources(self, starts: Sequence[int]) -> PrefillSequences:
        """The step's sources (packed rows from ``starts``) as the prefill kernel's
        sequences, once for every encoder layer."""
        if self._sources is None:
            lengths = [end - start for start, end in itertools.pairwise(starts)]
            self._sources = PrefillSequences(
                starts[:-1], lengths, [0] * len(lengths), lengths, kv_start=starts[:-1]
            )
        return self._sources


class SdpaBackend(AttentionBackend):
    """Batched decodes and per-sequence prefills through ``F.scaled_dot_product_attention``."""

    name: ClassVar[str] = "sdpa"
    features: ClassVar[frozenset[str]] = frozenset(
        {
            "causal",
            "paged_kv",
            "prefix_caching",
            "sliding_window",
            "alibi",
            "gqa",
            "relative_bias",
            "cross_attention",
        }
    )

    def kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        if model_dtype == torch.bfloat16 and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32

    @staticmethod
    def _compute_dtype(layer: Attention, cache_dtype: torch.dtype) -> torch.dtype:
        """The cache's dtype, or float32 for an ALiBi layer (its bias grows with the
        position, beyond what bf16 resolves)."""
        return cache_dtype if layer.alibi_slopes is None else torch.float32

    @classmethod
    def _decode_dtype(cls, layer: Attention, cache_dtype: torch.dtype) -> torch.dtype:
        """The compute dtype of one-query-per-sequence SDPA (the decodes the kernel does
        not take: position biases, windows): float32 on a CPU without AMX, where bf16
        SDPA at decode shapes is the slow path (an AMD EPYC, 32 sequences of T5's
        decoder self-attention over 64 keys with their bias: 1.98 ms in bf16, 0.23 in
        float32; with AMX, bf16 measured 2-3x faster than float32)."""
        dtype = cls._compute_dtype(layer, cache_dtype)
        if dtype == torch.bfloat16 and not _has_amx():
            return torch.float32
        return dtype

    #: per layer, the cache dtype it was asked for and whether the layer and dtype suit
    #: the kernel (a decode step asks once per layer; a loaded layer does not change)
    _kernel_memo: ClassVar[weakref.WeakKeyDictionary[Attention, tuple[torch.dtype, bool]]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def _kernel_applies(cls, layer: Attention, cache_dtype: torch.dtype) -> bool:
        """Whether the decode kernel attends for ``layer`` (in place from the paged cache,
        no gathered copy: attention/native.py). A float32 cache keeps SDPA, whose sums
        match transformers' to the last bits (a quantized layer computing in bf16 inside
        amplifies any other order); ALiBi and windows keep it too. A relative position
        bias (T5's) goes to the kernel, which adds it to the scores (``_kernel_bias``)."""
        memo = cls._kernel_memo.get(layer)
        if memo is None or memo[0] != cache_dtype:
            plain = layer.alibi_slopes is None and layer.sliding_window is None
            compute = cls._compute_dtype(layer, cache_dtype)
            suits = plain and compute == cache_dtype == torch.bfloat16
            memo = (cache_dtype, suits)
            cls._kernel_memo[layer] = memo
        return memo[1] and paged_decode_available()

    def prepare(self, batch: ForwardBatch) -> _Plan:
        decode_ids = [i for i, chunk in enumerate(batch.chunks) if chunk.num_new == 1]
        decodes = None
        if decode_ids:
            chunks = [batch.chunks[i] for i in decode_ids]
            lengths_list = [chunk.seq_len for chunk in chunks]
            lengths = torch.tensor(lengths_list)
            decodes = _Decodes(
                rows=torch.tensor([batch.query_start[i] for i in decode_ids]),
                query_pos=lengths - 1,
                block_tables=_block_tables(
                    [chunk.block_table for chunk in chunks], lengths_list, batch.block_size
                ),
                lengths=lengths,
                max_len=max(lengths_list),
                block_size=batch.block_size,
            )
            if len(decode_ids) == len(batch.chunks) and paged_decode_available():
                batch.native_decode = NativeDecodeStep.create(
                    batch.kv_cache.serial,
                    decodes.block_tables,
                    lengths,
                    batch.slot_mapping,
                    batch.block_size,
                )
        prefills = [
            _Prefill(
                batch.query_start[index],
                batch.query_start[index + 1],
                chunk.num_cached,
                chunk.block_table,
                batch.block_size,
            )
            for index, chunk in enumerate(batch.chunks)
            if chunk.num_new != 1
        ]
        return _Plan(decodes, prefills, self._prepare_cross(batch))

    @staticmethod
    def _prepare_cross(batch: ForwardBatch) -> _Cross | None:
        if not any(chunk.encoder_len for chunk in batch.chunks):
            return None
        lengths_list = [chunk.encoder_len for chunk in batch.chunks]
        lengths = torch.tensor(lengths_list)
        tables = _block_tables(
            [chunk.block_table for chunk in batch.chunks], lengths_list, batch.block_size
        )
        single = [i for i, chunk in enumerate(batch.chunks) if chunk.num_new == 1]
        index = torch.tensor(single, dtype=torch.int64)
        return _Cross(
            tables=tables,
            lengths=lengths,
            longest=max(lengths_list),
            single_rows=single,
            rows=torch.tensor([batch.query_start[i] for i in single], dtype=torch.int64),
            single_tables=tables[index],
            single_lengths=lengths[index],
            block_size=batch.block_size,
        )

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        if layer.kind == "encoder":
            assert k is not None and v is not None
            return self._encoder(layer, q, k, v, batch)
        if layer.kind == "cross":
            return self._cross(layer, q, batch)
        assert k is not None and v is not None
        cache = batch.kv_cache
        keys, values = cache.keys[layer.layer_index], cache.values[layer.layer_index]
        plan: _Plan = batch.state
        if plan.decode_only and self._kernel_applies(layer, keys.dtype):
            # the common step, one token per sequence on the kernel, which writes the
            # new keys and values itself where their layout lets it
            assert plan.decodes is not None
            writes = can_write_new(k, v, keys)
            if not writes:
                cache.write(layer.layer_index, batch.slot_mapping, k, v)
            sequences = plan.decodes.bind(writes, batch.slot_mapping)
            new = (k, v) if writes else None
            bias = self._kernel_bias(layer, plan.decodes, plan)
            native: NativeDecodeStep | None = batch.native_decode
            plain = writes and bias is None and q.dtype == keys.dtype
            if native and plain and layer.op_key >= 0:
                # exactly this call: the C++ kernel runs the layer's next steps itself
                native.register(layer.op_key, keys, values, layer.scale)
            out = sequences.attend(
                q.to(keys.dtype), keys, values, layer.scale, new, checked=True, bias=bias
            )
            return out.to(q.dtype).flatten(1)
        cache.write(layer.layer_index, batch.slot_mapping, k, v)
        gqa = layer.num_kv_heads != layer.num_heads
        dtype = self._compute_dtype(layer, keys.dtype)
        if plan.decode_only:
            assert plan.decodes is not None
            out = self._decodes(layer, q, keys, values, plan.decodes, plan)
            return out.to(q.dtype).flatten(1)
        out = torch.empty(q.shape[0], layer.num_heads, layer.head_dim, dtype=dtype)
        if plan.decodes is not None:
            out[plan.decodes.rows] = self._decodes(
                layer, q[plan.decodes.rows], keys, values, plan.decodes, plan
            )
        # on AMX CPUs bf16 SDPA runs on AMX tiles: only measured slower without them
        kernel = (
            not _has_amx()
            and layer.position_bias is None
            and self._kernel_applies(layer, keys.dtype)
        )
        if kernel and flash_prefill_available(layer.head_dim):  # every prefill in one call
            plan.prefill_sequences.attend(
                q.to(keys.dtype), keys, values, out, layer.scale, causal=True
            )
            return out.to(q.dtype).flatten(1)
        for p in plan.prefills:
            if kernel:  # each query over its causal prefix, in place from the cache
                query = q[p.start : p.end].to(keys.dtype)
                out[p.start : p.end] = p.as_decodes.attend(query, keys, values, layer.scale)
                continue
            query = q[p.start : p.end].to(dtype).transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if p.slots is None:
                key, value = k[p.start : p.end], v[p.start : p.end]
            else:
                key, value = keys.index_select(0, p.slots), values.index_select(0, p.slots)
            key = key.to(dtype).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            value = value.to(dtype).transpose(0, 1).unsqueeze(0)
            mask = self._prefill_mask(layer, p, key.shape[2], plan, dtype)
            attended = F.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask=mask,
                is_causal=mask is None,
                scale=layer.scale,
                enable_gqa=gqa,
            )
            out[p.start : p.end] = attended.squeeze(0).transpose(0, 1)
        return out.to(q.dtype).flatten(1)

    def _decodes(
        self,
        layer: Attention,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        d: _Decodes,
        plan: _Plan,
    ) -> torch.Tensor:
        """Attention of one query per sequence ``q`` ``[S, H, D]`` -> ``[S, H, D]``, in the
        layer's decode dtype, over the cache (the step's rows already written)."""
        if self._kernel_applies(layer, keys.dtype):  # in the cache's dtype
            bias = self._kernel_bias(layer, d, plan)
            return d.bind(False).attend(q.to(keys.dtype), keys, values, layer.scale, bias=bias)
        dtype = self._decode_dtype(layer, keys.dtype)
        kv_heads, group = layer.num_kv_heads, layer.num_heads // layer.num_kv_heads
        shape = (*d.slots.shape, kv_heads, layer.head_dim)
        key = keys.index_select(0, d.flat_slots).view(shape).to(dtype).transpose(1, 2)
        value = values.index_select(0, d.flat_slots).view(shape).to(dtype).transpose(1, 2)
        mask = self._decode_mask(layer, d, plan, dtype)
        # The query heads sharing a key/value head attend as that head's G "query
        # positions" (no causal mask between them): one [G, L] attention per key/value
        # head instead of G [1, L] ones, which the CPU kernel runs ~1.5-2x faster.
        query = q.to(dtype).view(q.shape[0], kv_heads, group, layer.head_dim)
        if mask is not None and mask.shape[1] != 1:  # a per-head bias [S or 1, H, 1, L]
            mask = mask.view(mask.shape[0], kv_heads, group, mask.shape[-1])
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=layer.scale
        )
        return attended.view(q.shape[0], layer.num_heads, layer.head_dim)

    @staticmethod
    def _kernel_bias(layer: Attention, d: _Decodes, plan: _Plan) -> torch.Tensor | None:
        """The decode kernel's additive bias ``[S, H, L]`` float32 for a layer with a
        relative position bias (None without): built once a step, every layer shares
        the table."""
        if layer.position_bias is None:
            return None
        key = ("kernel", id(layer.position_bias))
        if key not in plan.memo:
            bias = layer.position_bias(d.query_pos[:, None], d.key_pos.long())  # [S,H,1,L]
            plan.memo[key] = bias.squeeze(2).float().contiguous()
        return plan.memo[key]

    @staticmethod
    def _decode_mask(
        layer: Attention, d: _Decodes, plan: _Plan, dtype: torch.dtype
    ) -> torch.Tensor | None:
        plain = layer.alibi_slopes is None and layer.position_bias is None
        if d.all_valid and layer.sliding_window is None and plain:
            return None  # every sequence as long as the longest: nothing to mask
        allowed = d.valid
        if layer.sliding_window is not None:
            allowed = allowed & (
                d.query_pos[:, None] - torch.arange(d.valid.shape[1])[None, :]
                < layer.sliding_window
            )
        allowed = allowed[:, None, None, :]  # [S, 1, 1, L]
        if plain:
            return allowed
        if layer.position_bias is not None:
            key = ("decode", id(layer.position_bias))
            if key not in plan.memo:  # the table is shared by every layer: once per step
                bias = layer.position_bias(d.query_pos[:, None], d.key_pos.long())  # [S,H,1,L]
                plan.memo[key] = bias.to(dtype).masked_fill(~allowed, float("-inf"))
            return plan.memo[key]
        assert layer.alibi_slopes is not None
        bias = layer.alibi_slopes.float()[None, :, None, None] * d.key_pos  # [1, H, 1, L]
        return bias.masked_fill(~allowed, float("-inf"))

    @staticmethod
    def _prefill_mask(
        layer: Attention, p: _Prefill, num_keys: int, plan: _Plan, dtype: torch.dtype
    ) -> torch.Tensor | None:
        plain = layer.alibi_slopes is None and layer.position_bias is None
        if p.num_cached == 0 and layer.sliding_window is None and plain:
            return None  # plain causal attention over the prompt itself
        if plain:  # the same for every layer with this window: built once a step
            window = ("prefill", p.start, layer.sliding_window, dtype)
            if window not in plan.memo:
                _, _, allowed = SdpaBackend._prefill_allowed(layer, p, num_keys)
                # additive, in the compute dtype: SDPA would convert a boolean mask itself
                additive = torch.zeros(allowed.shape, dtype=dtype)
                plan.memo[window] = additive.masked_fill_(~allowed, float("-inf"))
            return plan.memo[window]
        query_pos, key_pos, allowed = SdpaBackend._prefill_allowed(layer, p, num_keys)
        if layer.position_bias is not None:
            key = ("prefill", p.start, id(layer.position_bias))
            if key not in plan.memo:
                bias = layer.position_bias(query_pos[:, 0], key_pos[0])  # [H, n, L]
                plan.memo[key] = bias.to(dtype).masked_fill(~allowed, float("-inf")).unsqueeze(0)
            return plan.memo[key]
        assert layer.alibi_slopes is not None
        bias = layer.alibi_slopes.float()[:, None, None] * key_pos.float()  # [H, 1, L]
        return bias.masked_fill(~allowed, float("-inf")).unsqueeze(0)

    @staticmethod
    def _prefill_allowed(
        layer: Attention, p: _Prefill, num_keys: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chunk's query positions ``[n, 1]``, key positions ``[1, num_keys]`` and
        which keys each query may attend ``[n, num_keys]``."""
        query_pos = torch.arange(p.num_cached, p.num_cached + p.end - p.start)[:, None]
        key_pos = torch.arange(num_keys)[None, :]
        allowed = key_pos <= query_pos
        if layer.sliding_window is not None:
            allowed &= query_pos - key_pos < layer.sliding_window
        return query_pos, key_pos, allowed

    def _encoder(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """Bidirectional attention within each source of the step (no cache): on the
        prefill kernel where it applies (bf16, no AMX, as for decoder prefills)."""
        assert batch.encoder is not None
        plan: _Plan = batch.state
        starts = batch.encoder.query_start
        dtype = self._compute_dtype(layer, batch.kv_cache.dtype)
        out = torch.empty(q.shape[0], layer.num_heads, layer.head_dim, dtype=dtype)
        if self._encoder_kernel_applies(layer, dtype):
            sources = plan.encoder_sources(starts)
            bias = None
            if layer.position_bias is not None:
                table_key = ("encoder kernel", id(layer.position_bias))
                if table_key not in plan.memo:
                    plan.memo[table_key] = relative_bias_table(layer.position_bias, sources.longest)
                bias = plan.memo[table_key]
            sources.attend(
                q.to(dtype), k.to(dtype), v.to(dtype), out, layer.scale, causal=False, bias=bias
            )
            return out.to(q.dtype).flatten(1)
        for start, end in itertools.pairwise(starts):
            mask = None
            if layer.position_bias is not None:
                key = ("encoder", end - start, id(layer.position_bias))
                if key not in plan.memo:
                    positions = torch.arange(end - start)
                    plan.memo[key] = layer.position_bias(positions, positions)[None].to(dtype)
                mask = plan.memo[key]
            attended = F.scaled_dot_product_attention(
                q[start:end].to(dtype).transpose(0, 1)[None],
                k[start:end].to(dtype).transpose(0, 1)[None],
                v[start:end].to(dtype).transpose(0, 1)[None],
                attn_mask=mask,
                scale=layer.scale,
                enable_gqa=layer.num_kv_heads != layer.num_heads,
            )
            out[start:end] = attended[0].transpose(0, 1)
        return out.to(q.dtype).flatten(1)

    @staticmethod
    def _encoder_kernel_applies(layer: Attention, dtype: torch.dtype) -> bool:
        plain = layer.alibi_slopes is None and layer.sliding_window is None
        return (
            plain
            and dtype == torch.bfloat16
            and not _has_amx()
            and flash_prefill_available(layer.head_dim)
        )

    def _cross(self, layer: Attention, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Each sequence's queries over its source's keys and values, from the cache."""
        plan: _Plan = batch.state
        cross = plan.cross
        assert cross is not None, "cross-attention needs every sequence's source length"
        keys = batch.kv_cache.keys[layer.layer_index]
        values = batch.kv_cache.values[layer.layer_index]
        gqa = layer.num_kv_heads != layer.num_heads
        dtype = self._compute_dtype(layer, keys.dtype)
        out = torch.empty(q.shape[0], layer.num_heads, layer.head_dim, dtype=dtype)
        if cross.single_rows and self._kernel_applies(layer, keys.dtype):
            out[cross.rows] = paged_decode(
                q[cross.rows].to(dtype),
                keys,
                values,
                cross.single_tables,
                cross.single_lengths,
                cross.block_size,
                layer.scale,
            )
        elif cross.single_rows:  # one query per sequence: one batched call
            index = torch.tensor(cross.single_rows)
            slots = cross.slots[index]
            shape = (*slots.shape, layer.num_kv_heads, layer.head_dim)
            key = keys.index_select(0, slots.flatten()).view(shape).to(dtype).transpose(1, 2)
            value = values.index_select(0, slots.flatten()).view(shape).to(dtype).transpose(1, 2)
            out[cross.rows] = F.scaled_dot_product_attention(
                q[cross.rows].to(dtype).unsqueeze(2),
                key,
                value,
                attn_mask=cross.valid[index][:, None, None, :],
                scale=layer.scale,
                enable_gqa=gqa,
            ).squeeze(2)
        for row, chunk in enumerate(batch.chunks):
            if chunk.num_new == 1:
                continue
            start, end = batch.query_start[row], batch.query_start[row + 1]
            slots = cross.slots[row, : chunk.encoder_len]
            attended = F.scaled_dot_product_attention(
                q[start:end].to(dtype).transpose(0, 1)[None],
                keys.index_select(0, slots).to(dtype).transpose(0, 1)[None],
                values.index_select(0, slots).to(dtype).transpose(0, 1)[None],
                scale=layer.scale,
                enable_gqa=gqa,
            )
            out[start:end] = attended[0].transpose(0, 1)
        return out.to(q.dtype).flatten(1)
