"""Tensor-parallel shards of BLOOM's attention, simulated rank by rank.

Each rank's layer is built with ``ParallelContext(rank=r, world_size=n)`` and no process
group, and loaded from the same checkpoint tensors; the shards' outputs, concatenated
over ranks, must equal the unsharded layer's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BloomConfig
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from tgi_bloom.model import BloomAttention, BloomForCausalLM, BloomQKVLinear
from tgi_core.model.base import ModelContext
from tgi_core.model.fixtures import load_reference, save_checkpoint
from tgi_core.model.loader import load_weights
from tgi_core.model.parallel import ParallelContext
from tgi_core.model.weights import LazyTensor, SafetensorsWeights

HEAD_DIM = 8
LAYOUTS = [(4, 2), (4, 4), (6, 2), (6, 3), (12, 4)]  # (heads, world size)


def checkpoint_tensors(heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused query_key_value weight ``[heads * 3 * D, hidden]`` and bias, BLOOM's layout."""
    hidden = heads * HEAD_DIM
    generator = torch.Generator().manual_seed(heads)
    weight = torch.randn(3 * hidden, hidden, generator=generator)
    return weight, torch.randn(3 * hidden, generator=generator)


def recording(tensor: torch.Tensor, reads: list[tuple[slice, ...]]) -> LazyTensor:
    """``tensor`` as a LazyTensor that appends every slice it reads to ``reads``."""

    def read(slices: tuple[slice, ...]) -> torch.Tensor:
        reads.append(slices)
        return tensor[slices]

    return LazyTensor("query_key_value", tuple(tensor.shape), read)


def build(heads: int, tp: ParallelContext, weight: LazyTensor, bias: LazyTensor) -> BloomQKVLinear:
    layer = BloomQKVLinear(heads * HEAD_DIM, HEAD_DIM, heads, tp=tp)
    for param, loaded in ((layer.weight, weight), (layer.bias, bias)):
        param.weight_loader(param, loaded, None)  # type: ignore[attr-defined]
    return layer


@torch.inference_mode()
def test_world_size_one_splits_like_transformers() -> None:
    """q, k, v of head h are rows ``[h, 0|1|2, :]`` of the interleaved tensor."""
    heads = 6
    weight, bias = checkpoint_tensors(heads)
    layer = build(heads, ParallelContext(), LazyTensor.of(weight), LazyTensor.of(bias))
    x = torch.randn(5, heads * HEAD_DIM)
    q, k, v = layer.split(layer(x))
    expected = F.linear(x, weight, bias).view(5, heads, 3, HEAD_DIM)
    for got, index in ((q, 0), (k, 1), (v, 2)):
        torch.testing.assert_close(got, expected[:, :, index], rtol=1e-6, atol=1e-5)


@torch.inference_mode()
@pytest.mark.parametrize(("heads", "world"), LAYOUTS)
def test_qkv_shards_concatenate_to_the_whole(heads: int, world: int) -> None:
    weight, bias = checkpoint_tensors(heads)
    whole = build(heads, ParallelContext(), LazyTensor.of(weight), LazyTensor.of(bias))
    x = torch.randn(7, heads * HEAD_DIM)
    expected = whole.split(whole(x))
    shards = []
    for rank in range(world):
        reads: list[tuple[slice, ...]] = []
        wrapped_weight = recording(weight, reads)
        wrapped_bias = recording(bias, reads)
        layer = build(
            heads, ParallelContext(rank=rank, world_size=world), wrapped_weight, wrapped_bias
        )
        assert layer.num_heads == heads // world
        rows = 3 * HEAD_DIM * heads // world
        # each rank reads only its own heads' rows, once for the weight and once for the bias
        assert [s[0] for s in reads] == [slice(rank * rows, (rank + 1) * rows)] * 2
        shards.append(layer.split(layer(x)))
    for part, name in enumerate("qkv"):
        got = torch.cat([shard[part] for shard in shards], dim=1)
        torch.testing.assert_close(got, expected[part], rtol=1e-6, atol=1e-5, msg=name)


@pytest.mark.parametrize(("heads", "world"), LAYOUTS)
def test_alibi_slopes_of_the_shards_are_transformers_slopes(heads: int, world: int) -> None:
    config = BloomConfig(vocab_size=16, hidden_size=heads * HEAD_DIM, n_layer=1, n_head=heads)
    slopes = [
        BloomAttention(config, ParallelContext(rank=rank, world_size=world)).attn.alibi_slopes
        for rank in range(world)
    ]
    got = torch.cat([s for s in slopes if s is not None])
    torch.testing.assert_close(got, _get_alibi_slopes(heads, torch.device("cpu")))


@torch.inference_mode()
def test_ranks_load_a_checkpoint_into_their_heads(tmp_path: Path) -> None:
    """Through the core loader: every rank of 2 loads every tensor, and its heads' q/k/v.

    Concatenated over ranks, the first block's q/k/v equal transformers' fused
    projection split per head.
    """
    heads, world = 6, 2
    config = BloomConfig(vocab_size=64, hidden_size=heads * HEAD_DIM, n_layer=2, n_head=heads)
    path = save_checkpoint(tmp_path / "bloom", config)
    fused = load_reference(path).transformer.h[0].self_attention.query_key_value
    x = torch.randn(5, heads * HEAD_DIM)
    expected = fused(x).view(5, heads, 3, HEAD_DIM)
    shards = []
    for rank in range(world):
        ctx = ModelContext(tp=ParallelContext(rank=rank, world_size=world))
        model = BloomForCausalLM(config, ctx)
        load_weights(model, SafetensorsWeights.from_files([path / "model.safetensors"]))
        layer = model.transformer.h[0].self_attention.query_key_value
        shards.append(layer.split(layer(x)))
    for part in range(3):
        got = torch.cat([shard[part] for shard in shards], dim=1)
        torch.testing.assert_close(got, expected[:, :, part], rtol=1e-6, atol=1e-5)


def test_wrong_head_count_is_a_clear_error() -> None:
    layer = BloomQKVLinear(6 * HEAD_DIM, HEAD_DIM, 6)
    four_heads = torch.randn(4 * 3 * HEAD_DIM, 6 * HEAD_DIM)
    with pytest.raises(ValueError, match=r"6 heads of 3 x 8 rows"):
        layer.weight_loader(layer.weight, LazyTensor.of(four_heads), None)
